"""Optuna set-up of a search: storage, study, sampler and pruner.

``open_storage`` turns a URL into a storage (RDB with heartbeats, so that a killed worker's
trial is detected and retried); ``open_study`` creates or loads the study and refuses one made
for another search space or objective; ``make_sampler`` and ``make_pruner`` build TPE / random
search and the pruners from a ``SearchConfig``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial

from floe.search.config import SearchConfig, SearchError
from floe.search.states import CONTEXT_ATTR, SPACE_ATTR, holds_results, is_counted

logger = logging.getLogger("floe.search")

DEFAULT_STUDY_NAME = "floe-search"
DB_NAME = "search.db"


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna logs every trial (failed ones with a traceback); we record and print them ourselves."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def default_storage_url(output_dir: str | Path) -> str:
    """``sqlite:///<output_dir>/search.db`` (absolute path)."""
    return f"sqlite:///{(Path(output_dir) / DB_NAME).resolve()}"


def redact_url(url: str | None) -> str:
    """The storage URL with its password hidden."""
    if url is None:
        return "memory"
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 -- a malformed URL is shown as given, minus anything before '@'
        return url.split("@")[-1] if "@" in url else url


def open_storage(url: str | None, config: SearchConfig) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url`` (None: in memory, one process, not resumable).

    RDB storages get heartbeats so that a killed worker's trial is detected and retried.
    Raises ``SearchError`` naming the problem when the URL is malformed, its driver is not
    installed, its SQLite folder does not exist or the database cannot be opened.
    """
    if url is None:
        return optuna.storages.InMemoryStorage()
    import sqlalchemy
    from sqlalchemy.engine import make_url

    shown = redact_url(url)
    try:
        parsed = make_url(url)
    except Exception as e:  # sqlalchemy.exc.ArgumentError
        raise SearchError(
            f"storage {shown!r} is not a database URL ({e}). Use an SQLAlchemy URL such as "
            "sqlite:///runs/search/search.db or postgresql://user:password@host:5432/dbname"
        ) from None
    engine_kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if not db or db == ":memory:":
            raise SearchError(f"storage {shown!r}: an in-memory SQLite database can be neither resumed nor "
                              "shared; give a file, e.g. sqlite:///runs/search/search.db")
        if not Path(db).parent.is_dir():
            raise SearchError(f"storage {shown!r}: folder {Path(db).parent} does not exist; create it first "
                              "or point the URL at an existing folder")
        engine_kwargs = {"connect_args": {"timeout": 60}}  # several worker processes on one file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        try:
            return _rdb_storage(url, engine_kwargs, config)
        except ImportError as e:  # Optuna re-raises the driver's ModuleNotFoundError as ImportError
            cause = e if isinstance(e, ModuleNotFoundError) else e.__cause__
            name = getattr(cause, "name", None) or "for this URL"
            raise SearchError(
                f"storage {shown!r} needs the database driver {name!r}, which is not installed: install it "
                "(e.g. pip install 'psycopg[binary]' for postgresql://, or name the driver in the URL: "
                "postgresql+psycopg2://, mysql+pymysql://)"
            ) from None
        except (sqlalchemy.exc.SQLAlchemyError, OSError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise SearchError(f"could not open storage {shown!r}: {type(e).__name__}: {first}") from None


_CREATION_RACE = ("already exists", "unique constraint", "duplicate", "database is locked")


def _rdb_storage(url: str, engine_kwargs: dict[str, Any], config: SearchConfig,
                 attempts: int = 5) -> optuna.storages.RDBStorage:
    """``RDBStorage`` with retries: workers that start together on a new database race to create
    its tables ("table ... already exists"); the loser just has to open it again."""
    import sqlalchemy

    def make() -> optuna.storages.RDBStorage:
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs,
            heartbeat_interval=config.heartbeat_interval, grace_period=config.grace_period,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
        )

    for attempt in range(attempts - 1):
        try:
            return make()
        except sqlalchemy.exc.SQLAlchemyError as e:
            if not any(k in str(e).lower() for k in _CREATION_RACE):
                raise
            time.sleep(0.2 * (attempt + 1))
    return make()


def _describe_space(space: dict[str, Any]) -> str:
    r, m = space.get("r", {}), space.get("num_experts", {})
    return f"r in {r.get('low')}..{r.get('high')} step {r.get('step')}, M in {m.get('choices')}"


def _normalise(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"max_steps": 2}}`` -> ``{"train.max_steps": 2}``: differences name the leaf key."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _binding_problems(study: optuna.Study, config: SearchConfig, context: dict[str, Any] | None) -> list[str]:
    """How this search differs from the space / objective stored with the study (empty: it fits)."""
    problems = []
    space, stored = _normalise(config.search_space()), study.user_attrs.get(SPACE_ATTR)
    if stored is not None and stored != space:
        problems.append(f"it searches {_describe_space(stored)}, but this search asks for {_describe_space(space)}")
    if context:
        ctx, stored_ctx = _normalise(context), study.user_attrs.get(CONTEXT_ATTR)
        if stored_ctx is not None and stored_ctx != ctx:
            ours, theirs = _flatten(ctx), _flatten(stored_ctx)
            diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            problems.append("it was made for another objective (" + "; ".join(
                f"{k}: study has {theirs.get(k)!r}, this search {ours.get(k)!r}" for k in diff) + ")")
    return problems


def _check_fit(study: optuna.Study, where: str, config: SearchConfig, context: dict[str, Any] | None) -> list[str]:
    """Refuse a study this search may not join; return the differences that may be re-bound
    (a study without a finished or running trial holds no loss to mix up)."""
    if len(study.directions) != 1 or study.direction != optuna.study.StudyDirection.MINIMIZE:
        raise SearchError(f"{where} is not a single-objective minimisation study; use another --study-name")
    if study.user_attrs.get(SPACE_ATTR) is None and study.get_trials(deepcopy=False):
        raise SearchError(f"{where} already has trials but was not made by floe search; use another --study-name")
    problems = _binding_problems(study, config, context)
    if problems and holds_results(study, config.grace_period):
        if len(problems) == 1 and problems[0].startswith("it searches"):
            fix = "Resume it with the same ranges, or start a new study with another --study-name."
        else:
            fix = ("Its losses are not comparable with this search's: use the same settings, or another "
                   "--study-name.")
        raise SearchError(f"{where}: " + "; ".join(problems) + f". {fix}")
    return problems


def open_study(storage: optuna.storages.BaseStorage, study_name: str, config: SearchConfig,
               context: dict[str, Any] | None = None, storage_label: str = "",
               log: Callable[[str], None] | None = None) -> optuna.Study:
    """Create the study or load it, refusing one whose search space (or, when given, objective
    ``context``: model, data, steps...) differs from this search's -- unless it has no finished
    or running trial: then it is re-bound to this search, and ``log`` (default: the
    ``floe.search`` logger) is told so in one line."""
    try:
        with quiet_optuna():
            study = optuna.create_study(storage=storage, study_name=study_name, sampler=make_sampler(config),
                                        pruner=make_pruner(config), direction="minimize", load_if_exists=True)
    except Exception as e:  # noqa: BLE001 -- any storage error is reported the same way
        raise SearchError(f"could not create or load study {study_name!r} in {storage_label or 'storage'}: "
                          f"{type(e).__name__}: {e}") from None
    where = f"study {study_name!r}" + (f" in {storage_label}" if storage_label else "")
    problems = _check_fit(study, where, config, context)
    if problems:
        (log or logger.warning)(f"[floe] {where} has no finished trial; {'; '.join(problems)}: "
                                "re-bound to this search")
    if study.user_attrs.get(SPACE_ATTR) is None or problems:
        study.set_user_attr(SPACE_ATTR, _normalise(config.search_space()))
    if context and (study.user_attrs.get(CONTEXT_ATTR) is None or problems):
        study.set_user_attr(CONTEXT_ATTR, _normalise(context))
    return study


def peek_study(url: str, study_name: str, config: SearchConfig, context: dict[str, Any] | None = None) -> int:
    """Check, without creating or changing anything, that an existing study may be resumed by this
    search (see ``open_study``); returns its number of finished trials (0: no such study yet)."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and not (parsed.database and Path(parsed.database).is_file()):
            return 0  # a new file: nothing to check, and opening it would create it
    except Exception:  # noqa: BLE001 -- open_storage reports a malformed URL
        pass
    label = redact_url(url)
    store = open_storage(url, config)
    try:
        with quiet_optuna():
            study = optuna.load_study(study_name=study_name, storage=store, sampler=make_sampler(config),
                                      pruner=make_pruner(config))
    except KeyError:
        return 0
    except Exception as e:  # noqa: BLE001
        raise SearchError(f"could not load study {study_name!r} in {label}: {type(e).__name__}: {e}") from None
    _check_fit(study, f"study {study_name!r} in {label}", config, context)
    return sum(1 for t in study.get_trials(deepcopy=False) if is_counted(t))


