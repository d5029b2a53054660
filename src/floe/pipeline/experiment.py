"""``floe experiment GRID.yaml``: a resumable grid of ``floe run`` cells, one results line each.

A grid is variants × k × seeds × data sets over one base run config. Every cell is a single-method
``floe run`` (``compare: []``) whose stages live under one shared stage root, so a warm-up and a
selection are computed once per (seed, data, selection settings) and reused by every cell that
shares them. A finished cell appends one JSON line to the results file; starting the grid again
skips the cells already there (matched by the fingerprint of their config), so a grid can finish
over several sessions. ``floe experiment GRID.yaml --summary`` prints the tables at any point.
"""
from __future__ import annotations

import itertools
import json
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from floe.adapters.moe_lora.config import fingerprint_form
from floe.config import from_dict, load_yaml, merge, renamed_keys, to_dict
from floe.errors import InputError
from floe.pipeline.config import RunConfig
from floe.pipeline.stages import fingerprint
from floe.provenance import git_commit

METRICS = ("final_eval_loss", "test_loss", "exact_match", "rouge_l", "choice_accuracy")
PAIRED = ("final_eval_loss", "test_loss", "rouge_l")
"""Metrics whose paired difference against the baseline (same seed and data) the summary reports."""


@dataclass
class Grid:
    """An experiment grid (one YAML file)."""

    name: str = "grid"
    """Name of the grid; the results go to results (default benchmarks/results/<name>.jsonl)."""
    base: dict[str, Any] = field(default_factory=dict)
    """The run config every cell starts from (keys of `floe run --print-config`)."""
    base_config: str = ""
    """A YAML run config to start from instead (base then overrides it)."""
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {"floe": {"method": "floe"}})
    """Named cell settings (dotted keys), e.g. floe_kwon: {method: floe, select.config.mask_rule: kwon}."""
    k: list[int] = field(default_factory=lambda: [8])
    """Layer counts."""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Seeds (adapter init, data order, dropout, random/LISA draws)."""
    data: list[str | dict[str, Any]] = field(default_factory=lambda: ["bigbench:natural_instructions"])
    """Data sources: a source, or {source: ..., <dotted key>: value} for settings of that data set only."""
    results: str = ""
    """Results file (JSONL, committed); default benchmarks/results/<name>.jsonl."""
    run_dir: str = ""
    """Folder of the cells' runs and their shared stages; default runs/experiments/<name>."""

    @property
    def results_path(self) -> Path:
        return Path(self.results or f"benchmarks/results/{self.name}.jsonl")

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir or f"runs/experiments/{self.name}")


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *path, leaf = dotted.split(".")
    for key in path:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _data_entry(grid: Grid, entry: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(source, settings for that data set) of one entry of grid.data."""
    if isinstance(entry, str):
        return entry, {}
    settings = dict(entry)
    source = settings.pop("source", None)
    if not isinstance(source, str) or not source:
        raise InputError(f"grid {grid.name}: data entry {entry!r} needs a source, e.g. "
                         "{source: 'bigbench:natural_instructions', data.max_per_task: null}")
    return source, settings


def cells(grid: Grid) -> list[tuple[str, str, RunConfig]]:
    """(cell id, variant, run config) for every distinct cell, in a stable order (k ignored where the method has none)."""
    from floe.pipeline.config import METHODS

    base = merge(renamed_keys(RunConfig, load_yaml(grid.base_config) if grid.base_config else {}),
                 renamed_keys(RunConfig, grid.base))
    out, seen = [], set()
    for entry, seed, k, (variant, settings) in itertools.product(grid.data, grid.seeds, grid.k, grid.variants.items()):
        data, data_settings = _data_entry(grid, entry)
        over: dict[str, Any] = {}
        for key, value in {**data_settings, **settings}.items():
            _set(over, key, value)
        tree = merge(json.loads(json.dumps(base)), renamed_keys(RunConfig, over))
        _set(tree, "data.source", data)
        tree.update(seed=seed, k=k, compare=[])
        method = tree.get("method", "floe")
        if method not in METHODS:
            raise InputError(f"grid {grid.name}, variant {variant}: unknown method {method!r}")
        k_label = f"k{k}" if METHODS[method][0] else "all"
        cell = f"{variant}-{k_label}-s{seed}-{data.split(':')[-1]}"
        if cell in seen:
            continue
        seen.add(cell)
        tree["output_dir"] = str(grid.run_path / cell)
        tree["stage_root"] = str(grid.run_path / "stages")
        out.append((cell, variant, from_dict(RunConfig, tree, where=f"grid {grid.name} cell {cell}")))
    return out


# RunConfig fields (dotted paths) added after the first results were recorded: left out of a cell's
# fingerprint while they hold their default, so the recorded cells still match the grid that made them.
# A field added to any config section a cell records belongs here.
LATER_FIELDS = ("virtual_tokens", "fim_passes", "search", "retention", "train.keep_best", "select.config.cost_weight")


def _drop_default(tree: dict[str, Any], defaults: dict[str, Any], dotted: str) -> None:
    *path, leaf = dotted.split(".")
    for key in path:
        tree, defaults = tree.get(key, {}), defaults.get(key, {})
    if leaf in tree and leaf in defaults and tree[leaf] == defaults[leaf]:
        tree.pop(leaf)


def cell_fingerprint(cfg: RunConfig) -> str:
    tree = to_dict(cfg)
    for old, new in RunConfig.RENAMED.items():  # renamed after the first results: fingerprinted by the old name
        tree[old] = tree.pop(new)
    tree["adapter"] = fingerprint_form(tree["adapter"])
    for key in ("output_dir", "stage_root"):
        tree.pop(key)
    defaults = to_dict(RunConfig())
    for key in LATER_FIELDS:
        _drop_default(tree, defaults, key)
    for key in ("progress_bar", "report_to"):
        tree["train"].pop(key, None)
    tree["eval"].pop("progress", None)
    return fingerprint(tree)


def finished(path: Path) -> dict[str, dict[str, Any]]:
    """Finished cells of a results file by fingerprint (a cut last line is ignored)."""
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[row["fingerprint"]] = row
    return out


def _append(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # one write of one line: a kill leaves at most a cut last line
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()


def result_row(grid: Grid, cell: str, variant: str, cfg: RunConfig, summary: dict[str, Any],
               seconds: float) -> dict[str, Any]:
    m = summary["methods"][cfg.method]
    stages = summary["stages"]
    return {"grid": grid.name, "cell": cell, "variant": variant, "fingerprint": cell_fingerprint(cfg),
            "method": cfg.method, "k": cfg.k if m["layers"] is not None or cfg.method == "lisa" else summary["num_layers"],
            "seed": cfg.seed, "data": cfg.data.source, "layers": m["layers"],
            "metrics": {"final_eval_loss": m["final_eval_loss"], **m["scores"]},
            "eval_losses": m["eval_losses"], "trainable_params": m["trainable_params"],
            "trainable_share": m["trainable_share"], "steps": m["steps"], "train_seconds": m["train_seconds"],
            "seconds_per_step": m["seconds_per_step"], "peak_memory_mb": m.get("peak_memory_mb"),
            **({"best": m["best"]} if m.get("best") else {}),
            **({"retention": m["retention"]} if m.get("retention") else {}),
            "stages": {k: {"seconds": v["seconds"], "peak_memory_mb": v["peak_memory_mb"], "cached": v["cached"]}
                       for k, v in stages.items()},
            "cell_seconds": seconds, "config": to_dict(cfg), "versions": {**summary["versions"], "commit": git_commit()},
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_grid(grid: Grid, log=print) -> int:
    """Run every unfinished cell (one at a time); returns how many ran."""
    from floe.pipeline.runner import run

    done = finished(grid.results_path)
    todo = [(c, v, cfg) for c, v, cfg in cells(grid) if cell_fingerprint(cfg) not in done]
    log(f"[floe] grid {grid.name}: {len(done)} cells finished, {len(todo)} to run -> {grid.results_path}")
    for i, (cell, variant, cfg) in enumerate(todo, 1):
        log(f"[floe] cell {i}/{len(todo)}: {cell}")
        t0 = time.perf_counter()
        summary = run(cfg, log=log)
        _append(grid.results_path, result_row(grid, cell, variant, cfg, summary, time.perf_counter() - t0))
    return len(todo)


def rerun_cell(grid: Grid, cell: str, log=print) -> dict[str, Any]:
    """Run a finished cell again from its recorded config, in a fresh folder (no cached stage), and
    append the recorded and the new validation loss to ``<results folder>/reruns.jsonl``."""
    import shutil

    from floe.pipeline.runner import run

    rows = [r for r in finished(grid.results_path).values() if r["cell"] == cell]
    if not rows:
        known = sorted(r["cell"] for r in finished(grid.results_path).values())
        raise InputError(f"--rerun: no finished cell {cell!r} in {grid.results_path}; finished: {', '.join(known) or 'none'}")
    row = rows[-1]
    folder = grid.run_path.parent / "reruns" / grid.name / cell
    shutil.rmtree(folder, ignore_errors=True)
    with warnings.catch_warnings():  # a cell recorded before a key's rename holds its old name: not the user's to fix
        warnings.simplefilter("ignore", FutureWarning)
        cfg = from_dict(RunConfig, {**row["config"], "output_dir": str(folder), "stage_root": ""})
    t0 = time.perf_counter()
    summary = run(cfg, log=log)
    new = summary["methods"][cfg.method]
    out = {"grid": grid.name, "cell": cell, "fingerprint": row["fingerprint"], "recorded_commit": row["versions"].get("commit"),
           "commit": git_commit(), "recorded_final_eval_loss": row["metrics"]["final_eval_loss"],
           "rerun_final_eval_loss": new["final_eval_loss"],
           "difference": new["final_eval_loss"] - row["metrics"]["final_eval_loss"],
           "recorded_test_loss": row["metrics"].get("test_loss"), "rerun_test_loss": new["scores"].get("test_loss"),
           **({"recorded_best_eval_loss": row["best"]["eval_loss"], "rerun_best_eval_loss": (new.get("best") or {}).get("eval_loss"),
               "recorded_best_step": row["best"]["step"], "rerun_best_step": (new.get("best") or {}).get("step")}
              if row.get("best") else {}),
           "seconds": time.perf_counter() - t0, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _append(grid.results_path.parent / "reruns.jsonl", out)
    log(f"[floe] {cell}: recorded validation loss {out['recorded_final_eval_loss']:.6f}, "
        f"re-run {out['rerun_final_eval_loss']:.6f} (difference {out['difference']:+.2e})")
    if "recorded_best_eval_loss" in out and out["rerun_best_eval_loss"] is not None:
        log(f"[floe] {cell}: best validation loss recorded {out['recorded_best_eval_loss']:.6f} at step "
            f"{out['recorded_best_step']}, re-run {out['rerun_best_eval_loss']:.6f} at step {out['rerun_best_step']}")
    return out


# ---------------------------------------------------------------- summary

def t_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired differences and its two-sided Student-t confidence interval."""
    from scipy import stats

    n = len(diffs)
    mean = statistics.mean(diffs)
    if n < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


def _only_k(groups: dict[tuple, dict[int, dict[str, Any]]], data: str, baseline: str) -> dict[int, dict[str, Any]]:
    """The baseline's cells on ``data`` when it was run at a single k (what a full-layer method, whose k is
    the layer count, is compared with); empty otherwise."""
    ks = [k for (d, k, v) in groups if d == data and v == baseline]
    return groups[(data, ks[0], baseline)] if len(ks) == 1 else {}


def summarise(rows: list[dict[str, Any]], baseline: str = "random") -> str:
    """Markdown tables: mean ± std per (variant, k, data); paired differences (same seed) against ``baseline``
    at the same k, or, for a k the baseline was not run at, against its only k if it has one."""
    from collections import defaultdict

    groups: dict[tuple, dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        groups[(r["data"], r["k"], r["variant"])][r["seed"]] = r
    out = []
    for data in sorted({g[0] for g in groups}):
        out += [f"### {data}", "", "| variant | k | seeds | trainable % | s/step | " + " | ".join(METRICS)
                + " | " + " | ".join(f"Δ{m} vs {baseline} (95% CI)" for m in PAIRED) + " |",
                "|---" * (5 + len(METRICS) + len(PAIRED)) + "|"]
        for (d, k, variant), by_seed in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2])):
            if d != data:
                continue
            cells = [variant, str(k), str(len(by_seed)),
                     f"{100 * statistics.mean(r['trainable_share'] for r in by_seed.values()):.3f}",
                     f"{statistics.mean(r['seconds_per_step'] or 0 for r in by_seed.values()):.2f}"]
            for m in METRICS:
                vals = [r["metrics"][m] for r in by_seed.values() if r["metrics"].get(m) is not None]
                cells.append("-" if not vals else f"{statistics.mean(vals):.4f}" if len(vals) == 1 else
                             f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}")
            base = groups.get((d, k, baseline)) or _only_k(groups, d, baseline)
            for m in PAIRED:
                diffs = [r["metrics"][m] - base[s]["metrics"][m] for s, r in by_seed.items()
                         if s in base and variant != baseline and r["metrics"].get(m) is not None]
                if len(diffs) > 1:
                    mean, lo, hi = t_interval(diffs)
                    cells.append(f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}] (n={len(diffs)})")
                elif diffs:
                    cells.append(f"{diffs[0]:+.4f} (n=1)")
                else:
                    cells.append("-")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def load_grid(path: str | Path) -> Grid:
    return from_dict(Grid, load_yaml(path), where=str(path))
