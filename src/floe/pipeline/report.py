"""``floe report RUN_DIR...``: one Markdown and one self-contained HTML file comparing runs.

Rows are (method, k, r, M, data) groups; runs that differ only in their seed are pooled into
mean ± std. Figures (validation-loss curves, score against k, the layer-importance heatmap of
each FLoE selection) are PNGs beside report.md and embedded as base64 in report.html.
"""
from __future__ import annotations

import base64
import shutil
import html
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from floe.errors import InputError
from floe.io import atomic_file, atomic_write_text

METRICS = ("final_eval_loss", "test_loss", "exact_match", "rouge_l", "choice_accuracy")
HIGHER_IS_BETTER = {"exact_match", "rouge_l", "choice_accuracy"}


def load_runs(run_dirs: list[str]) -> list[dict[str, Any]]:
    runs = []
    for d in run_dirs:
        path = Path(d) / "run.json"
        if not path.is_file():
            raise InputError(f"{path} not found: pass folders written by `floe run` (its output_dir)")
        runs.append({**json.loads(path.read_text()), "dir": str(d)})
    return runs


def _stage_dir(run: dict[str, Any], recorded: str) -> Path:
    """A stage folder as recorded (relative to where `floe run` ran), else inside the run's own stages/."""
    path = Path(recorded)
    return path if path.exists() else Path(run["dir"]) / "stages" / path.name


def rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (run, method): the group key, the seed and every number the report shows."""
    out = []
    for run in runs:
        cfg = run["config"]
        for method, m in run["methods"].items():
            stages = {k.split("/")[1]: v for k, v in run["stages"].items() if k.startswith(f"{method}/")}
            select = run["stages"].get("select")
            k = cfg["k"] if method not in ("moe_lora",) else run["num_layers"]
            out.append({
                "group": (method, k, cfg["adapter"]["r"], cfg["adapter"]["num_experts"], cfg["data"]["source"]),
                "seed": cfg["seed"], "dir": run["dir"], "method": method, "k": k, "layers": m["layers"],
                "trainable_share": m["trainable_share"], "train_seconds": m["train_seconds"],
                "seconds_per_step": m["seconds_per_step"], "steps": m["steps"],
                "peak_memory_mb": stages.get("train", {}).get("peak_memory_mb"),
                "select_seconds": (select["seconds"] + run["stages"]["warmup"]["seconds"]) if (
                    method == "floe" and select) else None,
                "final_eval_loss": m["final_eval_loss"], "eval_losses": m["eval_losses"], **m["scores"],
                "heatmap": str(_stage_dir(run, select["dir"]) / "layer_importance.png") if (
                    method == "floe" and select) else None,
            })
    return out


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(rs: list[dict[str, Any]]) -> str:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rs:
        groups[r["group"]].append(r)
    head = ["method", "k", "r", "M", "data", "seeds", "trainable %", "train s", "s/step", "peak MiB", "warm-up+select s",
            *METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (method, k, r, m, data), g in groups.items():
        cells = [method, str(k), str(r), str(m), data, str(len(g)),
                 f"{100 * g[0]['trainable_share']:.3f}",
                 _mean_std([x["train_seconds"] for x in g]).split(" ±")[0],
                 _mean_std([x["seconds_per_step"] for x in g]).split(" ±")[0],
                 _mean_std([x["peak_memory_mb"] for x in g]).split(" ±")[0].split(".")[0],
                 _mean_std([x["select_seconds"] for x in g]).split(" ±")[0],
                 *[_mean_std([x.get(k_) for x in g]) for k_ in METRICS]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_curves(rs: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rs:
        if r["eval_losses"]:
            steps, losses = zip(*r["eval_losses"])
            ax.plot(steps, losses, marker="o", ms=3, label=f"{r['method']} k={r['k']} seed {r['seed']}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def _plot_vs_k(rs: list[dict[str, Any]], path: Path, metric: str) -> Path | None:
    by_method: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rs:
        if r.get(metric) is not None:
            by_method[r["method"]][r["k"]].append(r[metric])
    if not any(len(ks) > 1 for ks in by_method.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, ks in by_method.items():
        xs = sorted(ks)
        means = [statistics.mean(ks[x]) for x in xs]
        errs = [statistics.stdev(ks[x]) if len(ks[x]) > 1 else 0.0 for x in xs]
        ax.errorbar(xs, means, yerr=errs, marker="o", capsize=3, label=method)
    ax.set_xlabel("adapted layers k")
    ax.set_ylabel(metric)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def write_report(run_dirs: list[str], output: str | Path) -> list[Path]:
    """Write ``report.md``, ``report.html`` and the figures into ``output``; returns the paths."""
    out = Path(output)
    rs = rows(load_runs(run_dirs))
    figures = [("Validation loss during training", _plot_curves(rs, out / "loss_curves.png"))]
    for metric in ("test_loss", "rouge_l"):
        p = _plot_vs_k(rs, out / f"{metric}_vs_k.png", metric)
        if p:
            figures.append((f"{metric} against the number of adapted layers", p))
    for i, r in enumerate(r for r in rs if r["heatmap"] and Path(r["heatmap"]).is_file()):
        copy = atomic_file(out / f"layer_importance_{i}.png", lambda tmp, src=r["heatmap"]: shutil.copyfile(src, tmp))
        figures.append((f"Layer importance ({r['dir']}, seed {r['seed']})", copy))
    layers = "\n".join(f"- {r['method']} (seed {r['seed']}, {r['dir']}): "
                       f"{'all layers' if r['layers'] is None else r['layers']}" for r in rs)
    md = ["# FLoE run report", "", f"Runs: {', '.join(run_dirs)}", "",
          "Mean ± std over the runs of a row (they differ only in seed). Loss: lower is better; "
          "exact match, ROUGE-L, accuracy: higher is better. `final_eval_loss` is the validation loss at the "
          "end of training; `test_loss` and the generation scores are on the test split.", "",
          table(rs), "", "## Layers adapted", "", layers, ""]
    body_html = [f"<h1>FLoE run report</h1><p>Runs: {html.escape(', '.join(run_dirs))}</p>",
                 _md_table_to_html(table(rs)), "<h2>Layers adapted</h2><ul>"
                 + "".join(f"<li>{html.escape(line[2:])}</li>" for line in layers.splitlines()) + "</ul>"]
    for title, path in figures:
        md += [f"## {title}", "", f"![{title}]({path.name if path.parent == out else path})", ""]
        b64 = base64.b64encode(path.read_bytes()).decode()
        body_html.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                         f"src='data:image/png;base64,{b64}' style='max-width:100%'>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>FLoE run report</title><style>"
            "body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;"
            "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
            "td:first-child,th:first-child{text-align:left}</style></head><body>"
            + "\n".join(body_html) + "</body></html>\n")
    return [atomic_write_text(out / "report.md", "\n".join(md)), atomic_write_text(out / "report.html", page),
            *[p for _, p in figures if p.parent == out]]


def _md_table_to_html(md: str) -> str:
    lines = [ln for ln in md.splitlines() if not ln.startswith("|---")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
