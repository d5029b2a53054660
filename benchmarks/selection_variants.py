"""Selection options on a real model: what each gradient form costs, and what each stage does.

    python benchmarks/selection_variants.py --adapter runs/warmup/adapter --examples 64 \\
        --batch-size 4 --heldout 2 --output runs/bench_selection_variants

1. Cost: on the first ``--timing-batches`` selection batches, interleaved so that a shared
   machine's load hits all alike: one
   warm-up training step (forward + backward + AdamW with lr 0, so the adapter is unchanged),
   the Taylor cost as ``taylor: mask`` and as ``taylor: weights`` (Eq. 4) on the base model, the
   Fisher as ``fisher: batch`` and ``fisher: example`` (Eq. 8) on the adapted model. Reported:
   seconds per batch and the ratio to one training step. (On the other batches ``fisher: batch``
   is not run: the per-example rows give the batch gradients exactly.)
2. Variants, from those gradients (each computed once): the default pipeline (taylor weights,
   fisher example, refine paper, tuning), ``refine: block`` (no tuning: its effect is the
   refinement's), ``taylor: mask`` and ``fisher: batch``; ``refine: none`` is the default run's
   determination stage. For each: the layer ranking after every stage, its Spearman correlation
   with the previous stage's, the per-unit cost against the budget and the true masked-loss
   increase on the selection and held-out batches (``diagnostics.<stage>`` of ``selection.json``).
   Also the per-unit rank correlation of the two Taylor forms and of the two Fisher forms.
Results go to ``<output>/selection_variants.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


def _concat(parts):
    """One MaskGradients from per-batch results (rows and batch indices shifted)."""
    from floe.selection.importance import MaskGradients

    if parts[0].unit == "batch":
        return MaskGradients(torch.cat([p.head for p in parts]), torch.cat([p.neuron for p in parts]),
                             torch.cat([p.loss for p in parts]))
    batch_of = torch.cat([p.batch_of + i for i, p in enumerate(parts)])
    return MaskGradients(torch.cat([p.head for p in parts]), torch.cat([p.neuron for p in parts]),
                         torch.cat([p.loss for p in parts]), batch_of, torch.cat([p.share for p in parts]), "example")


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy import stats

    return float(stats.spearmanr(a.reshape(-1).double().numpy(), b.reshape(-1).double().numpy())[0])


def _train_step(model, batch, optimizer) -> float:
    model.train()
    t = time.perf_counter()
    out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}, use_cache=False)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t
    model.eval()
    return seconds


def _summary(outcome) -> dict:
    keep = ("ranking", "rank_correlation", "constrained", "cost", "budget", "fits_budget", "heads_masked",
            "neurons_masked", "loss_increase", "iterations", "stopped", "objective_before", "objective_after",
            "repair", "negative_masks_clamped", "cost_before", "cost_after")
    return {stage: {k: v for k, v in outcome.diagnostics[stage].items() if k in keep}
            for stage in ("determination", "refinement", "tuning") if stage in outcome.diagnostics}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="bigbench:natural_instructions")
    p.add_argument("--adapter", required=True, help="warm-up adapter folder (floe train ... /adapter)")
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--max-per-task", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--heldout", type=int, default=2)
    p.add_argument("--timing-batches", type=int, default=2, help="selection batches on which every form is timed")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--output", default="runs/bench_selection_variants")
    p.add_argument("--quick", action="store_true",
                   help="tune and measure the masked loss only for the default run (and block's refinement)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from floe.adapters.moe_lora import adapters_disabled, load_adapter
    from floe.data import DataCollator, iter_batches, load_data
    from floe.models import load_model
    from floe.selection import SelectionConfig
    from floe.selection.algorithm import run_stages
    from floe.selection.importance import mask_gradients, masked_losses
    from floe.selection.taylor import weight_taylor

    model, tokenizer = load_model(args.model)
    load_adapter(model, args.adapter, trainable=True)
    data = load_data(args.data, tokenizer, split="train", max_length=args.max_length, fraction=args.fraction,
                     max_examples=args.examples, max_per_task=args.max_per_task, on_error="skip")
    batches = list(iter_batches(data, args.batch_size, DataCollator(tokenizer)))
    selection, heldout = batches[:-args.heldout], batches[-args.heldout:]
    print(f"[bench] {args.model}: {len(data)} examples, {len(selection)} selection + {len(heldout)} held-out "
          f"batches of {args.batch_size}; torch threads {torch.get_num_threads()}", flush=True)

    trainable = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.0)
    seconds = {k: [] for k in ("train_step", "taylor_mask", "taylor_weights", "fisher_batch", "fisher_example")}
    parts = {k: [] for k in seconds if k not in ("train_step", "fisher_batch")}
    runs = {
        "taylor_mask": lambda one: mask_gradients(model, one),
        "taylor_weights": lambda one: weight_taylor(model, one),
        "fisher_batch": lambda one: mask_gradients(model, one),
        "fisher_example": lambda one: mask_gradients(model, one, per_example=True),
    }
    for i, batch in enumerate(selection):
        timed = i < args.timing_batches
        if timed:
            seconds["train_step"].append(_train_step(model, batch, optimizer))
        for key, run in runs.items():
            if key == "fisher_batch" and not timed:
                continue  # the per-example rows give the batch gradients exactly (MaskGradients.per_batch)
            t = time.perf_counter()
            if key.startswith("taylor"):
                with adapters_disabled(model):
                    result = run([batch])
            else:
                result = run([batch])
            if timed:
                seconds[key].append(time.perf_counter() - t)
            if key in parts:
                parts[key].append(result)
        if timed:
            print(f"[bench] batch {i}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in seconds.items()), flush=True)
        else:
            print(f"[bench] batch {i} done", flush=True)
    for q in trainable:
        q.requires_grad_(False)
    grads = {k: _concat(v) for k, v in parts.items()}
    grads["fisher_batch"] = grads["fisher_example"].per_batch()
    total = {k: sum(v) for k, v in seconds.items()}
    n_timed = len(seconds["train_step"])
    cost = {k: {"seconds_total": total[k], "seconds_per_batch": total[k] / n_timed,
                "ratio_to_train_step": total[k] / total["train_step"]} for k in seconds} if n_timed else {}
    for k, v in cost.items():
        print(f"[bench] {k:<15} {v['seconds_per_batch']:7.2f} s/batch  {v['ratio_to_train_step']:5.2f} x train step")

    th_w, tn_w = grads["taylor_weights"].taylor()
    th_m, tn_m = grads["taylor_mask"].taylor()
    fh_e, fn_e = grads["fisher_example"].fisher()
    fh_b, fn_b = grads["fisher_batch"].fisher()
    unit_corr = {"taylor_weights_vs_mask": {"heads": _spearman(th_w, th_m), "neurons": _spearman(tn_w, tn_m)},
                 "fisher_example_vs_batch": {"heads": _spearman(fh_e, fh_b), "neurons": _spearman(fn_e, fn_b)}}
    print(f"[bench] per-unit Spearman: {unit_corr}", flush=True)

    from floe.selection.determination import determine, repair_budget
    from floe.selection.layer_score import rank_layers, top_k

    base_sel = float(grads["fisher_example"].loss.mean())
    base_held = float(masked_losses(model, heldout).mean())

    def increase(head, neuron) -> dict:
        """True masked-loss increase (forward passes with the masks applied)."""
        return {"selection": float(masked_losses(model, selection, head, neuron).mean()) - base_sel,
                "heldout": float(masked_losses(model, heldout, head, neuron).mean()) - base_held}

    variants = {  # name: (config, fisher form, taylor form, measure the true masked loss)
        "default": (dict(), "fisher_example", "taylor_weights", True),
        "refine_block": (dict(refine="block", tune=not args.quick), "fisher_example", "taylor_weights", True),
        "taylor_mask": (dict(tune=not args.quick), "fisher_example", "taylor_mask", not args.quick),
        "fisher_batch": (dict(tune=not args.quick), "fisher_batch", "taylor_weights", not args.quick),
    }
    results = {}
    for name, (kw, fisher_key, taylor_key, measured) in variants.items():
        cfg = SelectionConfig(budget=args.budget, top_k=args.top_k, **kw)
        t = time.perf_counter()
        outcome = run_stages(model, selection, grads[fisher_key], grads[taylor_key], cfg, None)
        ranking = rank_layers(outcome.scores)
        stages = _summary(outcome)
        if measured:
            fh, fn = grads[fisher_key].fisher()
            ch, cn = grads[taylor_key].taylor()
            first = repair_budget(determine(fh, fn, ch, cn, cfg.budget, cfg.mask_rule), fh, fn, ch, cn,
                                  cfg.budget, cfg.mask_rule)
            if name == "default" or "determination" not in results.get("default", {}).get("stages", {}) \
                    or fisher_key != "fisher_example" or taylor_key != "taylor_weights":
                stages["determination"]["loss_increase"] = increase(first.head_mask(), first.neuron_mask())
            else:  # same gradients, same Alg. 1 set as the default run
                stages["determination"]["loss_increase"] = results["default"]["stages"]["determination"]["loss_increase"]
            stages["refinement"]["loss_increase"] = increase(outcome.masks.head_mask(), outcome.masks.neuron_mask())
            if "tuning" in stages:
                stages["tuning"]["loss_increase"] = increase(outcome.tuned_head, outcome.tuned_neuron)
        results[name] = {"config": kw, "fisher": fisher_key, "taylor": taylor_key, "ranking": ranking,
                         "chosen": top_k(ranking, args.top_k, len(ranking)), "stages": stages,
                         "timings": outcome.timings, "seconds": time.perf_counter() - t,
                         "masked_heads_per_layer": outcome.masks.masked_head.sum(1).tolist(),
                         "masked_neurons_per_layer": outcome.masks.masked_neuron.sum(1).tolist()}
        print(f"[bench] {name}: chosen {results[name]['chosen']}", flush=True)
        for stage, d in stages.items():
            print(f"    {stage}: ranking {d['ranking']}, rho {d.get('rank_correlation')}, cost {d['cost']:.4g} / "
                  f"C {d['budget']:.4g}, heads {d['heads_masked']}, neurons {d['neurons_masked']}, "
                  f"loss +{d.get('loss_increase')}", flush=True)

    report = {"model": args.model, "data": args.data, "adapter": args.adapter, "examples": len(data),
              "selection_batches": len(selection), "heldout_batches": len(heldout), "batch_size": args.batch_size,
              "budget": args.budget, "top_k": args.top_k, "base_loss": {"selection": base_sel, "heldout": base_held},
              "cost": cost, "seconds": seconds, "unit_rank_correlation": unit_corr, "variants": results,
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__}}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".selection_variants.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / "selection_variants.json")
    print(f"[bench] wrote {out / 'selection_variants.json'}")


if __name__ == "__main__":
    main()
