"""Wall time and peak memory of each FLoE stage against full-layer training, and FLoE at equal time.

The paper's Table 5 analogue, measured with the library's own pipeline (``floe.pipeline.run``,
docs/pipeline.md) from the evidence grids' base config (``benchmarks/grids/base.yaml``: SmolLM2-135M,
r = 8, M = 4, 40 steps of 4), seed 1, data ``bigbench:natural_instructions``, k = 8, in a fresh
folder (default ``runs/pipeline_cost/``) so that no stage comes from a cache:

1. ``floe``      method floe: warm-up (full-layer MoE-LoRA on half the data) → selection
                 (its sub-stages timed: Taylor, Fisher, Alg. 1, Alg. 2, tuning) → MoE-LoRA on the
                 k chosen layers → test evaluation;
2. ``moe_lora``  method moe_lora: full-layer MoE-LoRA training → test evaluation (the same data,
                 split, steps and seed);
3. ``floe_equal_time``  method floe again with ``train.max_steps`` scaled so that its training
                 takes as long as moe_lora's: round(steps × moe_lora s/step / floe s/step). The
                 warm-up's cache key includes ``train.max_steps``, so this run repeats the warm-up
                 and the selection (the same computation); the script checks it chose run 1's layers.

Each run is a separate ``floe.pipeline.run`` in its own Python process, so a stage's peak memory
does not include a model that an earlier stage of another method left in memory (a run keeps the
models it trained for their evaluation). Peak memory is the pipeline's own record: CUDA's peak
allocation on a GPU, the process's resident set (sampled every 20 ms) on a CPU — which includes
the interpreter, PyTorch and the data, the same for every stage.

Prints one line per stage (seconds, peak MiB), FLoE's total (warm-up + selection + sparse
training) against full-layer training with ratios, seconds per step of each method, and the
equal-time comparison (validation loss, test loss, exact match, ROUGE-L); writes everything to
``benchmarks/results/pipeline_cost.json``.

    python benchmarks/pipeline_cost.py                      # about an hour on 2 CPU cores
    python benchmarks/pipeline_cost.py --seed 2 --no-equal-time   # another seed (-> pipeline_cost_s2.json)
    python benchmarks/pipeline_cost.py --fresh              # delete runs/pipeline_cost first
    python benchmarks/pipeline_cost.py --smoke --out-dir D --out D/pipeline_cost.json  # tiny model, a minute or two
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from floe.provenance import package_versions

HERE = Path(__file__).resolve().parent
BASE_CONFIG = HERE / "grids" / "base.yaml"
DEFAULT_OUT = HERE / "results" / "pipeline_cost.json"
SCORES = ("test_loss", "exact_match", "rouge_l", "choice_accuracy")

# Runs one pipeline from a JSON config in a fresh interpreter; the run writes <output_dir>/run.json.
_CHILD = ("import json, sys\n"
          "from floe.config import from_dict\n"
          "from floe.pipeline import RunConfig, run\n"
          "run(from_dict(RunConfig, json.load(open(sys.argv[1])), where='pipeline_cost'))\n")


# ----------------------------------------------------------------------------- smoke inputs

QA = [("What is the capital of France?", "Paris."), ("Translate 'cat' into French.", "chat"),
      ("Answer with one word: the opposite of hot.", "cold"), ("What colour is the sky?", "blue"),
      ("Name the capital of Italy.", "Rome."), ("Answer the question: 2 + 2 =", "4")]
CHATML = ("{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
          "{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_smoke_inputs(folder: Path, rows: int = 48) -> tuple[Path, Path]:
    """A tiny random 4-layer LLaMA-style model with a byte-level BPE tokenizer (as tests/conftest.py's
    ``tiny_model`` and ``make_tokenizer``) and an alpaca-style JSONL (as tests/train_helpers.py)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    model_dir, data = folder / "tiny_model", folder / "toy.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["The capital of France is Paris.", "Answer the question with one word.",
                             "user assistant system", "Translate the sentence into French."] * 20, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="<|im_end|>")
    fast.chat_template = CHATML
    fast.save_pretrained(model_dir)
    lines = [{"instruction": q, "input": "", "output": a} for q, a in (QA * (rows // len(QA) + 1))[:rows]]
    data.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return model_dir, data


SMOKE_OVERRIDES: dict[str, Any] = {
    "train.max_steps": 4, "train.batch_size": 4, "train.eval_steps": 2, "train.save_steps": 2,
    "train.logging_steps": 1, "train.learning_rate": 5e-3,
    "warmup_run.max_steps": 3, "select.batch_size": 4, "select.max_examples": 12, "select.config.heldout_batches": 1,
    "eval.max_examples": 4, "eval.max_new_tokens": 4, "eval.batch_size": 4,
}


# ----------------------------------------------------------------------------- configs and runs

def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *path, leaf = dotted.split(".")
    for key in path:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def run_configs(base: dict[str, Any], out_dir: Path, overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The config trees of runs 1 and 2 (run 3 is run 1's with the scaled step count)."""
    from floe.config import from_dict
    from floe.pipeline.config import RunConfig

    out = {}
    for name in ("floe", "moe_lora"):
        tree = copy.deepcopy(base)
        for key, value in overrides.items():
            _set(tree, key, value)
        tree.update(method=name, compare=[], output_dir=str(out_dir / name), stage_root=str(out_dir / "stages"))
        from_dict(RunConfig, tree, where=f"pipeline_cost {name}")  # fail before any run on a bad key
        out[name] = tree
    return out


def run_pipeline(name: str, tree: dict[str, Any], out_dir: Path, in_process: bool, log: Callable[[str], None]) -> dict:
    """One ``floe.pipeline.run`` of ``tree`` (in a child interpreter unless ``in_process``); its run.json."""
    cfg_path = out_dir / f"{name}.config.json"
    cfg_path.write_text(json.dumps(tree, indent=2) + "\n")
    log(f"[pipeline_cost] run {name}: method {tree['method']}, {tree['train']['max_steps']} steps -> "
        f"{tree['output_dir']}")
    t0 = time.perf_counter()
    if in_process:
        from floe.config import from_dict
        from floe.pipeline import RunConfig, run

        run(from_dict(RunConfig, tree, where="pipeline_cost"), log=log)
    else:
        sys.stdout.flush()
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(cfg_path)], check=False, env=os.environ.copy())
        if proc.returncode != 0:
            raise RuntimeError(f"run {name} failed (exit {proc.returncode}); its config is {cfg_path}")
    summary = json.loads((Path(tree["output_dir"]) / "run.json").read_text())
    summary["wall_seconds"] = time.perf_counter() - t0
    return summary


def equal_time_steps(base_steps: int, moe_sps: float, floe_sps: float, max_factor: float) -> int:
    """Steps that give FLoE's training moe_lora's training time: round(steps × moe s/step / floe s/step)."""
    steps = round(base_steps * moe_sps / floe_sps)
    return int(min(max(steps, 1), round(max_factor * base_steps)))


# ----------------------------------------------------------------------------- report

def _stage(run: dict[str, Any], key: str) -> dict[str, Any]:
    s = run["stages"][key]
    out = {"seconds": s["seconds"], "peak_memory_mb": s["peak_memory_mb"], "cached": s["cached"]}
    res = s["result"]
    if "train" in res:
        t = res["train"]
        out.update(train_seconds=t["train_seconds"], seconds_per_step=t["seconds_per_step"], steps=t["steps"],
                   final_eval_loss=t["final_eval_loss"], trainable_params=res.get("trainable_params"))
    elif "train_seconds" in res:  # the warm-up
        out.update(train_seconds=res["train_seconds"], steps=res["steps"], final_eval_loss=res["final_eval_loss"])
    if "timings" in res:
        out.update(timings=res["timings"], chosen=res["chosen"])
    if key.endswith("/eval"):
        out["scores"] = res
    return out


def _method(run: dict[str, Any], method: str) -> dict[str, Any]:
    m = run["methods"][method]
    return {"steps": m["steps"], "train_seconds": m["train_seconds"], "seconds_per_step": m["seconds_per_step"],
            "final_eval_loss": m["final_eval_loss"], "scores": m["scores"], "layers": m["layers"],
            "trainable_params": m["trainable_params"]}


def analyse(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    floe, moe = runs["floe"], runs["moe_lora"]
    stages = {key: _stage(floe, key) for key in ("warmup", "select", "floe/train", "floe/eval")}
    stages.update({key: _stage(moe, key) for key in ("moe_lora/train", "moe_lora/eval")})
    if "floe_equal_time" in runs:
        for key in ("warmup", "select", "floe/train", "floe/eval"):
            stages[f"floe_equal_time/{key.split('/')[-1]}"] = _stage(runs["floe_equal_time"], key)
    parts = ("warmup", "select", "floe/train")
    floe_total = sum(stages[p]["seconds"] for p in parts)
    floe_peak = max(stages[p]["peak_memory_mb"] for p in parts)
    full, full_peak = stages["moe_lora/train"]["seconds"], stages["moe_lora/train"]["peak_memory_mb"]
    totals = {
        "floe_total_seconds": floe_total, "full_layer_seconds": full,
        "floe_total_over_full_layer": floe_total / full,
        "floe_train_over_full_layer": stages["floe/train"]["seconds"] / full,
        "warmup_plus_select_over_full_layer": (stages["warmup"]["seconds"] + stages["select"]["seconds"]) / full,
        "floe_peak_memory_mb": floe_peak, "full_layer_peak_memory_mb": full_peak,
        "floe_peak_over_full_layer": floe_peak / full_peak,
        "floe_train_peak_over_full_layer": stages["floe/train"]["peak_memory_mb"] / full_peak,
    }
    sps = {"floe": stages["floe/train"]["seconds_per_step"], "moe_lora": stages["moe_lora/train"]["seconds_per_step"]}
    sps["floe_over_moe_lora"] = sps["floe"] / sps["moe_lora"]
    return {"stages": stages, "totals": totals, "seconds_per_step": sps}


def format_report(res: dict[str, Any]) -> str:
    st, tot = res["stages"], res["totals"]
    k = len(st["select"]["chosen"])
    lines = [f"{'stage':<44}{'seconds':>10}{'peak MiB':>10}"]

    def row(label: str, seconds: float, peak: float | None) -> None:
        lines.append(f"{label:<44}{seconds:10.1f}" + (f"{peak:10.0f}" if peak is not None else f"{'':>10}"))

    row("warm-up (full-layer MoE-LoRA, half the data)", st["warmup"]["seconds"], st["warmup"]["peak_memory_mb"])
    row("selection", st["select"]["seconds"], st["select"]["peak_memory_mb"])
    subs = [(n, s) for n, s in st["select"]["timings"].items() if n != "total"]
    lines.append("  its parts (s; scorer includes the ones before it): " + ", ".join(f"{n} {s:.1f}" for n, s in subs))
    row(f"FLoE training (k={k})", st["floe/train"]["seconds"], st["floe/train"]["peak_memory_mb"])
    row("FLoE total (warm-up + selection + training)", tot["floe_total_seconds"], tot["floe_peak_memory_mb"])
    row("full-layer training (moe_lora)", tot["full_layer_seconds"], tot["full_layer_peak_memory_mb"])
    lines.append(f"{'FLoE total / full-layer':<44}{tot['floe_total_over_full_layer']:10.3f}"
                 f"{tot['floe_peak_over_full_layer']:10.3f}")
    lines.append(f"{'FLoE training / full-layer':<44}{tot['floe_train_over_full_layer']:10.3f}"
                 f"{tot['floe_train_peak_over_full_layer']:10.3f}")
    lines.append(f"{'warm-up + selection / full-layer':<44}{tot['warmup_plus_select_over_full_layer']:10.3f}")
    row("evaluation, floe (reference)", st["floe/eval"]["seconds"], st["floe/eval"]["peak_memory_mb"])
    row("evaluation, moe_lora (reference)", st["moe_lora/eval"]["seconds"], st["moe_lora/eval"]["peak_memory_mb"])
    sps = res["seconds_per_step"]
    lines.append(f"s/step: floe {sps['floe']:.3f}, moe_lora {sps['moe_lora']:.3f}, "
                 f"floe / moe_lora {sps['floe_over_moe_lora']:.3f}")
    eq = res.get("equal_time")
    if eq:
        lines.append(f"equal time: floe trained {eq['steps']} steps (moe_lora {eq['base_steps']}) = "
                     f"{eq['base_steps']} x {sps['moe_lora']:.3f} / {sps['floe']:.3f}; training time "
                     f"{eq['train_seconds_over_moe_lora']:.3f} x moe_lora's; layers "
                     + ("as in run 1" if eq["same_layers"] else "DIFFER from run 1's (selection not reproducible)"))
        lines.append(f"{'method':<18}{'steps':>6}{'train s':>9}{'val loss':>10}" + "".join(f"{s:>16}" for s in SCORES))
        for name in ("moe_lora", "floe", "floe_equal_time"):
            m = eq["methods"][name]
            sc = m["scores"]
            lines.append(f"{name:<18}{m['steps']:>6}{m['train_seconds']:9.1f}{m['final_eval_loss']:10.4f}"
                         + "".join(f"{sc[s]:16.4f}" if s in sc else f"{'-':>16}" for s in SCORES))
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                           "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                           "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def _display(path: Path) -> str:
    """``path`` relative to the working directory when under it (no machine paths in the results)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path.name


def _portable(config: dict[str, Any], smoke: bool) -> dict[str, Any]:
    """A run's config as recorded, its folders relative and the smoke inputs' paths replaced by a label."""
    config = copy.deepcopy(config)
    for key in ("output_dir", "stage_root"):
        config[key] = _display(Path(config[key]))
    if smoke:
        config["model"]["name"], config["data"]["source"] = "tiny (smoke)", "toy (smoke)"
    return config


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=str(BASE_CONFIG), help="run config to start from (default: the grids' base)")
    ap.add_argument("--data", default="bigbench:natural_instructions")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--k", type=int, default=None, help="layers FLoE trains (default 8; --smoke 2)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (dotted, value parsed as YAML), e.g. --set train.max_steps=80")
    ap.add_argument("--out-dir", default=None, help="runs and stages (default runs/pipeline_cost, with _s<seed> for "
                                                    "seeds other than 1; --smoke: runs/pipeline_cost_smoke); must not "
                                                    "exist unless --fresh")
    ap.add_argument("--fresh", action="store_true", help="delete --out-dir first")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/pipeline_cost.json, "
                                                "pipeline_cost_s<seed>.json for seeds other than 1; --smoke: "
                                                "<out-dir>/pipeline_cost.json)")
    ap.add_argument("--no-equal-time", action="store_true", help="skip run 3 (FLoE at moe_lora's training time)")
    ap.add_argument("--max-steps-factor", type=float, default=10.0,
                    help="cap on the equal-time steps, as a multiple of train.max_steps")
    ap.add_argument("--in-process", action="store_true",
                    help="run the pipelines in this process (peak memory then includes earlier runs' leftovers)")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model and toy data (checks the script)")
    args = ap.parse_args(argv)
    k = args.k if args.k is not None else (2 if args.smoke else 8)
    suffix = "" if args.seed == 1 else f"_s{args.seed}"  # one result file per seed (docs/results.md averages them)
    out_dir = Path(args.out_dir or ("runs/pipeline_cost_smoke" if args.smoke else f"runs/pipeline_cost{suffix}"))
    out_path = Path(args.out or (out_dir / "pipeline_cost.json" if args.smoke
                                 else DEFAULT_OUT.with_name(f"pipeline_cost{suffix}.json")))
    if out_dir.exists():
        if not args.fresh:
            raise SystemExit(f"{out_dir} exists: its stages would come from the cache. Use --fresh to delete it, "
                             f"or another --out-dir")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

    import yaml

    from floe.config import load_yaml

    base = load_yaml(args.base)
    overrides: dict[str, Any] = {"seed": args.seed, "k": k, "data.source": args.data}
    if args.smoke:
        model_dir, data = write_smoke_inputs(out_dir / "smoke_inputs")
        overrides.update(SMOKE_OVERRIDES, **{"model.name": str(model_dir), "data.source": str(data)})
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    trees = run_configs(base, out_dir, overrides)

    t0 = time.perf_counter()
    runs = {name: run_pipeline(name, tree, out_dir, args.in_process, log) for name, tree in trees.items()}
    for name, r in runs.items():
        cached = [s for s, v in r["stages"].items() if v["cached"]]
        if cached:
            raise RuntimeError(f"run {name}: stages {cached} came from a cache; the timings would be wrong")
    res = analyse(runs)
    base_steps = int(trees["floe"]["train"]["max_steps"])
    if not args.no_equal_time:
        sps = res["seconds_per_step"]
        steps = equal_time_steps(base_steps, sps["moe_lora"], sps["floe"], args.max_steps_factor)
        tree = copy.deepcopy(trees["floe"])
        tree["train"]["max_steps"] = steps
        tree["output_dir"] = str(out_dir / "floe_equal_time")
        runs["floe_equal_time"] = run_pipeline("floe_equal_time", tree, out_dir, args.in_process, log)
        res = analyse(runs)
        eq = runs["floe_equal_time"]
        res["equal_time"] = {
            "base_steps": base_steps, "steps": steps,
            "rule": "round(base_steps * moe_lora seconds_per_step / floe seconds_per_step)",
            # train.max_steps is among the warm-up's cache inputs, so run 3 repeats the warm-up and the
            # selection (the same computation: same seed, data and warm-up steps); its layers must match run 1's
            "warmup_cached": bool(eq["stages"]["warmup"]["cached"]),
            "same_layers": eq["methods"]["floe"]["layers"] == runs["floe"]["methods"]["floe"]["layers"],
            "methods": {"moe_lora": _method(runs["moe_lora"], "moe_lora"), "floe": _method(runs["floe"], "floe"),
                        "floe_equal_time": _method(eq, "floe")},
        }
        m = res["equal_time"]["methods"]
        res["equal_time"]["train_seconds_over_moe_lora"] = (m["floe_equal_time"]["train_seconds"]
                                                           / m["moe_lora"]["train_seconds"])
    report = format_report(res)
    log(report)
    result = {
        "benchmark": "pipeline_cost",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "settings": {"base_config": _display(Path(args.base)), "data": args.data if not args.smoke else "toy (smoke)",
                     "seed": args.seed, "k": k, "overrides": {key: v for key, v in overrides.items()
                                                              if key not in ("model.name", "data.source")},
                     "out_dir": _display(out_dir), "separate_processes": not args.in_process},
        **res,
        "num_layers": runs["floe"]["num_layers"],
        "total_wall_seconds": time.perf_counter() - t0,
        "run_wall_seconds": {name: r["wall_seconds"] for name, r in runs.items()},
        "configs": {name: _portable(r["config"], args.smoke) for name, r in runs.items()},
        "versions": package_versions(),
        "machine": _machine(),
        "report": report,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    log(f"[pipeline_cost] wrote {out_path}")
    return result


if __name__ == "__main__":
    main()
