"""Search of the LoRA rank r and the number of experts M by Bayesian optimisation (paper §3.4).

``search_rank(objective, SearchConfig(...), storage=..., study_name=..., output_dir=...)``
runs (one worker of) an Optuna TPE study; ``make_training_objective(...)`` builds the
objective FLoE uses: validation loss after a short MoE-LoRA training run.
"""
from __future__ import annotations

from typing import Any

from floe.search.config import SearchConfig, SearchError, TrialFailed
from floe.search.report import SearchResult, TrialRecord, format_table, plot_contour, plot_trials, write_json
from floe.search.storage import DEFAULT_STUDY_NAME, default_storage_url, open_storage, open_study
from floe.search.study import search_rank
from floe.search.trial import ObjectiveFn, Reporter

__all__ = [
    "DEFAULT_STUDY_NAME", "ObjectiveFn", "Reporter", "SearchConfig", "SearchError", "SearchResult",
    "TrialFailed", "TrialRecord", "default_storage_url", "format_table",
    "make_training_objective", "open_storage", "open_study", "plot_contour", "plot_trials", "search_rank",
    "write_json",
]


def __getattr__(name: str) -> Any:
    # The training objective needs torch; the search core does not (search workers that only
    # coordinate, and the tests' subprocess workers, start faster without it).
    if name == "make_training_objective":
        from floe.search import objective

        return getattr(objective, name)
    raise AttributeError(f"module 'floe.search' has no attribute {name!r}")
