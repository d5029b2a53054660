"""``floe allocate``: FIM-LoRA per-matrix rank allocation, written as a standard PEFT config."""
from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from floe.errors import InputError
from floe.flags import COMMON_FLAGS, FlagTable, add_job_command, job_from_args
from floe.specs import DataSpec, ModelSpec

from .allocator import AllocateConfig
from .fim import REDUCTIONS, SCORE_KINDS

DESCRIPTION = """FIM-LoRA: attach plain LoRA at the budget rank, run a few calibration backward passes,
score every adapted matrix by the variance (or mean square) of its LoRA-B gradient and spread
(number of matrices x budget rank) proportionally to the scores, largest-remainder rounded so the
total is kept exactly. Writes adapter_config.json (a PEFT LoraConfig with rank_pattern),
allocation.json (scores and ranks per matrix) and rank_map.png into --output."""

EPILOG = """A YAML file (--config) holds an `allocate:` section whose keys are these flags' names
(e.g. budget_rank: 8, output: runs/allocate) and `model:`/`data:` sections as in a floe train
config (a floe train config works as is); flags override it and --set allocate.key=value any key.
`floe allocate --print-config` lists every key with its default."""


@dataclass
class AllocateSettings(AllocateConfig):
    """The ``allocate:`` section: how FIM-LoRA scores and spreads ranks, and where it writes them."""

    method: str = "fim"
    """Allocation method (fim is the only one)."""
    split: str = "train"
    """Split of data.source to calibrate on."""
    batch_size: int = 4
    """Examples per calibration batch (num_passes batches are drawn)."""
    output: str | None = None
    """Folder for adapter_config.json, allocation.json and rank_map.png (required)."""
    device: str | None = None
    """cpu, cuda, or auto (None: keep the model on CPU)."""
    save_adapter: bool = False
    """Also save an initialised adapter (adapter_model.safetensors) for PeftModel.from_pretrained."""
    no_plot: bool = False
    """Do not draw rank_map.png."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method != "fim":
            raise InputError(f"method must be fim (the only allocation method), got {self.method!r}")

    def allocate_config(self) -> AllocateConfig:
        """The FIM-LoRA settings alone (what ``allocation.json`` records)."""
        return AllocateConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AllocateConfig)})


@dataclass
class AllocateJob:
    """``floe allocate``: FIM-LoRA per-matrix LoRA ranks from calibration gradients."""

    model: ModelSpec = field(default_factory=ModelSpec)
    """The base model."""
    data: DataSpec = field(default_factory=DataSpec)
    """Calibration data: source and max_length are read (the sample is drawn with allocate.seed; an
    over-long prompt is cut from the left)."""
    allocate: AllocateSettings = field(default_factory=AllocateSettings)
    """Budget, scoring, rank bounds, emitted LoRA settings and outputs."""


def _targets(text: str) -> tuple[str, ...]:
    out = tuple(t.strip() for t in text.split(",") if t.strip())
    if not out:
        raise argparse.ArgumentTypeError("--target-modules expects comma-separated names, e.g. gate_proj,up_proj,down_proj")
    return out


# flag → (dotted key of AllocateJob, argparse kwargs)
ALLOCATE_FLAGS: FlagTable = {
    **COMMON_FLAGS,
    "--method": ("allocate.method", dict(choices=["fim"], help="allocation method (default: fim)")),
    "--budget-rank": ("allocate.budget_rank", dict(type=int, help="average rank per matrix (default: 8)")),
    "--split": ("allocate.split", dict(help="split of --data to calibrate on (default: train)")),
    "--output -o": ("allocate.output", dict(help="folder for adapter_config.json, allocation.json, rank_map.png")),
    "--target-modules": ("allocate.target_modules", dict(
        type=_targets, help="comma-separated linear layers to adapt (default: gate_proj,up_proj,down_proj; "
                            "add q_proj,k_proj,v_proj,o_proj for attention)")),
    "--num-passes": ("allocate.num_passes", dict(type=int, help="calibration backward passes, one batch each (default: 8)")),
    "--batch-size": ("allocate.batch_size", dict(type=int, help="examples per calibration batch (default: 4)")),
    "--score": ("allocate.score", dict(choices=SCORE_KINDS, help="LoRA-B gradient statistic over the passes (default: variance)")),
    "--reduction": ("allocate.reduction", dict(choices=REDUCTIONS, help="per-matrix reduction of the per-element statistic (default: mean)")),
    "--min-rank": ("allocate.min_rank", dict(type=int, help="smallest rank per matrix (default: 1)")),
    "--max-rank": ("allocate.max_rank", dict(type=int, help="largest rank per matrix (default: 4 x budget rank)")),
    "--total-rank": ("allocate.total_rank", dict(type=int, help="total rank to spread (default: number of matrices x budget rank)")),
    "--lora-alpha": ("allocate.lora_alpha", dict(type=float, help="lora_alpha of the emitted config (default: 2 x budget rank)")),
    "--lora-dropout": ("allocate.lora_dropout", dict(type=float, help="lora_dropout of the emitted config (default: 0.05)")),
    "--seed": ("allocate.seed", dict(type=int, help="seed of the data sample and of LoRA-A's initialisation (default: 0)")),
    "--device": ("allocate.device", dict(help="cpu, cuda, or auto (default: keep the model on CPU)")),
    "--save-adapter": ("allocate.save_adapter", dict(action="store_const", const=True, help=(
        "also save an initialised adapter (adapter_model.safetensors) for PeftModel.from_pretrained"))),
    "--no-plot": ("allocate.no_plot", dict(action="store_const", const=True, help="do not draw rank_map.png")),
}

# Spellings an allocate section accepted before it had model/data sections of its own: the flag
# names of --model/--dtype/--data/--max-length, and any key with '-' for '_'.
MOVED_KEYS = {"allocate.model": "model.name", "allocate.dtype": "model.dtype", "allocate.data": "data.source",
              "allocate.max_length": "data.max_length",
              **{f"allocate.{f.name.replace('_', '-')}": f"allocate.{f.name}"
                 for f in dataclasses.fields(AllocateSettings) if "_" in f.name}}


def add_allocate_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``floe allocate`` on an ``argparse`` sub-parser collection."""
    return add_job_command(subparsers, "allocate", ALLOCATE_FLAGS, run_allocate, epilog=EPILOG,
                           help="FIM-LoRA: per-matrix LoRA ranks from calibration gradients", description=DESCRIPTION)


