"""One trial of the search protocol: choose (r, M), take a place in the budget, reuse a cached
result or wait for a lower-numbered trial with the same (r, M), else run the objective in its
own folder and turn NaN, out-of-memory and ``TrialFailed`` into a recorded failure.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import math
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from floe.search.config import SearchConfig, TrialFailed, _is_arithmetic
from floe.search.states import (
    CACHE_HIT, CACHED_FROM, FAILURE, INTERRUPTED, NOT_RUN, describe_wait, fail_stale, has_params, is_counted, is_live,
)

Reporter = Callable[[float, int], None]
"""``report(value, step)``: record an intermediate validation loss; raises ``optuna.TrialPruned``
when the pruner stops the trial and ``TrialFailed`` when the value is NaN or infinite."""
ObjectiveFn = Callable[[int, int, Reporter], float]
"""``objective(r, num_experts, report) -> validation loss`` (lower is better)."""

logger = logging.getLogger("floe.search")

TRIAL_DIR_PREFIX = "trial-"


class NotRun(Exception):
    """The study already has n_trials finished or running trials: close this one uncounted."""


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
        lower_live = [t for t in trials if t.number < me and is_live(t, config.grace_period, now)]
        blocking = [t for t in lower_live if not has_params(t) or t.params == params]
        if not blocking:
            return None
        if logged != [t.number for t in blocking]:
            logged = [t.number for t in blocking]
            (log or logger.info)(describe_wait(study, blocking, config)
                                 + f" (trial {me}, r={params.get('r')}, M={params.get('num_experts')}, waits)")
        time.sleep(config.poll_interval)
        fail_stale(study)


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


def _claim_budget(trial: optuna.Trial, config: SearchConfig) -> None:
    """At most n_trials trials may be finished or running, counted in trial-number order: raise
    ``NotRun`` (closed uncounted) when the lower-numbered ones already fill the budget."""
    now = datetime.now()
    ahead = sum(1 for t in trial.study.get_trials(deepcopy=False)
                if t.number < trial.number and (is_counted(t) or is_live(t, config.grace_period, now)))
    if ahead >= config.n_trials:
        trial.set_user_attr(NOT_RUN, f"{ahead} earlier trials already fill the budget of {config.n_trials}")
        raise NotRun()


def _reuse(trial: optuna.Trial, cached: FrozenTrial) -> float:
    """End ``trial`` as the finished trial ``cached`` with the same (r, M) ended."""
    _replay(trial, cached)
    if cached.state == TrialState.COMPLETE:
        return float(cached.value)
    if cached.state == TrialState.PRUNED:
        raise optuna.TrialPruned(f"same configuration as trial {cached.number}, which was pruned")
    reason = f"same configuration as trial {cached.number}, which failed: {cached.user_attrs.get(FAILURE)}"
    trial.set_user_attr(FAILURE, reason)
    raise TrialFailed(reason)


def _call_objective(trial: optuna.Trial, objective: ObjectiveFn, r: int, m: int,
                    catch: tuple[type[BaseException], ...], calls: list[int],
                    work_dir: Path | None) -> tuple[float | None, str | None]:
    """Run the objective in the trial's folder (removed afterwards): ``(value, None)`` or
    ``(None, failure reason)``; pruning, interrupts and unexpected errors propagate."""
    workdir = None if work_dir is None else _trial_dir(work_dir, trial.number)
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
    report = TrialReporter(trial, workdir)
    calls.append(trial.number)
    try:
        try:
            return objective(r, m, report), None
        finally:
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
    except optuna.TrialPruned:
        raise
    except TrialFailed as e:
        return None, str(e) or type(e).__name__
    except KeyboardInterrupt:
        # Closed as failed but not counted; queue the configuration so that a resumed search runs it.
        trial.set_user_attr(INTERRUPTED, "interrupted (KeyboardInterrupt / SIGTERM)")
        with contextlib.suppress(Exception):
            trial.study.enqueue_trial({"r": r, "num_experts": m})
        raise
    except Exception as e:  # noqa: BLE001 -- classified below; anything else propagates
        if _is_oom(e):
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            return None, f"out of memory: {type(e).__name__}: {first}"
        if catch and isinstance(e, catch):
            return None, f"{type(e).__name__}: {e}"
        raise


def run_trial(trial: optuna.Trial, objective: ObjectiveFn, config: SearchConfig,
              catch: tuple[type[BaseException], ...], calls: list[int],
              work_dir: Path | None = None, log: Callable[[str], None] | None = None) -> float:
    """One trial, the body ``study.optimize`` runs: choose (r, M), claim a place in the budget,
    reuse an earlier result for the same (r, M) or train it (appending the trial number to
    ``calls``). Returns the value; raises ``NotRun``, ``optuna.TrialPruned`` or ``TrialFailed``."""
    r, m = _suggest(trial, config)
    _claim_budget(trial, config)
    cached = _wait_for_turn(trial, config, log)
    if cached is not None:
        return _reuse(trial, cached)
    value, failure = _call_objective(trial, objective, r, m, catch, calls, work_dir)
    if failure is None:
        value = float(value)
        if not math.isfinite(value):
            failure = f"objective returned {value}"
    if failure is not None:
        _free_memory()  # after the except block, so the traceback no longer pins the model
        trial.set_user_attr(FAILURE, failure)
        raise TrialFailed(failure)
    return value
