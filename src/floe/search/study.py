"""Bayesian search of the LoRA rank r and expert count M (paper §3.4) on Optuna.

``search_rank`` runs one worker of a study. Several workers (processes, machines) may run
the same study through one RDB storage; each trial is owned by one worker (Optuna's storage
assigns trial numbers and hands a waiting trial to exactly one worker). On top of Optuna:

- exactly ``n_trials`` finished trials: a trial first checks that fewer than ``n_trials``
  lower-numbered trials are finished or alive, otherwise it is closed as "not run";
- no configuration trained twice: a trial whose (r, M) was already evaluated reuses the
  result (a cache hit); one whose (r, M) a lower-numbered trial is still training waits for it;
- failures (NaN, out of memory, ``TrialFailed``) are recorded with their reason and counted;
- a killed worker's trial loses its heartbeat, is marked failed-stale (not counted) and its
  configuration is queued again.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import shutil
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from floe.search.config import SearchConfig, SearchError, TrialFailed, _is_arithmetic
from floe.search.report import (
    CACHE_HIT, CACHED_FROM, CONTEXT_ATTR, FAILURE, INTERRUPTED, NOT_RUN, SPACE_ATTR, SearchResult, TrialRecord,
    collect_result, has_params, is_counted, redact_url, trial_record, write_outputs,
)

logger = logging.getLogger("floe.search")

Reporter = Callable[[float, int], None]
"""``report(value, step)``: record an intermediate validation loss; raises ``optuna.TrialPruned``
when the pruner stops the trial and ``TrialFailed`` when the value is NaN or infinite."""
ObjectiveFn = Callable[[int, int, Reporter], float]
"""``objective(r, num_experts, report) -> validation loss`` (lower is better)."""

DEFAULT_STUDY_NAME = "floe-search"
DB_NAME = "search.db"


# ---------------------------------------------------------------------------------------------
# Storage and study


def default_storage_url(output_dir: str | Path) -> str:
    """``sqlite:///<output_dir>/search.db`` (absolute path)."""
    return f"sqlite:///{(Path(output_dir) / DB_NAME).resolve()}"


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

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs,
                heartbeat_interval=config.heartbeat_interval, grace_period=config.grace_period,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
            )
        except sqlalchemy.exc.SQLAlchemyError as e:
            if attempt == attempts - 1 or not any(k in str(e).lower() for k in _CREATION_RACE):
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


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


def _holds_results(study: optuna.Study, grace_period: float) -> bool:
    """True when the study has a finished trial, or one still running somewhere (a running trial
    whose heartbeat is older than the grace period belongs to a killed worker: not counted)."""
    ages = _heartbeat_ages(study)
    return any(is_counted(t) or (_is_live(t, grace_period) and ages.get(t.number, 0.0) <= grace_period)
               for t in study.get_trials(deepcopy=False))


def _check_fit(study: optuna.Study, where: str, config: SearchConfig, context: dict[str, Any] | None) -> list[str]:
    """Refuse a study this search may not join; return the differences that may be re-bound
    (a study without a finished or running trial holds no loss to mix up)."""
    if len(study.directions) != 1 or study.direction != optuna.study.StudyDirection.MINIMIZE:
        raise SearchError(f"{where} is not a single-objective minimisation study; use another --study-name")
    if study.user_attrs.get(SPACE_ATTR) is None and study.get_trials(deepcopy=False):
        raise SearchError(f"{where} already has trials but was not made by floe search; use another --study-name")
    problems = _binding_problems(study, config, context)
    if problems and _holds_results(study, config.grace_period):
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
        with _quiet_optuna():
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
        with _quiet_optuna():
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
    if config.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=config.pruner_startup_trials,
                                           n_warmup_steps=config.pruner_warmup_steps)
    if config.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=config.halving_min_resource or "auto", reduction_factor=config.halving_reduction_factor)
    return optuna.pruners.NopPruner()


# ---------------------------------------------------------------------------------------------
# One trial


class _NotRun(Exception):
    """The study already has n_trials finished or running trials: close this one uncounted."""


def _is_live(t: FrozenTrial, grace_period: float, now: datetime | None = None) -> bool:
    """A running trial that will (probably) finish: it has its parameters, or it got them
    recently. A running trial without parameters for a whole grace period was abandoned
    before its first heartbeat (heartbeats cannot detect that)."""
    if t.state != TrialState.RUNNING:
        return False
    if has_params(t) or t.datetime_start is None:
        return True
    return ((now or datetime.now()) - t.datetime_start).total_seconds() < grace_period


