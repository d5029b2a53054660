"""``floe allocate``: FIM-LoRA per-matrix rank allocation, written as a standard PEFT config."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from floe.errors import InputError

from .allocator import DEFAULT_TARGETS, AllocateConfig, allocate_ranks, save_allocation
from .fim import REDUCTIONS, SCORE_KINDS

DESCRIPTION = """FIM-LoRA: attach plain LoRA at the budget rank, run a few calibration backward passes,
score every adapted matrix by the variance (or mean square) of its LoRA-B gradient and spread
(number of matrices x budget rank) proportionally to the scores, largest-remainder rounded so the
total is kept exactly. Writes adapter_config.json (a PEFT LoraConfig with rank_pattern),
allocation.json (scores and ranks per matrix) and rank_map.png into --output."""


def _targets(text: str) -> tuple[str, ...]:
    out = tuple(t.strip() for t in text.split(",") if t.strip())
    if not out:
        raise argparse.ArgumentTypeError("--target-modules expects comma-separated names, e.g. gate_proj,up_proj,down_proj")
    return out


def add_allocate_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``floe allocate`` on an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser("allocate", help="FIM-LoRA: per-matrix LoRA ranks from calibration gradients",
                              description=DESCRIPTION)
    p.add_argument("--method", choices=["fim"], default="fim", help="allocation method (default: fim)")
    p.add_argument("--budget-rank", type=int, default=8, help="average rank per matrix (default: 8)")
    p.add_argument("--model", default="smollm2-135m", help="built-in name (smollm2-135m), local folder or hub id")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto (default: float32)")
    p.add_argument("--data", default="bigbench:natural_instructions",
                   help="calibration data: bigbench:<task>, bigbench:natural_instructions, a JSON/JSONL file or folder")
    p.add_argument("--split", default="train", help="split of --data to calibrate on (default: train)")
    p.add_argument("--max-length", type=int, default=512, help="longest tokenised example (default: 512)")
    p.add_argument("--output", "-o", help="folder for adapter_config.json, allocation.json, rank_map.png")
    p.add_argument("--target-modules", type=_targets, default=DEFAULT_TARGETS,
                   help="comma-separated linear layers to adapt (default: gate_proj,up_proj,down_proj; "
                        "add q_proj,k_proj,v_proj,o_proj for attention)")
    p.add_argument("--num-passes", type=int, default=8, help="calibration backward passes, one batch each (default: 8)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per calibration batch (default: 4)")
    p.add_argument("--score", choices=SCORE_KINDS, default="variance",
                   help="LoRA-B gradient statistic over the passes (default: variance)")
    p.add_argument("--reduction", choices=REDUCTIONS, default="mean",
                   help="per-matrix reduction of the per-element statistic (default: mean)")
    p.add_argument("--min-rank", type=int, default=1, help="smallest rank per matrix (default: 1)")
    p.add_argument("--max-rank", type=int, default=None, help="largest rank per matrix (default: 4 x budget rank)")
    p.add_argument("--total-rank", type=int, default=None,
                   help="total rank to spread (default: number of matrices x budget rank)")
    p.add_argument("--lora-alpha", type=float, default=None, help="lora_alpha of the emitted config (default: 2 x budget rank)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="lora_dropout of the emitted config (default: 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data sample and of LoRA-A's initialisation")
    p.add_argument("--device", default=None, help="cpu, cuda, or auto (default: keep the model on CPU)")
    p.add_argument("--save-adapter", action="store_true",
                   help="also save an initialised adapter (adapter_model.safetensors) for PeftModel.from_pretrained")
    p.add_argument("--no-plot", action="store_true", help="do not draw rank_map.png")
    p.add_argument("--config", "-c", help="YAML file: an `allocate:` section with these flags' names (e.g. "
                   "budget_rank: 8), plus `model:`/`data:` sections as in a floe train config; flags override it")
    p.set_defaults(func=run_allocate, _defaults={a.dest: a.default for a in p._actions if a.dest != "help"})
    return p


# keys of a floe train config's sections that mean the same here
_SHARED_KEYS = {"model.name": "model", "model.dtype": "dtype", "data.source": "data", "data.max_length": "max_length"}


def apply_config_file(args: argparse.Namespace) -> None:
    """Fill the flags the user did not give from ``--config`` (flags win; unknown keys are errors)."""
    from floe.config import ConfigError, _suggest, load_yaml

    tree = load_yaml(args.config)
    defaults = args._defaults
    values = dict(tree.get("allocate") or {})
    for dotted, dest in _SHARED_KEYS.items():
        section, key = dotted.split(".")
        if isinstance(tree.get(section), dict) and key in tree[section]:
            values.setdefault(dest, tree[section][key])
    known = [d for d in defaults if d not in ("config", "func", "_defaults")]
    for key, value in values.items():
        dest = key.replace("-", "_")
        if dest not in known:
            raise ConfigError(f"{args.config}: unknown allocate key '{key}'{_suggest(dest, known)}; "
                              f"valid keys: {', '.join(known)}")
        if getattr(args, dest) == defaults[dest]:  # not given on the command line
            setattr(args, dest, _targets(value) if dest == "target_modules" and isinstance(value, str) else
                    tuple(value) if dest == "target_modules" else value)


def config_from_args(args: argparse.Namespace) -> AllocateConfig:
    return AllocateConfig(
        budget_rank=args.budget_rank, target_modules=tuple(args.target_modules), num_passes=args.num_passes,
        score=args.score, reduction=args.reduction, min_rank=args.min_rank, max_rank=args.max_rank,
        total_rank=args.total_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, seed=args.seed,
    )


def run_allocate(args: argparse.Namespace, log=print) -> int:
    """Load model and calibration data, allocate, write the outputs (input errors: ``InputError``)."""
    import transformers

    if args.config:
        apply_config_file(args)
    if args.output is None:
        raise InputError("--output is required (or `output:` in the allocate section of --config): "
                         "the folder for adapter_config.json, allocation.json and rank_map.png")
    cfg = config_from_args(args)
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be a positive integer, got {args.batch_size}")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output {out} exists and is not a folder; choose another --output")

    from floe.data import load_data
    from floe.data.collate import DataCollator, iter_batches
    from floe.models import load_model

    transformers.set_seed(args.seed)  # LoRA-A init and anything else drawn from the global generators
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    log(f"[floe] model {args.model}: loaded in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    n_examples = cfg.num_passes * args.batch_size
    # truncate_prompt: an over-long instruction loses its left end rather than failing the run
    data = load_data(args.data, tokenizer, split=args.split, max_examples=n_examples,
                     max_length=args.max_length, seed=args.seed, truncate_prompt=True)
    if len(data) < n_examples:
        raise InputError(f"--data {args.data} ({args.split} split) has {len(data)} examples; "
                         f"{cfg.num_passes} passes x batch size {args.batch_size} need {n_examples}. "
                         f"Lower --num-passes or --batch-size, or use more data.")
    log(f"[floe] calibration data {args.data}: {len(data)} examples ({time.perf_counter() - t0:.1f}s)")
    batches = iter_batches(data, args.batch_size, DataCollator(tokenizer), shuffle=True, seed=args.seed)
    allocation = allocate_ranks(model, batches, cfg)
    allocation.base_model_name_or_path = args.model
    save_allocation(allocation, out, model=model, save_adapter=args.save_adapter, plot=not args.no_plot)
    log(summary(allocation, out))
    return 0


def summary(allocation, out: Path) -> str:
    """A few lines: timing, budget, rank statistics per module type, where the files are."""
    from collections import defaultdict

    by_module: dict[str, list[int]] = defaultdict(list)
    for name, r in zip(allocation.names, allocation.ranks):
        by_module[allocation.layer_and_module(name)[1]].append(r)
    lines = [f"[floe] FIM-LoRA ({allocation.config.score}, {allocation.config.num_passes} passes): "
             f"{len(allocation.ranks)} matrices, total rank {sum(allocation.ranks)} "
             f"(= {allocation.total_rank}), {allocation.seconds:.1f}s"]
    for module, ranks in by_module.items():
        lines.append(f"[floe]   {module:>16}: mean rank {sum(ranks) / len(ranks):.2f}, min {min(ranks)}, "
                     f"max {max(ranks)}")
    lines.append(f"[floe] wrote {out / 'adapter_config.json'}, allocation.json, "
                 f"{'rank_map.png' if (out / 'rank_map.png').exists() else '(no plot)'}")
    return "\n".join(lines)
