"""The long-training grid's section of docs/results.md (benchmarks/grids/long.yaml), from long.jsonl.

Four questions, each from the same cells (no extra training):
1. the gap against training length: validation loss at fixed steps and at the best checkpoint, paired by
   seed against ``random`` and against ``moe_lora`` (all 30 layers), with 95 % t-intervals, and a figure;
2. best against final: test loss and ROUGE-L of the best and of the final adapter;
3. retention (forgetting): the best adapter's multiple-choice accuracy on tasks outside the mixture minus
   the base model's, and where each layer choice lands on the learning/forgetting plane (Biderman et al.
   2024), in a figure;
4. cost: s/step, training time and peak memory, and warm-up + selection as a share of one training.
Called by render_results.py; also ``python benchmarks/render_long.py`` prints the section.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from floe.pipeline.experiment import t_interval

STEPS = (40, 100, 200, 500)
BASELINES = ("random", "moe_lora")


def loss_at(row: dict[str, Any], step: int | str) -> float | None:
    """Validation loss of a cell at ``step`` (``"best"``: at its best checkpoint; ``"final"``: at its last step)."""
    if step == "best":
        return (row.get("best") or {}).get("eval_loss")
    if step == "final":
        return row["metrics"]["final_eval_loss"]
    return dict((int(s), v) for s, v in row["eval_losses"]).get(int(step))


def _by_variant(rows: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    out: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        out[r["variant"]][r["seed"]] = r
    return out


def _cell(values: list[float], fmt: str = "{:+.3f}") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0]) + " (n=1)"
    mean, lo, hi = t_interval(values)
    return f"{fmt.format(mean)} [{fmt.format(lo)}, {fmt.format(hi)}] (n={len(values)})"


def paired(groups, variant: str, baseline: str, value: Callable[[dict[str, Any]], float | None]) -> list[float]:
    """Per-seed differences value(variant) − value(baseline) over the seeds both have."""
    out = []
    for seed, r in groups.get(variant, {}).items():
        b = groups.get(baseline, {}).get(seed)
        if b is not None and value(r) is not None and value(b) is not None:
            out.append(value(r) - value(b))
    return out


def _mean(values: list[float], fmt: str = "{:.3f}") -> str:
    if not values:
        return "-"
    return fmt.format(statistics.mean(values)) + (f" ± {fmt.format(statistics.stdev(values))}" if len(values) > 1 else "")


def gap_tables(rows: list[dict[str, Any]]) -> list[str]:
    g = _by_variant(rows)
    points: list[int | str] = [*STEPS, "best"]
    head = "| variant | seeds | " + " | ".join(f"step {p}" if p != "best" else "best checkpoint" for p in points) + " |"
    lines = ["Validation loss (mean ± std over seeds):", "", head, "|---" * (2 + len(points)) + "|"]
    for v, by_seed in sorted(g.items()):
        lines.append(f"| {v} | {len(by_seed)} | " + " | ".join(
            _mean([x for x in (loss_at(r, p) for r in by_seed.values()) if x is not None]) for p in points) + " |")
    for base in BASELINES:
        if base not in g:
            continue
        lines += ["", f"Paired by seed against `{base}` (Δ validation loss, 95 % t-interval; below 0 = better than {base}):",
                  "", head, "|---" * (2 + len(points)) + "|"]
        for v in sorted(g):
            if v == base:
                continue
            lines.append(f"| {v} | {len(g[v])} | " + " | ".join(
                _cell(paired(g, v, base, lambda r, p=p: loss_at(r, p))) for p in points) + " |")
    return lines + [""]


def best_final_table(rows: list[dict[str, Any]]) -> list[str]:
    g = _by_variant(rows)
    lines = ["| variant | best step | test loss (best) | test loss (final) | ROUGE-L (best) | ROUGE-L (final) | "
             "Δ test loss vs random (best) | Δ ROUGE-L vs random (best) |", "|---" * 8 + "|"]

    def best(metric):
        return lambda r: ((r.get("best") or {}).get("scores") or {}).get(metric)

    def final(metric):
        return lambda r: r["metrics"].get(metric)

    for v, by_seed in sorted(g.items()):
        rs = list(by_seed.values())
        cells = [v, _mean([float((r.get("best") or {}).get("step")) for r in rs if r.get("best")], "{:.0f}")]
        for metric in ("test_loss", "rouge_l"):
            cells += [_mean([x for x in map(best(metric), rs) if x is not None]),
                      _mean([x for x in map(final(metric), rs) if x is not None])]
        cells += ["-" if v == "random" else _cell(paired(g, v, "random", best(m))) for m in ("test_loss", "rouge_l")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _delta(r: dict[str, Any], task: str | None = None) -> float | None:
    d = (r.get("retention") or {}).get("delta")
    if d is None:
        return None
    return d["accuracy"] if task is None else d["per_task"].get(task)


def retention_table(rows: list[dict[str, Any]]) -> list[str]:
    g = _by_variant(rows)
    with_ret = [r for r in rows if r.get("retention")]
    if not with_ret:
        return ["No cell with retention yet.", ""]
    base = with_ret[0]["retention"]["base"]
    tasks = sorted(base["per_task"])
    lines = ["Base model (zero-shot, summed option log-likelihood): " + ", ".join(
        f"{t} {100 * base['per_task'][t]['accuracy']:.1f} % (chance {100 * base['per_task'][t]['chance']:.1f} %, "
        f"n = {base['per_task'][t]['examples']})" for t in tasks)
        + f"; macro {100 * base['accuracy']:.1f} %.", "",
        "Δ accuracy of each cell's best adapter against the base model, in points (mean over seeds with its 95 % "
        "t-interval; below 0 = forgetting); the last column pairs the macro Δ by seed against `random`:", "",
        "| variant | seeds | macro Δ | " + " | ".join(tasks) + " | macro Δ vs random |", "|---" * (4 + len(tasks)) + "|"]
    for v, by_seed in sorted(g.items()):
        rs = [r for r in by_seed.values() if r.get("retention")]
        if not rs:
            continue
        cells = [v, str(len(rs)), _cell([100 * _delta(r) for r in rs], "{:+.1f}")]
        cells += [_cell([100 * _delta(r, t) for r in rs if _delta(r, t) is not None], "{:+.1f}") for t in tasks]
        cells.append("-" if v == "random" else _cell([100 * d for d in paired(g, v, "random", _delta)], "{:+.1f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def cost_table(rows: list[dict[str, Any]]) -> list[str]:
    g = _by_variant(rows)
    full = [r["train_seconds"] for r in g.get("moe_lora", {}).values()]
    lines = ["| variant | steps | s/step | training s | peak MiB (training stage) | warm-up + selection s | "
             "warm-up + selection / its own training | training / full-layer training |", "|---" * 8 + "|"]
    for v, by_seed in sorted(g.items()):
        rs = list(by_seed.values())
        pre = [sum(s["seconds"] for k, s in r["stages"].items() if k in ("warmup", "select") and not s["cached"])
               for r in rs]
        has_pre = any(k in ("warmup", "select") for r in rs for k in r["stages"])
        lines.append("| " + " | ".join([
            v, _mean([float(r["steps"]) for r in rs], "{:.0f}"), _mean([r["seconds_per_step"] for r in rs], "{:.2f}"),
            _mean([r["train_seconds"] for r in rs], "{:.0f}"),
            _mean([r["peak_memory_mb"] for r in rs if r.get("peak_memory_mb")], "{:.0f}"),
            _mean(pre, "{:.0f}") if has_pre else "-",
            _mean([p / r["train_seconds"] for p, r in zip(pre, rs)], "{:.3f}") if has_pre else "-",
            _mean([r["train_seconds"] / statistics.mean(full) for r in rs], "{:.2f}") if full else "-"]) + " |")
    return lines + [""]


def plot_gap(rows: list[dict[str, Any]], path: Path) -> bool:
    """Paired validation-loss gap (variant − baseline) against steps, one panel per baseline."""
    import matplotlib.pyplot as plt

    g = _by_variant(rows)
    bases = [b for b in BASELINES if b in g]
    if not bases or len(g) < 2:
        return False
    fig, axes = plt.subplots(1, len(bases), figsize=(6 * len(bases), 4), squeeze=False)
    for ax, base in zip(axes[0], bases):
        for v in sorted(g):
            if v == base:
                continue
            steps = sorted({int(s) for r in g[v].values() for s, _ in r["eval_losses"] if s > 0})
            xs, means, los, his = [], [], [], []
            for s in steps:
                d = paired(g, v, base, lambda r, s=s: loss_at(r, s))
                if len(d) >= 1:
                    m, lo, hi = t_interval(d) if len(d) > 1 else (d[0], d[0], d[0])
                    xs.append(s), means.append(m), los.append(lo), his.append(hi)
            if xs:
                line, = ax.plot(xs, means, label=v)
                ax.fill_between(xs, los, his, alpha=0.15, color=line.get_color())
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xlabel="optimizer step", ylabel=f"Δ validation loss vs {base}", title=f"paired gap against {base}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_learning_forgetting(rows: list[dict[str, Any]], path: Path) -> bool:
    """In-domain learning (best validation loss) against forgetting (Δ retention accuracy), per cell and mean."""
    import matplotlib.pyplot as plt

    g = _by_variant(rows)
    pts = {v: [(loss_at(r, "best"), 100 * _delta(r)) for r in by_seed.values()
               if r.get("retention") and loss_at(r, "best") is not None] for v, by_seed in g.items()}
    pts = {v: p for v, p in pts.items() if p}
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for v, p in sorted(pts.items()):
        xs, ys = zip(*p)
        sc = ax.scatter(xs, ys, s=14, alpha=0.5)
        ax.errorbar(statistics.mean(xs), statistics.mean(ys), fmt="o", ms=7, color=sc.get_facecolor()[0], label=v,
                    xerr=statistics.stdev(xs) if len(xs) > 1 else None, yerr=statistics.stdev(ys) if len(ys) > 1 else None)
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel="best validation loss (in-domain; lower = learned more)",
           ylabel="Δ retention accuracy vs base (points; below 0 = forgot)", title="learning against forgetting")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def section(rows: list[dict[str, Any]], n_cells: int, figs: Path) -> list[str]:
    lines = ["## At a realistic training length (the long grid)", "",
             "`benchmarks/grids/long.yaml`: the Natural-Instructions mixture, 2,555 training examples (100 per task "
             "before the over-long ones are skipped), one epoch (639 steps of 4), validation loss every 20 steps, "
             "the adapter of the lowest validation loss kept and evaluated beside the final one, k = 8, float32 "
             "(bf16 autocast is emulated on these CPUs: docs/benchmarks.md). Reproduce: `floe experiment "
             "benchmarks/grids/long.yaml` (resumes; many hours on 2 cores).", "",
             f"Progress: {len(rows)} of {n_cells} cells.", ""]
    if not rows:
        return lines + ["No cell has finished yet.", ""]
    lines += ["### The gap against training length", "", *gap_tables(rows)]
    if plot_gap(rows, figs / "results_long_gap.png"):
        lines += ["![paired gap against steps](figures/results_long_gap.png)", ""]
    lines += ["### Best and final checkpoint on the test split", "", *best_final_table(rows),
              "### Retention: what each layer choice forgets", "", *retention_table(rows)]
    if plot_learning_forgetting(rows, figs / "results_long_forgetting.png"):
        lines += ["![learning against forgetting](figures/results_long_forgetting.png)", ""]
    lines += ["### Cost at this length", "",
              "From the cells themselves, which ran beside other work on the 2 cores (the s/step and training "
              "seconds are therefore noisy; a measurement alone is `benchmarks/pipeline_cost.py`):", "",
              *cost_table(rows)]
    return lines


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from render_results import _rows

    rows, n = _rows("long")
    print("\n".join(section(rows, n, Path("/tmp"))))