def _heartbeat_ages(study: optuna.Study) -> dict[int, float]:
    """Seconds since the last heartbeat of each running trial (by number), read from an RDB
    storage; empty for other storages or when the storage cannot tell."""
    storage = getattr(study, "_storage", None)
    rdb = getattr(storage, "_backend", storage)
    if not isinstance(rdb, optuna.storages.RDBStorage):
        return {}
    try:
        import sqlalchemy
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(rdb.scoped_session) as session:
            now = session.execute(sqlalchemy.func.now()).scalar().replace(tzinfo=None)
            rows = (session.query(models.TrialModel.number, models.TrialHeartbeatModel.heartbeat)
                    .join(models.TrialHeartbeatModel, models.TrialHeartbeatModel.trial_id == models.TrialModel.trial_id)
                    .filter(models.TrialModel.study_id == study._study_id,
                            models.TrialModel.state == TrialState.RUNNING).all())
        return {int(n): max(0.0, (now - hb.replace(tzinfo=None)).total_seconds()) for n, hb in rows}
    except Exception:  # noqa: BLE001 -- a nicety: the wait message then gives no age
        return {}


def describe_wait(study: optuna.Study, trials: Sequence[FrozenTrial], config: SearchConfig) -> str:
    """One line: which running trials this worker waits for, and how long at most if their
    worker is dead (no heartbeat for ``grace_period`` seconds: declared abandoned, retried)."""
    ages, now, grace = _heartbeat_ages(study), datetime.now(), config.grace_period
    parts, longest = [], 0.0
    for t in trials:
        what = (f"trial {t.number} (r={t.params['r']}, M={t.params['num_experts']})" if has_params(t)
                else f"trial {t.number} (choosing its parameters)")
        if t.number in ages:
            age = ages[t.number]
            what += f", last heartbeat {age:.0f}s ago"
        else:
            age = (now - t.datetime_start).total_seconds() if t.datetime_start else 0.0
            what += f", started {age:.0f}s ago"
        longest = max(longest, grace - age)
        parts.append(what)
    return (f"[floe] waiting for {'; '.join(parts)}: running in another worker, or left by a killed one, "
            f"which is declared abandoned after {grace}s without a heartbeat (at most {max(0.0, longest):.0f}s "
            "more) and its configuration retried")


def _fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def _free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _suggest(trial: optuna.Trial, config: SearchConfig) -> tuple[int, int]:
    r = trial.suggest_int("r", config.r_min, config.r_max, step=config.r_step)
    e = config.experts
    if _is_arithmetic(e):  # ordered: TPE can exploit that 3 lies between 2 and 4
        m = trial.suggest_int("num_experts", e[0], e[-1], step=(e[1] - e[0]) if len(e) > 1 else 1)
    else:
        m = trial.suggest_categorical("num_experts", e)
    return r, m


def _replay(trial: optuna.Trial, source: FrozenTrial) -> None:
    """Copy a cached trial's intermediate values (so pruners and TPE see a faithful copy)."""
    for step, value in sorted(source.intermediate_values.items()):
        trial.report(value, step)
    trial.set_user_attr(CACHE_HIT, True)
    trial.set_user_attr(CACHED_FROM, source.number)


def _wait_for_turn(trial: optuna.Trial, config: SearchConfig,
                   log: Callable[[str], None] | None = None) -> FrozenTrial | None:
    """Block until this trial's configuration is decided; return the finished trial to reuse.

    Only lower-numbered trials are waited on (so waits never form a cycle): first those still
    choosing their parameters, then one with the same parameters that is still running.
    """
    study, me = trial.study, trial.number
    logged: list[int] = []
    while True:
        trials = study.get_trials(deepcopy=False)
        params = trial.params
        same = [t for t in trials if t.number != me and t.params == params]
        done = sorted((t for t in same if is_counted(t)), key=lambda t: t.number)
        if done:
            return done[0]
        now = datetime.now()
        lower_live = [t for t in trials if t.number < me and _is_live(t, config.grace_period, now)]
        blocking = [t for t in lower_live if not has_params(t) or t.params == params]
        if not blocking:
            return None
        if logged != [t.number for t in blocking]:
            logged = [t.number for t in blocking]
            (log or logger.info)(describe_wait(study, blocking, config)
                                 + f" (trial {me}, r={params.get('r')}, M={params.get('num_experts')}, waits)")
        time.sleep(config.poll_interval)
        _fail_stale(study)


