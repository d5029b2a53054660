"""Render docs/results.md (and its figures) from the committed results files.

    python benchmarks/render_results.py          # re-renders docs/results.md and docs/figures/results_*.png

Reads benchmarks/results/table2.jsonl, table3.jsonl and long.jsonl (the `floe experiment` grids; the long
grid's section is render_long.py),
equal_time.jsonl (FLoE at full-layer training time over seeds), reruns.jsonl (`floe experiment GRID
--rerun CELL`), pipeline_cost*.json (one per seed) and inference_latency.json (the two benchmarks of that
name) — whatever of them exists — and writes every table and figure
from them, so the page never holds a number the files do not. Grids still running are rendered
as they stand, with the count of finished cells.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from floe.pipeline.experiment import PAIRED, cells, finished, load_grid, summarise, t_interval

import sys  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # render_long beside this file, however it is loaded
import render_long  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FULL_LAYER = ("moe_lora", "lora")

# How the selection defaults are decided from these tables; written down (commit 'results: the rule
# the selection defaults are set by') before the single-domain cells and Table 3 came in.
DECISION_RULE = [
    "**How the defaults are decided** (fixed before the single-domain cells and Table 3 were run):",
    "",
    ("- `mask_rule`, `refine`, `taylor`, `fisher`: a setting leaves the paper's option only for an option whose "
     "validation loss against FLoE's default, paired by seed and pooled over both data sets, has a 95 % interval "
     "below 0, and which neither data set shows worse on test loss or ROUGE-L. Of several such options, the "
     "lower pooled mean wins. Options that chose the same layers as the default keep the paper's option."),
    ("- `scorer` stays `floe`, the method this library implements; where an ablation scorer does better, the "
     "README says so and how to switch (`select.config.scorer`)."),
    ("- `scorer`, the selectors from published anchors (`lora_drop`, `ablation`, `ablation_greedy`, `spectrum`, "
     "`cka`, `alpha`; added to the rule on 2026-12-03, before any of their cells ran): one becomes the default "
     "selector only if its validation loss against `random`, paired by seed and pooled over both data sets, has "
     "a 95 % interval below 0, and on neither data set is it shown worse than `random` on test loss (interval "
     "above 0) or ROUGE-L (interval below 0). Of several, the lower pooled mean wins. The goal reported against: "
     "beat random-8 by at least half of the random-8 → all-30 gap on the mixture (≥ 0.10 nats of validation loss)."),
    ("- `k`: the smallest of 4, 8 and 16 at which FLoE's validation loss is not shown worse than full-layer "
     "MoE-LoRA's (Table 3, paired by seed); if none is, k stays 8 (the paper's quarter of the layers) and "
     "Table 3 gives the loss paid at each k."),
]


def _rows(grid_name: str) -> tuple[list[dict[str, Any]], int]:
    grid = load_grid(ROOT / "benchmarks" / "grids" / f"{grid_name}.yaml")
    path = ROOT / grid.results_path
    rows = list(finished(path).values())
    return rows, len(cells(grid))


def selection_variant(grid_name: str) -> str:
    """The grid's variant that runs FLoE's selection (Table 3 and the equal-time grid run the defaults the
    rule decided under that variant's Table 2 name, so their k = 8 and 40-step counterparts are Table 2's)."""
    grid = load_grid(ROOT / "benchmarks" / "grids" / f"{grid_name}.yaml")
    return next(name for name, settings in grid.variants.items() if settings.get("method") == "floe")


def _paired(rows: list[dict[str, Any]], data: str | None, k: int, metric: str, baseline: str = "random"):
    """(variant, mean Δ, lo, hi, n) of each variant against ``baseline`` on the same seed and data set
    (``data`` None: every data set pooled)."""
    by: dict[str, dict[tuple[str, int], float]] = defaultdict(dict)
    for r in rows:  # full-layer methods (their k is the layer count) are compared at k too
        if (data is None or r["data"] == data) and (r["k"] == k or r["method"] in FULL_LAYER) \
                and r["metrics"].get(metric) is not None:
            by[r["variant"]][(r["data"], r["seed"])] = r["metrics"][metric]
    base = by.get(baseline, {})
    out = []
    for variant, vals in sorted(by.items()):
        diffs = [v - base[key] for key, v in vals.items() if key in base]
        if variant != baseline and diffs:
            out.append((variant, *t_interval(diffs), len(diffs)))
    return out


def _per_data_set(rows: list[dict[str, Any]], path: Path, draw) -> bool:
    """One panel per data set, ``draw(ax, data)`` filling each; False (no file) when there are no rows."""
    datas = sorted({r["data"] for r in rows})
    if not datas:
        return False
    fig, axes = plt.subplots(1, len(datas), figsize=(6 * len(datas), 4.5), squeeze=False)
    for ax, data in zip(axes[0], datas):
        draw(ax, data)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_paired(rows: list[dict[str, Any]], path: Path) -> bool:
    def draw(ax, data: str) -> None:
        res = _paired(rows, data, 8, "test_loss")
        for i, (variant, mean, lo, hi, n) in enumerate(res):
            ax.plot([mean], [i], "o", color="tab:blue")
            if n > 1:
                ax.plot([lo, hi], [i, i], color="tab:blue")
        ax.axvline(0, color="grey", lw=1)
        ax.set_yticks(range(len(res)), [f"{v} (n={n})" for v, *_, n in res])
        ax.set_xlabel("Δ test loss vs random, same seed (lower is better)\nbars: 95% t-interval", fontsize=9)
        ax.set_title(data.replace("bigbench:", ""), fontsize=10)

    return _per_data_set(rows, path, draw)


def plot_curves(rows: list[dict[str, Any]], path: Path) -> bool:
    def draw(ax, data: str) -> None:
        by: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if r["data"] == data:
                for step, loss in r["eval_losses"]:
                    by[r["variant"]][step].append(loss)
        for variant, steps in sorted(by.items()):
            xs = sorted(steps)
            ax.plot(xs, [statistics.mean(steps[x]) for x in xs], marker="o", ms=3, label=variant,
                    ls="-" if variant.startswith(("floe", "scorer")) else "--")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation loss (mean over seeds)")
        ax.set_title(data.replace("bigbench:", ""), fontsize=10)
        ax.legend(fontsize=7, ncol=2)

    return _per_data_set(rows, path, draw)


def plot_vs_k(rows: list[dict[str, Any]], path: Path) -> bool:
    by: dict[str, dict[int, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[r["variant"]][r["k"]].append(r)
    if not any(len(ks) > 1 for ks in by.values()):
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, ("test_loss", "rouge_l")):
        for method, ks in sorted(by.items()):
            xs = sorted(ks)
            vals = [[r["metrics"][metric] for r in ks[k]] for k in xs]
            ax.errorbar(xs, [statistics.mean(v) for v in vals],
                        yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in vals], marker="o", capsize=3,
                        label=method)
        ax.set_xlabel("adapted layers k (of 30)")
        ax.set_ylabel(metric.replace("_", " ") + " (mean ± std over seeds)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _verdict(mean: float, lo: float, hi: float, n: int, lower_is_better: bool) -> str:
    if n < 2:
        return f"{mean:+.4f} (1 seed)"
    if mean == lo == hi == 0:
        return "0 at every seed (same layers, same training)"
    if lo > 0 or hi < 0:
        word = "**better**" if (mean < 0) == lower_is_better else "**worse**"
    else:
        word = "no difference shown"
    return f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}] {word}"


def _verdict_table(rows: list[dict[str, Any]], data: str | None, baseline: str, only: tuple[str, ...] = ()) -> list[str]:
    per_metric = {m: {v: rest for v, *rest in _paired(rows, data, 8, m, baseline)} for m in PAIRED}
    variants = [v for v in sorted(set().union(*per_metric.values())) if not only or v in only]
    if not variants:
        return []
    out = [f"| variant − {baseline} | " + " | ".join(f"Δ {m}" for m in PAIRED) + " |", "|---" * (1 + len(PAIRED)) + "|"]
    for v in variants:
        cells = [_verdict(*per_metric[m][v], lower_is_better=m != "rouge_l") if v in per_metric[m] else "-"
                 for m in PAIRED]
        out.append(f"| {v} | " + " | ".join(cells) + " |")
    return out + [""]


def _reading(rows: list[dict[str, Any]]) -> list[str]:
    """Facts only: every variant against random at k = 8, paired by seed, and whether the 95% interval
    excludes 0 ("better"/"worse") or not ("no difference shown")."""
    out = []
    for data in sorted({r["data"] for r in rows}):
        table = _verdict_table(rows, data, "random")
        if table:
            out += [f"**{data.replace('bigbench:', '')}** (k = 8; the full-layer references moe_lora and lora "
                    "against the same random-8 cells):", "", *table]
    return out


SELECTION_OPTIONS = ("floe_kwon", "floe_fisher_top", "floe_refine_none", "floe_taylor_mask", "floe_fisher_batch",
                     "scorer_fisher", "scorer_taylor", "scorer_grad_norm")


def _against_default(rows: list[dict[str, Any]]) -> list[str]:
    """Each selection setting against FLoE's default (variant floe), paired by seed and data set: the
    evidence for the defaults."""
    out = []
    datas = sorted({r["data"] for r in rows})
    for data in datas + ([None] if len(datas) > 1 else []):
        table = _verdict_table(rows, data, "floe", SELECTION_OPTIONS)
        if table:
            name = "both data sets pooled (pairs = seed × data set)" if data is None else data.replace("bigbench:", "")
            out += [f"**{name}**:", "", *table]
    return out


# The library options each Table 2 variant stands for (benchmarks/grids/table2.yaml).
OPTION_VARIANTS = {"mask_rule": {"kwon": "floe_kwon", "fisher_top": "floe_fisher_top"},
                   "refine": {"none": "floe_refine_none"}, "taylor": {"mask": "floe_taylor_mask"},
                   "fisher": {"batch": "floe_fisher_batch"}}
PAPER_OPTIONS = {"mask_rule": "paper", "refine": "paper", "taylor": "weights", "fisher": "example"}


def decide_settings(rows: list[dict[str, Any]], seeds: int = 3) -> dict[str, tuple[str, str]]:
    """DECISION_RULE applied to Table 2 rows: setting -> (option, why). "pending" until the default
    and every option have ``seeds`` seeds on each data set."""
    datas = sorted({r["data"] for r in rows})
    have = defaultdict(set)
    for r in rows:
        if r["k"] == 8:
            have[(r["variant"], r["data"])].add(r["seed"])
    pooled = {v: (mean, lo, hi) for v, mean, lo, hi, n in _paired(rows, None, 8, "final_eval_loss", "floe")}
    worse_somewhere = {(d, m): {v for v, mean, lo, hi, n in _paired(rows, d, 8, m, "floe")
                                if n > 1 and ((lo > 0) if m != "rouge_l" else (hi < 0))}
                       for d in datas for m in ("test_loss", "rouge_l")}
    out = {}
    for setting, options in OPTION_VARIANTS.items():
        needed = ["floe", *options.values()]
        if len(datas) < 2 or any(len(have[(v, d)]) < seeds for v in needed for d in datas):
            out[setting] = ("pending", f"not every seed of {', '.join(needed)} on both data sets yet")
            continue
        passing, why = [], []
        for option, variant in options.items():
            mean, lo, hi = pooled[variant]
            worse = [f"{m} on {d.split(':')[-1]}" for (d, m), worse_variants in worse_somewhere.items()
                     if variant in worse_variants]
            if hi < 0 and not worse:
                passing.append((mean, option))
            why.append(f"{option}: pooled Δ validation loss {mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                       + (f", worse in {', '.join(worse)}" if worse else ""))
        choice = min(passing)[1] if passing else PAPER_OPTIONS[setting]
        out[setting] = (choice, "; ".join(why))
    return out


ANCHOR_SCORERS = ("lora_drop", "ablation", "ablation_greedy", "spectrum", "cka", "alpha")
GOAL_NATS = 0.10
"""Half the random-8 → all-30 validation-loss gap on the mixture at 40 steps (0.20 nats)."""


def decide_scorer(rows: list[dict[str, Any]], seeds: int = 3) -> tuple[str, str]:
    """DECISION_RULE's anchor-scorer bullet applied to Table 2 rows: (scorer, why)."""
    datas = sorted({r["data"] for r in rows})
    have = defaultdict(set)
    for r in rows:
        if r["k"] == 8:
            have[(r["variant"], r["data"])].add(r["seed"])
    variants = {f"scorer_{s}": s for s in ANCHOR_SCORERS}
    ready = [v for v in variants if len(datas) >= 2 and all(len(have[(v, d)]) >= seeds for d in datas)]
    if not ready:
        return "floe (pending)", "no anchor scorer has every seed on both data sets yet"
    pooled = {v: (mean, lo, hi) for v, mean, lo, hi, n in _paired(rows, None, 8, "final_eval_loss", "random")}
    mixture = {v: mean for v, mean, lo, hi, n in _paired(rows, "bigbench:natural_instructions", 8,
                                                        "final_eval_loss", "random")}
    worse = {(d, m): {v for v, mean, lo, hi, n in _paired(rows, d, 8, m, "random")
                      if n > 1 and ((lo > 0) if m != "rouge_l" else (hi < 0))}
             for d in datas for m in ("test_loss", "rouge_l")}
    passing, why = [], []
    for v in ready:
        mean, lo, hi = pooled[v]
        bad = [f"{m} on {d.split(':')[-1]}" for (d, m), vs in worse.items() if v in vs]
        if hi < 0 and not bad:
            passing.append((mean, variants[v]))
        goal = "meets" if -mixture.get(v, 0.0) >= GOAL_NATS else "misses"
        why.append(f"{variants[v]}: pooled Δ validation loss vs random {mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                   + (f", worse in {', '.join(bad)}" if bad else "")
                   + f"; mixture Δ {mixture.get(v, float('nan')):+.3f} ({goal} the −{GOAL_NATS:.2f} goal)")
    pending = [variants[v] for v in variants if v not in ready]
    if pending:
        why.append(f"pending: {', '.join(pending)}")
    return (min(passing)[1] if passing else "floe"), "; ".join(why)


