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

The pieces: ``storage`` (storage, study, sampler, pruner), ``trial`` (one trial),
``states`` (how a trial counts), ``report`` (search.json, figures, table).
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
from optuna.trial import TrialState

from floe.search.config import SearchConfig, TrialFailed
from floe.search.report import SearchResult, TrialRecord, collect_result, trial_record, write_outputs
from floe.search.states import describe_wait, fail_stale, is_counted, is_live
from floe.search.storage import (
    DEFAULT_STUDY_NAME, default_storage_url, open_storage, open_study, quiet_optuna, redact_url,
)
from floe.search.trial import NotRun, ObjectiveFn, Reporter, remove_abandoned_trial_dirs, run_trial

__all__ = ["DEFAULT_STUDY_NAME", "ObjectiveFn", "Reporter", "run_worker", "search_rank"]

logger = logging.getLogger("floe.search")


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
        return run_trial(trial, objective, config, catch_t, calls, work, log)

    # One trial per study.optimize call, not optuna.study.MaxTrialsCallback: that callback counts
    # trials by state after each one ends, but Optuna files counted failures (a recorded reason)
    # and uncounted ones (stale, interrupted, over budget) all as FAIL, and a worker must check
    # the budget, and wait for other workers' running trials, *before* it starts another trial.
    with quiet_optuna():
        while True:
            fail_stale(study)
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
            live = [t for t in trials if is_live(t, config.grace_period)]
            if finished + len(live) >= config.n_trials:  # the rest is running elsewhere: wait for it
                if waited != [t.number for t in live]:
                    waited = [t.number for t in live]
                    say(describe_wait(study, live, config) + f" ({finished} of {config.n_trials} trials finished)")
                time.sleep(config.poll_interval)
                continue
            waited = []
            study.optimize(body, n_trials=1, catch=(TrialFailed, NotRun))
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
        output_dir: where ``search.json`` (after every trial), ``search.png`` and
            ``search_contour.png`` are written.
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
        write_outputs(result, out, plot=True, study=study)
    return result