class TrialReporter:
    """The ``report`` handed to an objective: ``report(value, step)``; ``report.trial_number``
    and ``report.workdir`` (the trial's working folder under the search's output folder, or
    None: the objective picks one) tell the objective where it runs."""

    def __init__(self, trial: optuna.Trial, workdir: Path | None) -> None:
        self.trial, self.trial_number, self.workdir = trial, trial.number, workdir

    def __call__(self, value: float, step: int) -> None:
        v = float(value)
        if not math.isfinite(v):
            raise TrialFailed(f"validation loss is {v} at step {step}")
        self.trial.report(v, int(step))
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} (validation loss {v:.4g})")


TRIAL_DIR_PREFIX = "trial-"


def _trial_dir(work_dir: Path, number: int) -> Path:
    return work_dir / f"{TRIAL_DIR_PREFIX}{number}"


def remove_abandoned_trial_dirs(trials: Sequence[FrozenTrial], work_dir: Path | None) -> list[Path]:
    """Remove ``work_dir/trial-<n>`` folders whose trial (in ``trials``, the study's) is no longer
    running (its worker was killed, or it ended without cleaning up); returns the removed folders."""
    if work_dir is None or not work_dir.is_dir():
        return []
    running = {t.number for t in trials if t.state == TrialState.RUNNING}
    removed = []
    for d in work_dir.iterdir():
        num = d.name[len(TRIAL_DIR_PREFIX):]
        if d.is_dir() and d.name.startswith(TRIAL_DIR_PREFIX) and num.isdigit() and int(num) not in running:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _run_trial(trial: optuna.Trial, objective: ObjectiveFn, config: SearchConfig,
               catch: tuple[type[BaseException], ...], calls: list[int],
               work_dir: Path | None = None, log: Callable[[str], None] | None = None) -> float:
    study = trial.study
    r, m = _suggest(trial, config)

    # Budget: at most n_trials trials may be finished or running, counted in trial-number order.
    now = datetime.now()
    ahead = sum(1 for t in study.get_trials(deepcopy=False)
                if t.number < trial.number and (is_counted(t) or _is_live(t, config.grace_period, now)))
    if ahead >= config.n_trials:
        trial.set_user_attr(NOT_RUN, f"{ahead} earlier trials already fill the budget of {config.n_trials}")
        raise _NotRun()

    cached = _wait_for_turn(trial, config, log)
    if cached is not None:
        _replay(trial, cached)
        if cached.state == TrialState.COMPLETE:
            return float(cached.value)
        if cached.state == TrialState.PRUNED:
            raise optuna.TrialPruned(f"same configuration as trial {cached.number}, which was pruned")
        reason = f"same configuration as trial {cached.number}, which failed: {cached.user_attrs.get(FAILURE)}"
        trial.set_user_attr(FAILURE, reason)
        raise TrialFailed(reason)

    workdir = None if work_dir is None else _trial_dir(work_dir, trial.number)
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
    report = TrialReporter(trial, workdir)
    calls.append(trial.number)
    failure: str | None = None
    try:
        try:
            value = objective(r, m, report)
        finally:
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
    except optuna.TrialPruned:
        raise
    except TrialFailed as e:
        failure = str(e) or type(e).__name__
    except KeyboardInterrupt:
        # Closed as failed but not counted; queue the configuration so that a resumed search runs it.
        trial.set_user_attr(INTERRUPTED, "interrupted (KeyboardInterrupt / SIGTERM)")
        with contextlib.suppress(Exception):
            study.enqueue_trial({"r": r, "num_experts": m})
        raise
    except Exception as e:  # noqa: BLE001 -- classified below; anything else propagates
        if _is_oom(e):
            failure = f"out of memory: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        elif catch and isinstance(e, catch):
            failure = f"{type(e).__name__}: {e}"
        else:
            raise
    if failure is None:
        value = float(value)
        if not math.isfinite(value):
            failure = f"objective returned {value}"
    if failure is not None:
        _free_memory()  # after the except block, so the traceback no longer pins the model
        trial.set_user_attr(FAILURE, failure)
        raise TrialFailed(failure)
    return value


