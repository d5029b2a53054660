"""The trial states of the search protocol, read from an Optuna study.

Optuna knows RUNNING, COMPLETE, PRUNED and FAIL; the search adds meaning with user attributes
(why a trial failed, that it reused a cached result, that it was closed without running) and
with heartbeats (a RUNNING trial whose worker was killed). Everything here only reads a study,
except ``fail_stale``, which applies Optuna's own stale-trial rule.
"""
from __future__ import annotations

import warnings
from datetime import datetime
from typing import Sequence

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from floe.search.config import SearchConfig

# user_attrs written by the search on its trials
FAILURE = "failure"          # why a trial failed (counted as finished)
CACHE_HIT = "cache_hit"      # the result was reused from an earlier trial with the same (r, M)
CACHED_FROM = "cached_from"  # ... namely this trial number
NOT_RUN = "not_run"          # closed without running: the budget was already filled (not counted)
INTERRUPTED = "interrupted"  # stopped by KeyboardInterrupt / SIGTERM (not counted, re-queued)
# study user_attrs
SPACE_ATTR = "floe_search_space"      # the search space; a resumed or joined study must match it
CONTEXT_ATTR = "floe_search_context"  # what the objective measures (model, data, steps...)


def has_params(t: FrozenTrial) -> bool:
    """The trial has chosen its (r, M)."""
    return "r" in t.params and "num_experts" in t.params


def is_counted(t: FrozenTrial) -> bool:
    """Finished with an outcome: complete, pruned, or failed with a recorded reason. Trials a
    killed worker abandoned (failed-stale), interrupted ones and ones closed as over budget
    are not counted."""
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return t.state == TrialState.FAIL and FAILURE in t.user_attrs


def is_live(t: FrozenTrial, grace_period: float, now: datetime | None = None) -> bool:
    """A running trial that will (probably) finish: it has its parameters, or it got them
    recently. A running trial without parameters for a whole grace period was abandoned
    before its first heartbeat (heartbeats cannot detect that)."""
    if t.state != TrialState.RUNNING:
        return False
    if has_params(t) or t.datetime_start is None:
        return True
    return ((now or datetime.now()) - t.datetime_start).total_seconds() < grace_period


def heartbeat_ages(study: optuna.Study) -> dict[int, float]:
    """Seconds since the last heartbeat of each running trial (by number), read from an RDB
    storage; empty for other storages or when the storage cannot tell."""
    # Optuna has no public reader for heartbeats; this query is a nicety for the wait message.
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


def holds_results(study: optuna.Study, grace_period: float) -> bool:
    """True when the study has a finished trial, or one still running somewhere (a running trial
    whose heartbeat is older than the grace period belongs to a killed worker: not counted)."""
    ages = heartbeat_ages(study)
    return any(is_counted(t) or (is_live(t, grace_period) and ages.get(t.number, 0.0) <= grace_period)
               for t in study.get_trials(deepcopy=False))


def describe_wait(study: optuna.Study, trials: Sequence[FrozenTrial], config: SearchConfig) -> str:
    """One line: which running trials this worker waits for, and how long at most if their
    worker is dead (no heartbeat for ``grace_period`` seconds: declared abandoned, retried)."""
    ages, now, grace = heartbeat_ages(study), datetime.now(), config.grace_period
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


def fail_stale(study: optuna.Study) -> None:
    """Close the trials of killed workers (no heartbeat for the grace period) as failed-stale;
    the storage's retry callback queues their configurations again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