def _by_variant_and_k(rows: list[dict[str, Any]]) -> dict[str, dict[int, dict[tuple[str, int], dict[str, Any]]]]:
    """variant -> k -> (data, seed) -> metrics."""
    by: dict[str, dict[int, dict[tuple[str, int], dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        by[r["variant"]][r["k"]][(r["data"], r["seed"])] = r["metrics"]
    return by


def decide_k(rows: list[dict[str, Any]], variant: str = "floe", seeds: int = 3, all_k: int = 30) -> tuple[str, str]:
    """DECISION_RULE's k from Table 3 rows: the smallest of 4, 8, 16 whose validation loss is not shown
    worse than the same variant on all layers (paired by seed), else 8; "pending" until every seed is in."""
    by = _by_variant_and_k(rows)[variant]
    if any(len(by[k]) < seeds for k in (4, 8, 16, all_k)):
        return "pending", f"not every seed of {variant} at k = 4, 8, 16, {all_k} yet"
    why = []
    loss = "final_eval_loss"
    for k in (4, 8, 16):
        mean, lo, hi = t_interval([v[loss] - by[all_k][key][loss] for key, v in by[k].items() if key in by[all_k]])
        why.append(f"k = {k}: Δ validation loss vs k = {all_k} {mean:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        if lo <= 0:
            return str(k), "; ".join(why)
    return "8", "; ".join(why) + "; every k worse than all layers: the paper's 8"


def _chosen_layers(rows: list[dict[str, Any]]) -> list[str]:
    """The layers each selection variant chose, per data set and seed (sorted; 0 = bottom, 29 = top)."""
    by: dict[tuple[str, str], dict[int, list[int]]] = defaultdict(dict)
    for r in rows:
        if r["method"] == "floe" and r["layers"] is not None and r["k"] == 8:
            by[(r["data"], r["variant"])][r["seed"]] = sorted(r["layers"])
    seeds = sorted({s for v in by.values() for s in v})
    out = ["| data | variant | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---" * (2 + len(seeds)) + "|"]
    for (data, variant), layers in sorted(by.items()):
        out.append(f"| {data.replace('bigbench:', '')} | {variant} | "
                   + " | ".join(",".join(map(str, layers[s])) if s in layers else "-" for s in seeds) + " |")
    return out if by else []


def _equal_time(t2: list[dict[str, Any]], eq: list[dict[str, Any]], n_eq: int, variant: str = "floe") -> list[str]:
    """FLoE-8 at equal training time (equal_time grid, its ``variant``) against full-layer MoE-LoRA at 40 steps
    and the same variant at 40 steps, paired by seed."""
    eq = [r for r in eq if r["variant"] == variant]
    if not eq:
        return [f"Equal-time grid not run yet for `{variant}`: `floe experiment benchmarks/grids/equal_time.yaml`.",
                ""]
    full = {(r["data"], r["seed"]): r for r in t2 if r["variant"] == "moe_lora"}
    floe40 = {(r["data"], r["seed"]): r for r in t2 if r["variant"] == variant}
    out = [f"Equal time over seeds (`floe experiment benchmarks/grids/equal_time.yaml`, {len(eq)} of {n_eq} cells): "
           "FLoE-8 trained for as many steps as fit in full-layer MoE-LoRA's 40-step time, against full-layer "
           "MoE-LoRA (40 steps) and FLoE-8 (40 steps) of the same seed from the Table 2 grid.", "",
           "| reference | metric | n | FLoE-8 equal time − reference (95% CI) |", "|---|---|---|---|"]
    for name, ref in (("moe_lora, 40 steps", full), (f"{variant}, 40 steps", floe40)):
        for m in ("final_eval_loss", "test_loss", "rouge_l"):
            diffs = [r["metrics"][m] - ref[(r["data"], r["seed"])]["metrics"][m] for r in eq
                     if (r["data"], r["seed"]) in ref and r["metrics"].get(m) is not None]
            if diffs:
                mean, lo, hi = t_interval(diffs)
                out.append(f"| {name} | {m} | {len(diffs)} | "
                           + _verdict(mean, lo, hi, len(diffs), lower_is_better=m != "rouge_l") + " |")
    steps = sorted({r["steps"] for r in eq})
    out += ["", f"Steps: {', '.join(map(str, steps))}; validation loss per seed: "
            + ", ".join(f"seed {r['seed']} {r['metrics']['final_eval_loss']:.4f}" for r in sorted(eq, key=lambda r: r["seed"]))
            + ".", ""]
    return out


def _against_all_layers(rows: list[dict[str, Any]], all_k: int = 30) -> list[str]:
    """Each variant at k against the same variant on all layers (k = all_k), paired by seed and data set:
    the evidence for the default k."""
    out = []
    for variant, ks in sorted(_by_variant_and_k(rows).items()):
        full = ks.get(all_k, {})
        for k in sorted(k for k in ks if k != all_k):
            cells = []
            for m in PAIRED:
                diffs = [v[m] - full[key][m] for key, v in ks[k].items()
                         if key in full and v.get(m) is not None and full[key].get(m) is not None]
                cells.append(_verdict(*t_interval(diffs), len(diffs), lower_is_better=m != "rouge_l")
                             if diffs else "-")
            if any(c != "-" for c in cells):
                out.append(f"| {variant} | {k} | " + " | ".join(cells) + " |")
    if not out:
        return []
    return ["| variant | k | " + " | ".join(f"Δ {m} vs k = {all_k}" for m in PAIRED) + " |",
            "|---" * (2 + len(PAIRED)) + "|", *out, ""]


def _measured(result: dict[str, Any], text_key: str) -> list[str]:
    """A benchmark's own table (as it printed it), with when and where it was measured."""
    m = result.get("machine", {})
    where = ", ".join(f"{k} {m[k]}" for k in ("cpu", "cpus_usable", "torch_threads", "gpu") if m.get(k))
    return [f"Measured {result.get('date', '?')} ({where or 'machine not recorded'}):", "", "```",
            result.get(text_key, "").rstrip(), "```"]


COST_STAGES = (("warmup", "warm-up"), ("select", "selection"), ("floe/train", "FLoE training (k = 8)"),
               ("moe_lora/train", "full-layer training (moe_lora)"))
COST_RATIOS = (("floe_train_over_full_layer", "FLoE training / full-layer, time"),
               ("floe_train_peak_over_full_layer", "FLoE training / full-layer, peak memory"),
               ("warmup_plus_select_over_full_layer", "warm-up + selection / full-layer, time"),
               ("floe_total_over_full_layer", "FLoE total / full-layer, time"))


def _mean_std(vals: list[float], fmt: str) -> str:
    return format(statistics.mean(vals), fmt) + (f" ± {format(statistics.stdev(vals), fmt)}" if len(vals) > 1 else "")


def _cost_groups(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """`pipeline_cost*.json` results grouped by their --set overrides ("" for none), so that seeds are
    averaged only over runs of the same settings."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        extra = {k: v for k, v in r["settings"]["overrides"].items() if k not in ("seed", "k", "data.source")}
        groups[" ".join(f"{k}={v}" for k, v in sorted(extra.items()))].append(r)
    return dict(sorted(groups.items()))


def _cost_over_seeds(results: list[dict[str, Any]], extra_args: str = "") -> list[str]:
    """Table 5 over the seeds measured (one `pipeline_cost*.json` per seed): mean ± std of each stage's
    seconds and peak memory, and of the ratios to full-layer training."""
    seeds = sorted(r["settings"]["seed"] for r in results)
    out = [f"Over seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))} (`python benchmarks/pipeline_cost.py "
           f"--seed S{extra_args}`, each on a quiet machine; mean ± std):", "", "| stage | seconds | peak MiB |",
           "|---|---:|---:|"]
    for key, name in COST_STAGES:
        stages = [r["stages"][key] for r in results if key in r["stages"]]
        out.append(f"| {name} | {_mean_std([s['seconds'] for s in stages], '.1f')} | "
                   f"{_mean_std([s['peak_memory_mb'] for s in stages], '.0f')} |")
    out += ["", "| ratio | mean ± std |", "|---|---:|"]
    for key, name in COST_RATIOS:
        out.append(f"| {name} | {_mean_std([r['totals'][key] for r in results], '.3f')} |")
    return out + [""]


def render(out: Path) -> Path:
    figs = out.parent / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    res = ROOT / "benchmarks" / "results"
    t2, n2 = _rows("table2")
    t3, n3 = _rows("table3")
    eq, n_eq = _rows("equal_time")
    in_t3 = {(r["variant"], r["k"], r["seed"], r["data"]) for r in t3}
    k_variant = selection_variant("table3")
    k_rows = t3 + [r for r in t2 if r["variant"] in (k_variant, "random")
                   and r["data"] == "bigbench:natural_instructions"
                   and (r["variant"], r["k"], r["seed"], r["data"]) not in in_t3]
    lines = ["# Results: does FLoE's layer selection pay off on SmolLM2-135M?", "",
             "Generated by `python benchmarks/render_results.py` from the files in `benchmarks/results/`; "
             "do not edit by hand. Set-up, sizes and the reasons for them: `benchmarks/grids/base.yaml` and "
             "docs/pipeline.md. Every cell: SmolLM2-135M-Instruct (float32, CPU), MoE-LoRA r = 8, M = 4 on the FFN "
             "projections, 40 steps of batch 4 over the same fixed training set, the same seed stream for every "
             "method; validation loss on the validation split, test loss / exact match / ROUGE-L on the test split.",
             "", f"Progress: Table 2 grid {len(t2)} of {n2} cells, Table 3 grid {len(t3)} of {n3} cells "
             f"(its k = 8 cells are Table 2's), equal-time grid {len(eq)} of {n_eq} cells.", "",
             "## Reading (k = 8, paired by seed against random)", ""]
    lines += _reading(t2) or ["No cell has its `random` counterpart (same seed and data) yet: nothing to compare."]
    lines += ["", *DECISION_RULE, "", "The rule applied to the results files as they stand:", "",
              "| setting | the paper's option | the rule's outcome | evidence |", "|---|---|---|---|"]
    decided = decide_settings(t2)
    for setting, (choice, why) in decided.items():
        lines.append(f"| `{setting}` | {PAPER_OPTIONS[setting]} | **{choice}** | {why} |")
    scorer_choice, scorer_why = decide_scorer(t2)
    lines.append(f"| `scorer` (anchors) | floe | **{scorer_choice}** | {scorer_why} |")
    k_choice, k_why = decide_k(k_rows, variant=k_variant)
    lines.append(f"| `k` | 8 | **{k_choice}** | {k_why} |")
    lines += ["", "## Table 2 analogue: layer-selection policy at k = 8 of 30", "",
              "Mean ± std over seeds; Δ = paired difference against `random` on the same seed with its 95% "
              "Student-t interval. Reproduce: `floe experiment benchmarks/grids/table2.yaml` (resumes), then "
              "`floe experiment benchmarks/grids/table2.yaml --summary`. The s/step column was measured while other "
              "work shared the machine's 2 cores: for time and memory read Table 5, measured alone.", "", summarise(t2)]
    if plot_paired(t2, figs / "results_paired.png"):
        lines += ["![paired differences against random](figures/results_paired.png)", ""]
    if plot_curves(t2, figs / "results_curves.png"):
        lines += ["Validation-loss curves (mean over seeds), so a reader can see that the methods separated "
                  "within the run:", "", "![validation loss curves](figures/results_curves.png)", ""]
    against = _against_default(t2)
    if against:
        lines += ["### Each selection setting against FLoE's default (k = 8, paired by seed)", "",
                  "The evidence for the selection defaults: one setting changed at a time from "
                  "`mask_rule: paper, refine: paper, taylor: weights, fisher: example, scorer: floe`.", "", *against]
    layers = _chosen_layers(t2)
    if layers:
        lines += ["Layers chosen at k = 8 by each selection variant (0 = bottom, 29 = top):", "", *layers, ""]
    lines += ["## Table 3 analogue: score against k", "",
              f"FLoE runs as Table 2's `{k_variant}` (the selection settings the rule decided), and `random` draws "
              "k layers afresh per seed; k = 8 is Table 2's cells, k = 30 names every layer. Reproduce: "
              "`floe experiment benchmarks/grids/table3.yaml`.", ""]
    if plot_vs_k(k_rows, figs / "results_vs_k.png"):
        lines += [summarise(k_rows), "![score against k](figures/results_vs_k.png)", ""]
        against_all = _against_all_layers(k_rows)
        if against_all:
            lines += ["Each variant at k against the same variant on all 30 layers, paired by seed (the evidence "
                      "for the default k):", "", *against_all]
    else:
        lines += ["Not run yet.", ""]
    lines += ["## Table 5 analogue: cost of each stage", "",
              "Reproduce on a quiet machine: `python benchmarks/pipeline_cost.py`.", ""]
    cost = res / "pipeline_cost.json"
    lines += (_measured(json.loads(cost.read_text()), "report") if cost.is_file() else ["Not measured yet."]) + [""]
    costs = [json.loads(p.read_text()) for p in sorted(res.glob("pipeline_cost*.json"))]
    for settings, group in _cost_groups([c for c in costs if not c.get("smoke")]).items():
        lines += [f"With `{settings}`, the selection setting the rule decided:" if settings else
                  "With the paper's selection settings (`benchmarks/grids/base.yaml`; FLoE trains the top 8 layers):",
                  ""]
        lines += _cost_over_seeds(group, f" --set {settings}" if settings else "")
    lines += _equal_time(t2, eq, n_eq, selection_variant("equal_time"))
    long_rows, n_long = _rows("long")
    lines += render_long.section(long_rows, n_long, figs)
    lines += ["## Table 4 analogue: inference latency", "",
              "Reproduce on a quiet machine: `python benchmarks/inference_latency.py`.", ""]
    lat = res / "inference_latency.json"
    lines += (_measured(json.loads(lat.read_text()), "table") if lat.is_file() else ["Not measured yet."]) + [""]
    reruns = res / "reruns.jsonl"
    lines += ["## Re-running a recorded cell", "",
              "`floe experiment GRID.yaml --rerun CELL` trains the cell again from its recorded config in a fresh "
              "folder (no cached stage) and records both validation losses.", ""]
    if reruns.is_file():
        lines += ["| cell | recorded (commit) | re-run (commit) | difference |", "|---|---:|---:|---:|"]
        for line in reruns.read_text().splitlines():
            r = json.loads(line)
            lines.append(f"| {r['cell']} | {r['recorded_final_eval_loss']:.6f} ({r.get('recorded_commit')}) | "
                         f"{r['rerun_final_eval_loss']:.6f} ({r.get('commit')}) "
                         f"| {r['difference']:+.2e} |")
    else:
        lines.append("None recorded yet.")
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=str(ROOT / "docs" / "results.md"), help="the Markdown file to write")
    args = p.parse_args(argv)
    print(f"wrote {render(Path(args.output))}")


if __name__ == "__main__":
    main()