# ---------------------------------------------------------------------------------------------
# The worker loop


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna logs every trial (failed ones with a traceback); we record and print them ourselves."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def run_worker(study: optuna.Study, objective: ObjectiveFn, config: SearchConfig,
               catch: Sequence[type[BaseException]] = (),
               on_trial: Callable[[TrialRecord], None] | None = None,
               work_dir: str | Path | None = None, log: Callable[[str], None] | None = None) -> list[int]:
    """Run trials until the study has ``config.n_trials`` finished ones (counting every
    worker's); returns the numbers of the trials whose objective this worker called.

    ``work_dir``: each trial runs in ``work_dir/trial-<number>`` (``report.workdir``), removed
    when the trial ends; folders of abandoned trials (killed workers) are removed too.
    ``log``: one line whenever this worker starts waiting on other (or dead) workers' trials.
    """
    calls: list[int] = []
    asked: list[int] = []
    catch_t = tuple(catch)
    waited: list[int] = []
    work = Path(work_dir) if work_dir is not None else None
    say = log or logger.info

    def body(trial: optuna.Trial) -> float:
        asked.append(trial.number)
        return _run_trial(trial, objective, config, catch_t, calls, work, log)

    with _quiet_optuna():
        while True:
            _fail_stale(study)
            trials = study.get_trials(deepcopy=False)
            abandoned = [t.number for t in trials if t.number in waited and t.state == TrialState.FAIL
                         and not is_counted(t)]
            if abandoned:
                say(f"[floe] trial(s) {abandoned} declared abandoned (no heartbeat for {config.grace_period}s); "
                    "their configurations are retried")
            remove_abandoned_trial_dirs(trials, work)
            finished = sum(1 for t in trials if is_counted(t))
            if finished >= config.n_trials:
                break
            live = [t for t in trials if _is_live(t, config.grace_period)]
            if finished + len(live) >= config.n_trials:  # the rest is running elsewhere: wait for it
                if waited != [t.number for t in live]:
                    waited = [t.number for t in live]
                    say(describe_wait(study, live, config) + f" ({finished} of {config.n_trials} trials finished)")
                time.sleep(config.poll_interval)
                continue
            waited = []
            study.optimize(body, n_trials=1, catch=(TrialFailed, _NotRun))
            if on_trial is not None and asked:
                t = next((t for t in study.get_trials(deepcopy=False) if t.number == asked[-1]), None)
                if t is not None and is_counted(t):
                    on_trial(trial_record(t))
    return calls


def search_rank(objective: ObjectiveFn, config: SearchConfig | None = None, *,
                storage: str | None = None, study_name: str | None = None,
                output_dir: str | Path | None = None, context: dict[str, Any] | None = None,
                catch: Sequence[type[BaseException]] = (),
                on_trial: Callable[[TrialRecord], None] | None = None,
                log: Callable[[str], None] | None = None) -> SearchResult:
    """Search r and M minimising ``objective(r, num_experts, report)`` (paper §3.4).

    Args:
        objective: trains/evaluates one configuration and returns its validation loss; it may
            call ``report(loss, step)`` at intermediate points so the pruner can stop it.
        config: search space, trial count, sampler, pruner (``SearchConfig()`` defaults).
        storage: SQLAlchemy URL of an Optuna RDB storage shared by every worker of the study
            (e.g. ``postgresql://user:pw@host/db``). Default: ``sqlite:///<output_dir>/search.db``
            when ``output_dir`` is given, else in memory.
        study_name: name of the study in the storage (default ``floe-search``).
        output_dir: where ``search.json`` and ``search.png`` are written (json after every trial).
        context: what the objective measures (model, data, steps...): stored with the study and
            compared when the study is resumed or joined, so losses of different setups never mix.
        catch: further exception types that fail one trial instead of stopping the search
            (NaN values, out-of-memory errors and ``TrialFailed`` always do).
        on_trial: called with each trial this worker finishes.
        log: receives one-line notices (a study re-bound to this search; waiting on trials of
            other or killed workers, and for how long). Default: the ``floe.search`` logger.

    With ``output_dir``, each trial runs in ``<output_dir>/trials/trial-<number>`` (given to the
    objective as ``report.workdir``), removed when the trial ends or is found abandoned.

    Returns the ``SearchResult`` of the whole study. Raises ``SearchError`` before running any
    trial when the configuration, the storage or the study does not fit.
    """
    config = config or SearchConfig()
    out = Path(output_dir) if output_dir is not None else None
    if storage is None and out is not None:
        out.mkdir(parents=True, exist_ok=True)
        storage = default_storage_url(out)
    study_name = study_name or DEFAULT_STUDY_NAME
    label = redact_url(storage) if storage else "memory"
    store = open_storage(storage, config)
    study = open_study(store, study_name, config, context, storage_label=label, log=log)
    work = out / "trials" if out is not None else None

    def after(record: TrialRecord) -> None:
        if out is not None:
            write_outputs(collect_result(study, config, label), out, plot=False)
        if on_trial is not None:
            on_trial(record)

    calls = run_worker(study, objective, config, catch, after, work_dir=work, log=log)
    if work is not None:
        with contextlib.suppress(OSError):
            work.rmdir()  # empty unless another worker is still running a trial
    result = collect_result(study, config, label)
    result.worker_calls = calls
    if out is not None:
        write_outputs(result, out, plot=True)
    return result
