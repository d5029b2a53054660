"""Inference latency of the base model, MoE-LoRA on every layer, on k layers, and a merged LoRA.

The paper's Table 4 analogue, on SmolLM2-135M (``floe.load_model("smollm2-135m")``; float32 on
CPU, ``--dtype bfloat16`` on CUDA). Four variants, each built once and timed interleaved in one
run (every repetition times every (variant, batch size) pair once, in a shuffled order; warm-up
repetitions first; medians):

- ``base``          the model itself;
- ``moe_lora_all``  MoE-LoRA (r = 8, M = 4, targets gate/up/down_proj) on every decoder layer;
- ``moe_lora_k``    the same on k layers (``--layers``, or the top ``--k``);
- ``lora_merged``   a PEFT LoRA of rank r on the same targets of every layer, merged into the
                    weights (``merge_and_unload``): the base model's cost with other weights.

Every adapter's B matrices are random (non-zero, as after training), so no product is skipped;
the script checks that each adapted variant's logits differ from the base model's and records
the difference. Dropout is off (eval mode).

Measured per repetition, for batch sizes 1 and 8 (``--batches``), on random prompts of
``--prompt-len`` tokens (no padding):

- ``prefill``   one forward over the prompt with the KV cache on, logits of the last position
                only (as ``generate``'s first step);
- ``decode``    ``--new-tokens`` greedy steps after it, each one forward of the previous token
                with the KV cache, timed together; reported per token;
- ``generate``  (``--generate``) ``model.generate`` end to end, greedy, min_new_tokens =
                max_new_tokens = ``--new-tokens``; its per-token decode is
                (generate − prefill) / (new tokens − 1), the first token coming from the prefill.

Ratios to ``base``: ratio of the medians, and the median of the per-repetition ratios with a 90 %
bootstrap interval (repetitions resampled, pairs kept). Results go to
``benchmarks/results/inference_latency.json`` with the machine's description.

    python benchmarks/inference_latency.py                 # --help for sizes, variants, reps
    python benchmarks/inference_latency.py --smoke --out /some/where.json   # tiny model, seconds
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

VARIANTS = ("base", "moe_lora_all", "moe_lora_k", "lora_merged")
METRICS = ("prefill_ms", "decode_ms_per_token", "generate_ms", "generate_decode_ms_per_token")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "inference_latency.json"


# ----------------------------------------------------------------------------- models

def tiny_model(seed: int = 0):
    """A 4-layer LLaMA-style model with random weights (``--smoke``): the shape of tests/conftest.py's
    ``tiny_model``, a little wider so that rank 8 fits every target."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _randomise_lora_b(model: torch.nn.Module, seed: int, std: float = 0.02) -> int:
    """Give every ``lora_B`` weight random values (trained-like; a zero B could be skipped); returns how many."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))
                n += 1
    return n


def build_variants(load: Callable[[], torch.nn.Module], r: int, experts: int, alpha: float,
                   targets: tuple[str, ...], layers_k: list[int], seed: int) -> tuple[dict[str, torch.nn.Module], dict]:
    """The four variants (each a separately loaded model, in eval mode) and what was attached to each."""
    from peft import LoraConfig, get_peft_model

    from floe.adapters.moe_lora import MoELoraConfig, apply_moe_lora, moe_lora_modules
    from floe.arch import decoder_layers

    models: dict[str, torch.nn.Module] = {}
    info: dict[str, dict[str, Any]] = {}
    models["base"] = load()
    num_layers = len(decoder_layers(models["base"])[1])
    info["base"] = {"layers": [], "adapter_modules": 0}
    for i, (name, layers) in enumerate((("moe_lora_all", None), ("moe_lora_k", layers_k))):
        model = load()
        settings = MoELoraConfig(r=r, num_experts=experts, lora_alpha=alpha, lora_dropout=0.05,
                                 target_modules=list(targets), layers_to_transform=layers)
        wrapped = list(moe_lora_modules(apply_moe_lora(model, settings, seed=seed + i)))
        randomised = _randomise_lora_b(model, seed + 10 + i)
        model.eval()
        n_mods = len(list(moe_lora_modules(model)))
        assert n_mods == len(wrapped) == randomised > 0, (name, n_mods, len(wrapped), randomised)
        info[name] = {"layers": list(range(num_layers)) if layers is None else list(layers),
                      "adapter_modules": n_mods, "r": r, "num_experts": experts, "targets": list(targets)}
        models[name] = model
    model = load()
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), init_lora_weights=False)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed + 2)
        peft = get_peft_model(model, cfg)
    randomised = _randomise_lora_b(peft, seed + 12)
    merged = peft.merge_and_unload().eval()
    left = [n for n, _ in merged.named_parameters() if "lora_" in n]
    assert randomised > 0 and not left, (randomised, left[:3])
    models["lora_merged"] = merged
    info["lora_merged"] = {"layers": list(range(num_layers)), "adapter_modules": randomised, "r": r,
                           "targets": list(targets), "merged": True}
    return models, info


@torch.inference_mode()
def logit_differences(models: dict[str, torch.nn.Module], ids: torch.Tensor) -> dict[str, float]:
    """Max |logit − base logit| of every variant on ``ids``: > 0 shows the adapter is in the forward."""
    ref = models["base"](input_ids=ids).logits.float()
    return {n: float((m(input_ids=ids).logits.float() - ref).abs().max()) for n, m in models.items() if n != "base"}


# ----------------------------------------------------------------------------- timing

def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


@torch.inference_mode()
def time_prefill_decode(model, ids: torch.Tensor, new_tokens: int, sync: Callable[[], None]) -> tuple[float, float]:
    """(prefill seconds, decode seconds per token): one forward over ``ids`` with the cache, then
    ``new_tokens`` greedy single-token steps reading it."""
    mask = torch.ones_like(ids)
    sync()
    t0 = time.perf_counter()
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    sync()
    t1 = time.perf_counter()
    cache = out.past_key_values
    ones = torch.ones_like(nxt)
    for _ in range(new_tokens):
        mask = torch.cat([mask, ones], dim=1)
        out = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    sync()
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / new_tokens


@torch.inference_mode()
def time_generate(model, ids: torch.Tensor, new_tokens: int, pad_id: int, sync: Callable[[], None]) -> float:
    """Seconds of ``model.generate`` (greedy, exactly ``new_tokens`` new tokens, KV cache)."""
    sync()
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=pad_id)
    sync()
    seconds = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
    return seconds


def measure(models: dict[str, torch.nn.Module], prompts: dict[int, torch.Tensor], new_tokens: int, reps: int,
            warmup: int, generate: bool, pad_id: int, device: torch.device, seed: int,
            log: Callable[[str], None] = print) -> dict[tuple[str, int], dict[str, list[float]]]:
    """Timings (seconds) per (variant, batch): every repetition runs each pair once, shuffled."""
    sync = _sync(device)
    units = [(v, b) for b in prompts for v in models]
    times: dict[tuple[str, int], dict[str, list[float]]] = {u: {m: [] for m in METRICS} for u in units}
    rng = random.Random(seed)
    for rep in range(warmup + reps):
        order = units[:]
        rng.shuffle(order)
        t_rep = time.perf_counter()
        for v, b in order:
            pre, dec = time_prefill_decode(models[v], prompts[b], new_tokens, sync)
            gen = time_generate(models[v], prompts[b], new_tokens, pad_id, sync) if generate else None
            if rep < warmup:
                continue
            t = times[(v, b)]
            t["prefill_ms"].append(pre * 1e3)
            t["decode_ms_per_token"].append(dec * 1e3)
            if gen is not None:
                t["generate_ms"].append(gen * 1e3)
                t["generate_decode_ms_per_token"].append((gen - pre) * 1e3 / max(1, new_tokens - 1))
        label = "warm-up" if rep < warmup else f"rep {rep - warmup + 1}/{reps}"
        log(f"  {label}: {time.perf_counter() - t_rep:.1f} s")
    return times


def summarise(times: dict[tuple[str, int], dict[str, list[float]]], seed: int, n_boot: int = 400) -> list[dict]:
    """One row per (variant, batch): median / quartiles of each metric and its ratios to base at that batch."""
    rs = random.Random(seed + 1)
    rows = []
    for (v, b), per in times.items():
        row: dict[str, Any] = {"variant": v, "batch": b}
        base = times[("base", b)]
        for m, xs in per.items():
            if not xs:
                continue
            q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
            row[m] = {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "samples": xs}
            if v == "base":
                continue
            ys = base[m]
            paired = [x / y for x, y in zip(xs, ys)]
            boots = []
            for _ in range(n_boot):
                idx = [rs.randrange(len(paired)) for _ in paired]
                boots.append(statistics.median(paired[i] for i in idx))
            ci = statistics.quantiles(boots, n=20) if len(boots) > 1 else [boots[0]] * 19
            row[m].update(ratio_to_base=statistics.median(xs) / statistics.median(ys),
                          paired_ratio=statistics.median(paired), paired_ratio_90ci=[ci[0], ci[-1]])
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- report

def machine(device: torch.device, dtype: torch.dtype, threads: int) -> dict[str, Any]:
    from floe.provenance import package_versions

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    out: dict[str, Any] = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
                           "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                           "torch_threads": threads, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                           **package_versions(("torch", "transformers", "peft", "floe"))}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def format_table(rows: list[dict], generate: bool) -> str:
    cols = [("prefill_ms", "prefill ms"), ("decode_ms_per_token", "decode ms/tok")]
    if generate:
        cols += [("generate_ms", "generate ms"), ("generate_decode_ms_per_token", "gen ms/tok")]
    head = f"{'variant':<14}{'batch':>6}" + "".join(f"{label:>15}{'× base':>8}" for _, label in cols)
    lines = [head]
    for row in sorted(rows, key=lambda r: (r["batch"], VARIANTS.index(r["variant"]))):
        cells = "".join(f"{row[m]['median']:15.2f}" + (f"{row[m]['ratio_to_base']:8.3f}" if "ratio_to_base" in row[m]
                                                       else f"{'1':>8}") for m, _ in cols)
        lines.append(f"{row['variant']:<14}{row['batch']:>6}" + cells)
    return "\n".join(lines)


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="a built-in name, a local folder or a hub id")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny random 4-layer model and small sizes (seconds; checks the script, not the numbers)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default=None, help="float32 (default) or bfloat16 (CUDA)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 256; --smoke 16)")
    ap.add_argument("--new-tokens", type=int, default=None, help="greedy tokens decoded (default 32; --smoke 4)")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--targets", default="gate_proj,up_proj,down_proj")
    ap.add_argument("--k", type=int, default=None, help="MoE-LoRA on the top k layers (variant moe_lora_k; default 8, "
                                                        "--smoke 2)")
    ap.add_argument("--layers", default="", help="comma-separated layer indices for moe_lora_k instead of the top k")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions of every (variant, batch) (default 10; "
                                                           "--smoke 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed repetitions first (default 2; --smoke 1)")
    ap.add_argument("--generate", action="store_true", help="also time model.generate end to end")
    ap.add_argument("--threads", type=int, default=None, help="default: the CPUs this process may use")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/inference_latency.json; "
                                                "--smoke: runs/inference_latency_smoke.json)")
    args = ap.parse_args(argv)
    defaults = ({"prompt_len": 16, "new_tokens": 4, "reps": 3, "warmup": 1, "k": 2} if args.smoke else
                {"prompt_len": 256, "new_tokens": 32, "reps": 10, "warmup": 2, "k": 8})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out_path = Path(args.out or ("runs/inference_latency_smoke.json" if args.smoke else DEFAULT_OUT))

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    dtype_name = args.dtype or "float32"
    from floe.models import parse_dtype

    dtype = parse_dtype(dtype_name)
    targets = tuple(t for t in args.targets.split(",") if t)
    batches = [int(b) for b in args.batches.split(",")]

    if args.smoke:
        def load():
            return tiny_model(args.seed).to(device=device, dtype=dtype)
    else:
        from floe.models import load_model

        def load():
            return load_model(args.model, dtype=dtype_name, device=device)[0].eval()

    t0 = time.perf_counter()
    from floe.arch import decoder_layers

    probe = load()
    vocab = probe.get_input_embeddings().weight.shape[0]
    num_layers = len(decoder_layers(probe)[1])
    pad_id = probe.config.pad_token_id
    if pad_id is None:
        eos = probe.generation_config.eos_token_id
        pad_id = eos[0] if isinstance(eos, list) else (eos or 0)
    del probe
    layers_k = ([int(i) for i in args.layers.split(",")] if args.layers
                else list(range(num_layers - args.k, num_layers)))
    models, info = build_variants(load, args.r, args.experts, args.alpha, targets, layers_k, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    low = max(1, vocab // 10)  # past the special tokens at the start of the vocabulary
    prompts = {b: torch.randint(low, vocab, (b, args.prompt_len), generator=g).to(device) for b in batches}
    diffs = logit_differences(models, prompts[batches[0]][:, : min(args.prompt_len, 32)])
    if not all(d > 0 for d in diffs.values()):
        raise RuntimeError(f"an adapted variant gives the base model's logits: {diffs}")
    log(f"[inference] {args.model if not args.smoke else 'tiny (smoke)'}: {num_layers} layers, {dtype_name} on "
        f"{device}, {threads} threads; variants built in {time.perf_counter() - t0:.1f} s; "
        f"max |logit - base| {', '.join(f'{k} {v:.3g}' for k, v in diffs.items())}")
    log(f"[inference] prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, batches {batches}, "
        f"{args.reps} interleaved reps after {args.warmup} warm-up")

    times = measure(models, prompts, args.new_tokens, args.reps, args.warmup, args.generate, pad_id, device,
                    args.seed, log=log)
    rows = summarise(times, args.seed)
    table = format_table(rows, args.generate)
    log(table)
    log("ratios: median of the variant / median of base at the same batch size (paired ratios and 90% "
        "bootstrap intervals in the JSON)")
    result = {
        "benchmark": "inference_latency",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "tiny (smoke)" if args.smoke else args.model,
        "smoke": args.smoke,
        "num_layers": num_layers,
        "settings": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batches": batches,
                     "reps": args.reps, "warmup": args.warmup, "generate": args.generate, "seed": args.seed,
                     "r": args.r, "num_experts": args.experts, "alpha": args.alpha, "targets": list(targets),
                     "k_layers": layers_k},
        "machine": machine(device, dtype, threads),
        "variants": info,
        "max_abs_logit_diff_vs_base": diffs,
        "results": rows,
        "table": table,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    log(f"[inference] wrote {out_path}")
    return result


if __name__ == "__main__":
    main()
