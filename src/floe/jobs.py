"""Job configs (one YAML file each) and the Python entry points the CLI calls.

A notebook can call ``run_train(TrainJob(...))`` exactly as ``floe train`` does.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from floe.adapters.moe_lora import MoELoraConfig, apply_moe_lora, export_peft
from floe.config import to_dict
from floe.io import atomic_write_text
from floe.train import TrainConfig, TrainResult, train


@dataclass
class ModelSpec:
    """Which base model to load."""

    name: str = "smollm2-135m"
    """Built-in name (smollm2-135m), local folder, or hub id (hub needs FLOE_ONLINE=1)."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16, float16 or auto."""


@dataclass
class DataSpec:
    """Which data to train and validate on."""

    source: str = "bigbench:natural_instructions"
    """bigbench:<task>, bigbench:natural_instructions, a JSON/JSONL file, a dataset folder or hub name."""
    max_length: int = 512
    """Longest tokenised example (prompt + response); longer ones are an error unless on_error=skip."""
    max_per_task: int | None = 60
    """Cap on examples per task before splitting (mixtures only; None = all)."""
    max_train_examples: int | None = None
    """Cap on training examples after splitting (None = all)."""
    max_eval_examples: int | None = 128
    """Cap on validation examples (None = all)."""
    fraction: float = 1.0
    """Share of the training split to use (the paper's warm-up uses 0.5)."""
    val_fraction: float = 0.1
    """Share of each task held out for validation."""
    test_fraction: float = 0.1
    """Share of each task held out for test."""
    seed: int = 42
    """Seed of the train/validation/test split and of sampling."""
    on_error: str = "raise"
    """What to do with malformed or over-long examples: raise, or skip (logged)."""
    truncate_prompt: bool = False
    """Cut over-long prompts from the left instead of failing (the response is never cut)."""


@dataclass
class TrainJob:
    """``floe train``: MoE-LoRA fine-tuning of a causal LM on the chosen layers."""

    model: ModelSpec = field(default_factory=ModelSpec)
    """The base model."""
    data: DataSpec = field(default_factory=DataSpec)
    """Training and validation data."""
    adapter: MoELoraConfig = field(default_factory=MoELoraConfig)
    """MoE-LoRA rank, experts, target modules and layers."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimiser, schedule, steps, checkpoints."""
    export_peft: bool = False
    """Also write a standard PEFT LoRA adapter (only when adapter.num_experts = 1)."""


def load_splits(spec: DataSpec, tokenizer):
    """Tokenised (train, validation) datasets for a data spec."""
    from floe.data import load_data

    common = dict(max_length=spec.max_length, seed=spec.seed, max_per_task=spec.max_per_task,
                  val_fraction=spec.val_fraction, test_fraction=spec.test_fraction, on_error=spec.on_error,
                  truncate_prompt=spec.truncate_prompt)
    train_ds = load_data(spec.source, tokenizer, split="train", fraction=spec.fraction,
                         max_examples=spec.max_train_examples, **common)
    eval_ds = load_data(spec.source, tokenizer, split="validation", max_examples=spec.max_eval_examples, **common)
    return train_ds, eval_ds



def run_train(job: TrainJob, log=print) -> TrainResult:
    """Load model and data, attach MoE-LoRA, train, save (and export) the adapter."""
    from floe.models import load_model

    if job.export_peft and job.adapter.num_experts != 1:
        raise ValueError("export_peft needs adapter.num_experts = 1 (plain LoRA); PEFT cannot express a router")
    out = Path(job.train.output_dir)
    t0 = time.perf_counter()
    model, tokenizer = load_model(job.model.name, dtype=job.model.dtype)
    log(f"[floe] model {job.model.name}: loaded in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    train_ds, eval_ds = load_splits(job.data, tokenizer)
    log(f"[floe] data {job.data.source}: {len(train_ds)} train / {len(eval_ds)} validation examples "
        f"({time.perf_counter() - t0:.1f}s)")
    adapter_cfg = dataclasses.replace(job.adapter, base_model_name_or_path=job.model.name)
    wrapped = apply_moe_lora(model, adapter_cfg)
    layers = sorted({int(n.split(".")[-3]) for n in wrapped})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"[floe] MoE-LoRA r={adapter_cfg.r} M={adapter_cfg.num_experts} on {len(wrapped)} modules in "
        f"{len(layers)} layers {layers}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    atomic_write_text(out / "job.yaml", yaml.safe_dump(to_dict(job), sort_keys=False))
    result = train(model, tokenizer, train_ds, eval_ds, job.train)
    if job.export_peft:
        export_peft(model, out / "peft_adapter")
        log(f"[floe] PEFT LoRA adapter written to {out / 'peft_adapter'}")
    log(summarise(result))
    return result


def summarise(r: TrainResult) -> str:
    lines = [f"[floe] trained {r.steps} steps in {r.train_seconds:.1f}s"
             + (f" ({r.seconds_per_step:.2f} s/step median)" if r.seconds_per_step else "")]
    if r.train_losses:
        first, last = r.train_losses[0], r.train_losses[-1]
        lines.append(f"[floe] training loss: {first[1]:.4f} (step {first[0]}) -> {last[1]:.4f} (step {last[0]})")
    if r.initial_eval_loss is not None and r.final_eval_loss is not None:
        lines.append(f"[floe] validation loss: {r.initial_eval_loss:.4f} untrained -> {r.final_eval_loss:.4f} trained")
    lines.append(f"[floe] peak memory: {r.peak_memory_mb:.0f} MiB ({r.peak_memory_kind})")
    if r.adapter_dir:
        lines.append(f"[floe] adapter saved to {r.adapter_dir}")
    return "\n".join(lines)
