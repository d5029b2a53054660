"""Full-layer MoE-LoRA training steps in float32 against bfloat16 autocast (``train.bf16: true``), side by side.

The long-training grid (``benchmarks/grids/long.yaml``) trains for hundreds of steps, so whether it runs
under bf16 autocast is a question of speed against loss. This measures both on the grids' setting
(SmolLM2-135M, r = 8, M = 4 on every layer's FFN, batch 4, the Natural-Instructions mixture at
max_length 256), with the same seed, data order and initialisation, alternating the two precisions
``--rounds`` times so that a drift of the machine's speed hits both alike:

* seconds per optimizer step (median over the steps after the first, evaluation excluded),
* training loss at the last step and validation loss after ``--steps`` steps,
* the ratio fp32 / bf16 of the step time.

    python benchmarks/bf16_autocast.py                     # ~4 min on 2 CPU cores; run it alone
    python benchmarks/bf16_autocast.py --steps 4 --rounds 1 --eval-examples 32   # where bf16 is emulated (slow)

Prints one line per run and the ratios; writes ``benchmarks/results/bf16_autocast.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def one_run(model_name: str, bf16: bool, steps: int, seed: int, train_ds, val_ds, tokenizer) -> dict:
    import floe

    model, _ = floe.load_model(model_name)
    model = floe.apply_moe_lora(model, floe.MoELoraConfig(r=8, num_experts=4, lora_alpha=32, lora_dropout=0.05,
                                                          target_modules=["gate_proj", "up_proj", "down_proj"]),
                                seed=seed)
    with tempfile.TemporaryDirectory() as out:
        cfg = floe.TrainConfig(output_dir=out, max_steps=steps, batch_size=4, learning_rate=3e-4, bf16=bf16,
                               seed=seed, logging_steps=1, save_steps=10**6, report_to=[], progress_bar=False,
                               eval_before_training=False)
        res = floe.train(model, tokenizer, train_ds, val_ds, cfg)
    return {"bf16": bf16, "seconds_per_step": res.seconds_per_step, "train_seconds": res.train_seconds,
            "last_train_loss": res.train_losses[-1][1], "eval_loss": res.final_eval_loss,
            "peak_memory_mb": res.peak_memory_mb}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--eval-examples", type=int, default=200, help="validation examples drawn (over-long ones skipped)")
    ap.add_argument("--out", default=str(HERE / "results" / "bf16_autocast.json"))
    args = ap.parse_args(argv)

    import torch

    import floe
    from floe.io import atomic_write_text
    from floe.provenance import git_commit, package_versions
    from floe.specs import DataSpec, load_splits

    _, tok = floe.load_model(args.model)
    spec = DataSpec(max_length=256, max_per_task=100, max_train_examples=None, max_eval_examples=args.eval_examples,
                    on_error="skip", seed=42)
    train_ds, val_ds = load_splits(spec, tok)
    runs = []
    for rnd in range(args.rounds):
        for bf16 in (False, True):
            t0 = time.perf_counter()
            r = one_run(args.model, bf16, args.steps, args.seed, train_ds, val_ds, tok)
            r.update(round=rnd + 1, wall_seconds=time.perf_counter() - t0)
            runs.append(r)
            print(f"round {rnd + 1} {'bf16' if bf16 else 'fp32'}: {r['seconds_per_step']:.3f} s/step, "
                  f"train loss {r['last_train_loss']:.4f} at step {args.steps}, validation loss {r['eval_loss']:.4f}",
                  flush=True)
    fp32 = [r for r in runs if not r["bf16"]]
    bf16 = [r for r in runs if r["bf16"]]
    med = {name: statistics.median(r["seconds_per_step"] for r in rs) for name, rs in (("fp32", fp32), ("bf16", bf16))}
    ev = {name: statistics.mean(r["eval_loss"] for r in rs) for name, rs in (("fp32", fp32), ("bf16", bf16))}
    summary = {"fp32_seconds_per_step": med["fp32"], "bf16_seconds_per_step": med["bf16"],
               "speedup_fp32_over_bf16": med["fp32"] / med["bf16"], "fp32_eval_loss": ev["fp32"],
               "bf16_eval_loss": ev["bf16"], "eval_loss_difference_bf16_minus_fp32": ev["bf16"] - ev["fp32"]}
    print(f"fp32 {med['fp32']:.3f} s/step, bf16 {med['bf16']:.3f} s/step: bf16 is {summary['speedup_fp32_over_bf16']:.2f}x "
          f"faster; validation loss after {args.steps} steps {ev['fp32']:.4f} (fp32) vs {ev['bf16']:.4f} (bf16)")
    out = {"benchmark": "bf16_autocast", "model": args.model, "steps": args.steps, "rounds": args.rounds,
           "seed": args.seed, "train_examples": len(train_ds), "validation_examples": len(val_ds),
           "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "bf16_supported": bool(getattr(torch.backends, "mkldnn", None) and torch.backends.mkldnn.is_available()),
           "runs": runs, "summary": summary, "commit": git_commit(), "versions": package_versions(),
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_text(Path(args.out), json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