# ---------------------------------------------------------------------------------------------
# Sampler and pruner


def _trial_seed(seed: int, number: int) -> int:
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class PerTrialSeededSampler(optuna.samplers.BaseSampler):
    """A sampler re-created for every trial with a seed derived from (seed, trial number).

    Why not ``TPESampler(seed=...)`` alone: its random stream depends on how many trials this
    *process* has sampled, so a resumed search re-proposes the startup points it already tried
    and two workers with the same seed propose the same points. Seeding per trial number keeps
    a fresh single-worker search reproducible and gives every trial its own stream.
    The wrapped sampler is stateless apart from its RNG (it re-reads the trials from storage).
    """

    def __init__(self, make: Callable[[int | None], optuna.samplers.BaseSampler], seed: int | None) -> None:
        self._make = make
        self._seed = seed
        self._current = make(seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._current = self._make(None if self._seed is None else _trial_seed(self._seed, trial.number))
        self._current.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):  # type: ignore[no-untyped-def]
        return self._current.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):  # type: ignore[no-untyped-def]
        return self._current.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):  # type: ignore[no-untyped-def]
        return self._current.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:  # type: ignore[no-untyped-def]
        self._current.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._current.reseed_rng()


def make_sampler(config: SearchConfig) -> optuna.samplers.BaseSampler:
    """TPE (multivariate, constant liar for parallel workers; its l/g acquisition is expected
    improvement under the TPE model, as in the paper) or random search."""
    if config.sampler == "random":
        return PerTrialSeededSampler(lambda s: optuna.samplers.RandomSampler(seed=s), config.seed)
    return PerTrialSeededSampler(
        lambda s: optuna.samplers.TPESampler(seed=s, multivariate=True, constant_liar=True,
                                             n_startup_trials=config.n_startup_trials),
        config.seed,
    )


def make_pruner(config: SearchConfig) -> optuna.pruners.BasePruner:
    """The pruner named by ``config.pruner``: median, successive halving or none."""
    if config.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=config.pruner_startup_trials,
                                           n_warmup_steps=config.pruner_warmup_steps)
    if config.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=config.halving_min_resource or "auto", reduction_factor=config.halving_reduction_factor)
    return optuna.pruners.NopPruner()
