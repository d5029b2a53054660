"""Which BIG-bench multiple-choice tasks can measure forgetting: the base model's accuracy against chance.

Retention (docs/evaluation.md, "Retention") scores a trained adapter on multiple-choice tasks outside the
training mixture; a task where the base model sits at chance cannot show forgetting. This scores the
base model, zero-shot, on ``--max-examples`` examples of each candidate task (the retention evaluation's
own draw: ``floe.evaluation.retention.evaluate_retention``), with a 95 % Wilson interval on the accuracy,
and marks a task usable when it has at least ``--max-examples`` examples and the interval's lower end
is above chance.

    python benchmarks/retention_tasks.py                 # ~5 min on 2 CPU cores
    python benchmarks/retention_tasks.py --tasks date_understanding,navigate --max-examples 50

Writes ``benchmarks/results/retention_tasks.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CANDIDATES = ("movie_recommendation", "date_understanding", "social_iqa", "hindu_knowledge", "emoji_movie",
              "odd_one_out", "disambiguation_qa", "logical_deduction/three_objects")


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``p`` out of ``n``."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default=",".join(CANDIDATES))
    ap.add_argument("--max-examples", type=int, default=100)
    ap.add_argument("--out", default=str(HERE / "results" / "retention_tasks.json"))
    args = ap.parse_args(argv)

    import floe
    from floe.errors import InputError
    from floe.evaluation.retention import RetentionConfig, evaluate_retention
    from floe.io import atomic_write_text
    from floe.provenance import git_commit, package_versions

    model, tok = floe.load_model(args.model)
    rows = []
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        try:
            r = evaluate_retention(model, tok, RetentionConfig(tasks=[task], max_examples=args.max_examples))
        except InputError as e:
            print(f"{task}: skipped ({e})", flush=True)
            rows.append({"task": task, "error": str(e)})
            continue
        v = next(iter(r["per_task"].values()))
        lo, hi = wilson(v["accuracy"], v["examples"])
        usable = v["examples"] >= args.max_examples and lo > v["chance"]
        rows.append({"task": task, "accuracy": v["accuracy"], "chance": v["chance"], "examples": v["examples"],
                     "wilson_low": lo, "wilson_high": hi, "usable": usable, "seconds": r["seconds"]})
        print(f"{task}: accuracy {v['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] against chance {v['chance']:.3f} "
              f"(n={v['examples']}, {r['seconds']:.0f} s){'  usable' if usable else ''}", flush=True)
    out = {"benchmark": "retention_tasks", "model": args.model, "max_examples": args.max_examples, "rows": rows,
           "usable": [r["task"] for r in rows if r.get("usable")], "commit": git_commit(),
           "versions": package_versions(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_text(Path(args.out), json.dumps(out, indent=2) + "\n")
    print("usable:", ", ".join(out["usable"]) or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
