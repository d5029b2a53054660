"""Time of each FLoE selection stage as a share of one warm-up epoch over the same data.

    python benchmarks/selection_stages.py \\
        --model smollm2-135m --data bigbench:natural_instructions --examples 128 --batch-size 4

Trains the warm-up adapter (full-layer MoE-LoRA, one epoch over the selection data; or reuses
``--adapter`` with the epoch time from its ``train_metrics.json``), then runs
:func:`floe.select_layers` on the same examples in the same batch size and prints the seconds
of each stage (Taylor, Fisher, mask_search = Alg. 1, refinement = Alg. 2, tuning) and its share of
the epoch. Results go to ``<output>/selection_stages.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

STAGES = ("taylor", "fisher", "mask_search", "refinement", "tuning")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="bigbench:natural_instructions")
    p.add_argument("--examples", type=int, default=128, help="selection / warm-up examples")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--adapter", help="reuse this warm-up adapter folder instead of training one")
    p.add_argument("--output", default="runs/bench_selection_stages")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from floe.adapters.moe_lora import MoELoraConfig, apply_moe_lora, load_adapter
    from floe.data import DataCollator, iter_batches, load_data
    from floe.models import load_model
    from floe.selection import SelectionConfig, select_layers
    from floe.training import TrainConfig, train

    out = Path(args.output)
    model, tokenizer = load_model(args.model)
    data = load_data(args.data, tokenizer, split="train", max_examples=args.examples, max_length=args.max_length,
                     on_error="skip")
    batches = list(iter_batches(data, args.batch_size, DataCollator(tokenizer)))
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    print(f"[bench] {args.model}: {len(data)} examples, {len(batches)} batches of {args.batch_size}, "
          f"{tokens} tokens; torch threads {torch.get_num_threads()}")

    if args.adapter:
        load_adapter(model, args.adapter)
        metrics = Path(args.adapter).parent / "train_metrics.json"
        if not metrics.is_file():
            raise SystemExit(f"{metrics} not found: the epoch time comes from the warm-up's train_metrics.json")
        epoch_seconds = float(json.loads(metrics.read_text())["train_seconds"])
        warmup = {"adapter": args.adapter, "train_seconds": epoch_seconds}
    else:
        model = apply_moe_lora(model, MoELoraConfig(r=args.r, num_experts=args.experts, base_model_name_or_path=args.model))
        cfg = TrainConfig(output_dir=str(out / "warmup"), num_epochs=1.0, batch_size=args.batch_size,
                          report_to=[], progress_bar=False, eval_before_training=False, save_steps=10_000,
                          resume=False)
        result = train(model, tokenizer, data, None, cfg)
        epoch_seconds = result.train_seconds
        warmup = {"steps": result.steps, "train_seconds": epoch_seconds,
                  "first_loss": result.train_losses[0][1] if result.train_losses else None,
                  "last_loss": result.train_losses[-1][1] if result.train_losses else None}
    print(f"[bench] warm-up epoch: {epoch_seconds:.1f} s")

    t = time.perf_counter()
    sel = select_layers(model, None, batches, SelectionConfig(budget=args.budget, top_k=args.top_k))
    wall = time.perf_counter() - t
    rows = [(stage, sel.timings.get(stage, 0.0)) for stage in STAGES]
    print(f"{'stage':<12} {'seconds':>9} {'% of epoch':>11}")
    for stage, sec in rows:
        print(f"{stage:<12} {sec:>9.2f} {100 * sec / epoch_seconds:>10.1f}%")
    total = sum(s for _, s in rows)
    print(f"{'all stages':<12} {total:>9.2f} {100 * total / epoch_seconds:>10.1f}%   (select_layers wall {wall:.1f} s)")
    print(f"[bench] ranking {sel.ranking}\n[bench] chosen {sel.chosen}")
    fallbacks = sel.diagnostics.get("tuning_fallbacks", [])
    print(f"[bench] tuning fallbacks: {len(fallbacks)}")
    report = {
        "model": args.model, "data": args.data, "examples": len(data), "batches": len(batches), "tokens": tokens,
        "batch_size": args.batch_size, "max_length": args.max_length, "r": args.r, "experts": args.experts,
        "budget": args.budget, "warmup": warmup, "epoch_seconds": epoch_seconds,
        "stages": {s: {"seconds": sec, "share_of_epoch": sec / epoch_seconds} for s, sec in rows},
        "select_layers_wall": wall, "ranking": sel.ranking, "chosen": sel.chosen,
        "losses": sel.diagnostics.get("losses"), "tuning_fallbacks": fallbacks,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".selection_stages.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / "selection_stages.json")
    sel.to_json(out / "selection.json")
    print(f"[bench] wrote {out / 'selection_stages.json'}")


if __name__ == "__main__":
    main()