def job_from(args: argparse.Namespace) -> AllocateJob:
    """The job of the command line: --config, then flags, then --set (a floe train config works as is)."""
    return job_from_args(AllocateJob, args, ALLOCATE_FLAGS, other_commands_sections=("adapter", "train", "export_peft"),
                         moved_keys=MOVED_KEYS)


def run_allocate(args: argparse.Namespace, log=print) -> int:
    """Entry point of ``floe allocate`` (input errors: ``InputError``, reported by ``floe.cli.main``)."""
    from floe.config import describe

    if getattr(args, "print_config", False):
        print("\n".join(describe(job_from(args))))  # the job as resolved: file, flags, --set
        return 0
    run_job(job_from(args), log=log)
    return 0


def run_job(job: AllocateJob, log=print):
    """Load model and calibration data, allocate, write the outputs; returns the ``Allocation``."""
    import transformers

    a = job.allocate
    if a.output is None:
        raise InputError("--output is required (or `output:` in the allocate section of --config): "
                         "the folder for adapter_config.json, allocation.json and rank_map.png")
    cfg = a.allocate_config()
    if a.batch_size < 1:
        raise InputError(f"--batch-size must be a positive integer, got {a.batch_size}")
    out = Path(a.output)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output {out} exists and is not a folder; choose another --output")

    from floe.data import load_data
    from floe.data.collate import DataCollator, iter_batches
    from floe.models import load_model

    from .allocator import allocate_ranks, save_allocation

    transformers.set_seed(a.seed)  # LoRA-A init and anything else drawn from the global generators
    t0 = time.perf_counter()
    model, tokenizer = load_model(job.model.name, dtype=job.model.dtype, device=a.device)
    log(f"[floe] model {job.model.name}: loaded in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    n_examples = cfg.num_passes * a.batch_size
    source = job.data.source
    # truncate_prompt: an over-long instruction loses its left end rather than failing the run
    data = load_data(source, tokenizer, split=a.split, max_examples=n_examples,
                     max_length=job.data.max_length, seed=a.seed, truncate_prompt=True)
    if len(data) < n_examples:
        raise InputError(f"--data {source} ({a.split} split) has {len(data)} examples; "
                         f"{cfg.num_passes} passes x batch size {a.batch_size} need {n_examples}. "
                         f"Lower --num-passes or --batch-size, or use more data.")
    log(f"[floe] calibration data {source}: {len(data)} examples ({time.perf_counter() - t0:.1f}s)")
    batches = iter_batches(data, a.batch_size, DataCollator(tokenizer), shuffle=True, seed=a.seed)
    allocation = allocate_ranks(model, batches, cfg)
    allocation.base_model_name_or_path = job.model.name
    save_allocation(allocation, out, model=model, save_adapter=a.save_adapter, plot=not a.no_plot)
    log(summary(allocation, out))
    return allocation


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
