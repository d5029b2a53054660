"""What a ``floe run`` prints and records at the end: headline scores and one line per stage."""
from __future__ import annotations

from typing import Any


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The scores a comparison reads from an eval.json."""
    out: dict[str, Any] = {}
    if "loss" in result:
        out.update(test_loss=result["loss"]["loss"], perplexity=result["loss"]["perplexity"])
    if "generate" in result:
        out.update(exact_match=result["generate"]["exact_match"], rouge_l=result["generate"]["rouge_l"])
    if "choice" in result:
        out.update(choice_accuracy=result["choice"]["accuracy"], choice_chance=result["choice"]["chance"])
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """One line per stage (time, memory, result), then each method's scores against the first compared one."""
    lines = []
    for name, s in summary["stages"].items():
        res = s["result"]
        what = (f"chosen layers {res['chosen']}" if "chosen" in res else
                f"best r = {res['r']}, M = {res['num_experts']} (validation loss {res['value']:.4f}, "
                f"{res['trials']} trials)" if "num_experts" in res else
                f"{len(res['ranks'])} matrices, ranks {min(res['ranks'].values())}-{max(res['ranks'].values())}, "
                f"total {res['total_rank']}" if "ranks" in res else
                f"validation loss {res['train']['final_eval_loss']:.4f}" if "train" in res else
                f"validation loss {res['final_eval_loss']:.4f}" if "final_eval_loss" in res else
                ", ".join(f"{k} {v:.4f}" for k, v in res.items() if isinstance(v, float)))
        lines.append(f"[floe] {name:<16} {s['seconds']:8.1f} s  {s['peak_memory_mb']:7.0f} MiB  {what}"
                     + ("  (cached)" if s["cached"] else ""))
    methods = summary["methods"]
    keys = ("test_loss", "exact_match", "rouge_l", "choice_accuracy")
    lines.append("[floe] " + f"{'method':<10}" + "".join(f"{k:>16}" for k in keys) + f"{'trainable %':>14}")
    for m, v in methods.items():
        sc = v["scores"]
        lines.append("[floe] " + f"{m:<10}" + "".join(f"{sc[k]:>16.4f}" if k in sc else f"{'-':>16}" for k in keys)
                     + f"{100 * v['trainable_share']:>14.3f}")
    main, *others = list(methods)
    for other in others:
        a, b = methods[main]["scores"], methods[other]["scores"]
        diffs = ", ".join(f"{k} {a[k] - b[k]:+.4f}" for k in keys if k in a and k in b)
        lines.append(f"[floe] {main} - {other}: {diffs} (lower loss, higher match/ROUGE-L is better)")
    return "\n".join(lines)
