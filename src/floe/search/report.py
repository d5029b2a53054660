"""Output of a rank / expert search: trial records, ``search.json``, the figures and a table.

Pure output: it reads a study (or records) and writes files; it runs nothing.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from floe.io import atomic_file, atomic_write_text
from floe.search.config import SearchConfig
from floe.search.states import (
    CACHE_HIT, CACHED_FROM, CONTEXT_ATTR, FAILURE, INTERRUPTED, NOT_RUN, SPACE_ATTR, is_counted,
)

JSON_NAME = "search.json"
PLOT_NAME = "search.png"
CONTOUR_NAME = "search_contour.png"


@dataclass
class TrialRecord:
    number: int
    r: int | None
    num_experts: int | None
    value: float | None
    """Final validation loss (COMPLETE trials only)."""
    state: str
    counted: bool
    duration_s: float | None
    cache_hit: bool = False
    cached_from: int | None = None
    failure: str | None = None
    note: str | None = None
    last_step: int | None = None
    last_value: float | None = None
    """Last reported intermediate validation loss (where a pruned trial stopped)."""
    intermediate: dict[int, float] = field(default_factory=dict)


def _note(t: FrozenTrial) -> str | None:
    if NOT_RUN in t.user_attrs:
        return f"not run: {t.user_attrs[NOT_RUN]}"
    if INTERRUPTED in t.user_attrs:
        return str(t.user_attrs[INTERRUPTED])
    if t.state == TrialState.FAIL and FAILURE not in t.user_attrs:
        fail = t.system_attrs.get("fail_reason")
        return f"error: {fail}" if fail else "abandoned: its worker stopped before finishing it"
    if "failed_trial" in t.system_attrs:
        return f"retry of abandoned trial {t.system_attrs['failed_trial']}"
    return None


def trial_record(t: FrozenTrial) -> TrialRecord:
    duration = None
    if t.datetime_start is not None and t.datetime_complete is not None:
        duration = (t.datetime_complete - t.datetime_start).total_seconds()
    inter = {int(k): float(v) for k, v in sorted(t.intermediate_values.items())}
    last_step = max(inter) if inter else None
    return TrialRecord(
        number=t.number, r=t.params.get("r"), num_experts=t.params.get("num_experts"),
        value=float(t.value) if t.state == TrialState.COMPLETE and t.value is not None else None,
        state=t.state.name, counted=is_counted(t), duration_s=duration,
        cache_hit=bool(t.user_attrs.get(CACHE_HIT, False)), cached_from=t.user_attrs.get(CACHED_FROM),
        failure=t.user_attrs.get(FAILURE), note=_note(t), last_step=last_step,
        last_value=inter[last_step] if inter else None, intermediate=inter,
    )


@dataclass
class SearchResult:
    study_name: str
    storage: str
    search_space: dict[str, Any]
    n_trials: int
    """Requested number of finished trials."""
    trials: list[TrialRecord]
    config: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    worker_calls: list[int] = field(default_factory=list)
    """Trials whose objective this process ran (not saved)."""

    @property
    def finished(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.counted]

    @property
    def best(self) -> TrialRecord | None:
        done = [t for t in self.trials if t.state == "COMPLETE" and t.value is not None]
        return min(done, key=lambda t: (t.value, t.number)) if done else None

    def summary(self) -> dict[str, Any]:
        fin = self.finished
        return {
            "n_finished": len(fin),
            "n_complete": sum(t.state == "COMPLETE" for t in fin),
            "n_pruned": sum(t.state == "PRUNED" for t in fin),
            "n_failed": sum(t.state == "FAIL" for t in fin),
            "n_cache_hits": sum(t.cache_hit for t in fin),
            "n_trained": sum(not t.cache_hit for t in fin),
            "n_not_counted": len(self.trials) - len(fin),
        }

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "best": None if best is None else {"r": best.r, "num_experts": best.num_experts,
                                               "value": best.value, "trial": best.number},
            "study_name": self.study_name,
            "storage": self.storage,
            "search_space": self.search_space,
            "n_trials_requested": self.n_trials,
            **self.summary(),
            "config": self.config,
            "context": self.context,
            "trials": [asdict(t) for t in self.trials],
        }


def collect_result(study: optuna.Study, config: SearchConfig, storage_label: str) -> SearchResult:
    trials = [trial_record(t) for t in study.get_trials(deepcopy=False)]
    return SearchResult(
        study_name=study.study_name, storage=storage_label,
        search_space=study.user_attrs.get(SPACE_ATTR, config.search_space()),
        n_trials=config.n_trials, trials=trials, config=config.to_dict(),
        context=study.user_attrs.get(CONTEXT_ATTR, {}) or {},
    )



def write_json(result: SearchResult, path: str | Path) -> Path:
    path = Path(path)
    text = json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n"
    atomic_write_text(path, text)
    return path


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_trials(result: SearchResult, path: str | Path) -> Path:
    """Trial value vs trial number with the running best (the paper's Fig. 9).

    Drawn by hand rather than with ``optuna.visualization.matplotlib.plot_optimization_history``:
    that plot shows complete trials only, and this one also places pruned trials at their last
    reported loss, cache hits hollow and failures at the top; it needs only the records, so a
    ``search.json`` can be re-plotted without the study.
    """
    plt = _pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(9.5, 4.2), dpi=120)
    done = [t for t in result.trials if t.state == "COMPLETE" and t.value is not None]
    fresh = [t for t in done if not t.cache_hit]
    hits = [t for t in done if t.cache_hit]
    pruned = [t for t in result.trials if t.state == "PRUNED" and t.last_value is not None]
    failed = [t for t in result.trials if t.state == "FAIL" and t.counted]
    ax.scatter([t.number for t in fresh], [t.value for t in fresh], s=22, color="tab:blue", label="trial value", zorder=3)
    if hits:
        ax.scatter([t.number for t in hits], [t.value for t in hits], s=22, facecolors="none",
                   edgecolors="tab:blue", label="cached (same r, M)", zorder=3)
    if pruned:
        ax.scatter([t.number for t in pruned], [t.last_value for t in pruned], marker="x", s=22, color="0.55",
                   label="pruned (last reported)", zorder=2)
    if done:
        xs, ys, best = [], [], float("inf")
        for t in sorted(done, key=lambda t: t.number):
            best = min(best, t.value)
            xs.append(t.number)
            ys.append(best)
        last = max(t.number for t in result.trials)
        ax.step(xs + [last], ys + [ys[-1]], where="post", color="tab:red", lw=1.6, label="best so far", zorder=4)
        b = result.best
        ax.scatter([b.number], [b.value], marker="*", s=140, color="tab:red", zorder=5,
                   label=f"best: r={b.r}, M={b.num_experts}, {b.value:.4f} (trial {b.number})")
    if failed:
        ymax = max([t.value for t in done] + [t.last_value for t in pruned], default=1.0)
        ax.scatter([t.number for t in failed], [ymax] * len(failed), marker="v", s=26, color="tab:orange",
                   label="failed", zorder=3)
    ax.set_xlabel("trial number")
    ax.set_ylabel("validation loss")
    ax.set_title(f"Search of r and M: trial value vs trial ({len(result.finished)} trials)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    atomic_file(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def plot_contour(study: optuna.Study, path: str | Path) -> Path | None:
    """Validation loss over (r, M), interpolated between the complete trials: Optuna's own
    contour plot. None (nothing written) until the complete trials vary both r and M."""
    import warnings

    from optuna.visualization import matplotlib as optuna_plots

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if any(len({t.params.get(k) for t in done}) < 2 for k in ("r", "num_experts")):
        return None
    plt = _pyplot()
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna_plots.plot_contour(study, params=["r", "num_experts"], target_name="validation loss")
    ax.set_title(f"Validation loss over (r, M): {len(done)} complete trials")
    atomic_file(path, lambda tmp: ax.figure.savefig(tmp, format="png"))
    plt.close(ax.figure)
    return path


def write_outputs(result: SearchResult, output_dir: str | Path, plot: bool = True,
                  study: optuna.Study | None = None) -> dict[str, Path]:
    """Write ``search.json`` and, with ``plot``, ``search.png`` and (given the study, once the
    complete trials vary both r and M) ``search_contour.png``; returns the paths written."""
    out = Path(output_dir)
    paths = {"json": write_json(result, out / JSON_NAME)}
    if plot:
        paths["plot"] = plot_trials(result, out / PLOT_NAME)
        contour = plot_contour(study, out / CONTOUR_NAME) if study is not None else None
        if contour is not None:
            paths["contour"] = contour
    return paths


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def format_trial(t: TrialRecord) -> str:
    """One line per trial: number, r, M, value, state, duration, note."""
    if t.state == "COMPLETE":
        note = f"cached from trial {t.cached_from}" if t.cache_hit else (t.note or "")
        value = _fmt(t.value)
    elif t.state == "PRUNED":
        note = (f"cached from trial {t.cached_from}" if t.cache_hit
                else f"pruned at step {t.last_step}" if t.last_step is not None else "pruned")
        value = _fmt(t.last_value) + "*" if t.last_value is not None else "-"
    else:
        note = t.failure or t.note or ""
        value = "-"
    dur = "-" if t.duration_s is None else f"{t.duration_s:.1f}s"
    return (f"{t.number:>5}  {t.r if t.r is not None else '-':>4}  {t.num_experts if t.num_experts is not None else '-':>3}  "
            f"{value:>10}  {t.state.lower():<9} {dur:>8}  {note}").rstrip()


def format_table(result: SearchResult) -> str:
    """The readable summary printed at the end of a search."""
    lines = [f"{'trial':>5}  {'r':>4}  {'M':>3}  {'val loss':>10}  {'state':<9} {'time':>8}  note",
             "-" * 72]
    lines += [format_trial(t) for t in result.trials]
    s = result.summary()
    lines.append("-" * 72)
    lines.append(f"{s['n_finished']}/{result.n_trials} trials finished: {s['n_complete']} complete "
                 f"({s['n_cache_hits']} cached), {s['n_pruned']} pruned, {s['n_failed']} failed; "
                 f"{s['n_trained']} configurations trained" + (
                     f"; {s['n_not_counted']} not counted (abandoned/interrupted/over budget)"
                     if s["n_not_counted"] else ""))
    b = result.best
    lines.append("best: none (no trial completed)" if b is None else
                 f"best: r = {b.r}, M = {b.num_experts}, validation loss {b.value:.4f} (trial {b.number})")
    if any(t.state == "PRUNED" for t in result.trials):
        lines.append("* last reported intermediate value of a pruned trial")
    return "\n".join(lines)
