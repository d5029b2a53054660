"""The training job (one YAML file) and its Python entry point, the one ``floe train`` calls.

A notebook can call ``run_train(TrainJob(...))`` exactly as ``floe train`` does.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from floe.adapters.moe_lora import MoELoraConfig, apply_moe_lora, moe_lora_modules
from floe.arch import trainable_parameter_count
from floe.checkpoints import METRICS_FILE, NEUTRAL_KEYS, clear_run
from floe.config import config_differences, to_dict
from floe.errors import InputError
from floe.io import atomic_write_text
from floe.specs import DataSpec, ModelSpec, load_splits
from floe.training import TrainConfig, TrainResult, train


@dataclass
class TrainJob:
    """``floe train``: MoE-LoRA fine-tuning of a causal LM on the chosen layers."""

    model: ModelSpec = field(default_factory=ModelSpec)
    """The base model."""
    data: DataSpec = field(default_factory=DataSpec)
    """Training and validation data."""
    adapter: MoELoraConfig = field(default_factory=MoELoraConfig)
    """MoE-LoRA (PEFT's LoraConfig names): rank, experts, lora_alpha, target modules, layers_to_transform."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimiser, schedule, steps, checkpoints."""
    export_peft: bool = False
    """Also write a standard PEFT LoRA adapter (only when adapter.num_experts = 1)."""


def _finished_or_refused(job: TrainJob, out: Path) -> TrainResult | None:
    """Check an earlier run in ``out`` before anything is loaded or written.

    Same settings and finished: its result (nothing is trained or rewritten). Other settings:
    an ``InputError`` naming the differing keys and the two ways out. Otherwise None.
    """
    if job.train.overwrite or not (out / "job.yaml").is_file():
        return None
    earlier = yaml.safe_load((out / "job.yaml").read_text()) or {}
    differences = config_differences(earlier, to_dict(job), ignore=frozenset(f"train.{k}" for k in NEUTRAL_KEYS))
    if differences:
        raise InputError(
            f"{out} holds a run with other settings ({'; '.join(differences[:6])}"
            f"{'; ...' if len(differences) > 6 else ''}): choose another --output-dir, or pass --overwrite "
            "to delete that run and start afresh")
    if job.train.resume and (out / METRICS_FILE).is_file():
        return TrainResult.from_dict(json.loads((out / METRICS_FILE).read_text()))
    return None


def run_train(job: TrainJob, log=print) -> TrainResult:
    """Load model and data, attach MoE-LoRA (initialised from ``job.train.seed``), train, save.

    Re-running a finished job only reports it; a job whose ``output_dir`` holds a run with other
    settings fails before anything is written (``--overwrite`` deletes that run first).
    """
    from floe.models import load_model

    if job.export_peft and job.adapter.num_experts != 1:
        raise InputError(f"export_peft needs adapter.num_experts = 1 (plain LoRA), got {job.adapter.num_experts}: "
                         "PEFT's LoRA format cannot express a router; drop --export-peft or pass --experts 1")
    out = Path(job.train.output_dir)
    finished = _finished_or_refused(job, out)
    if finished is not None:
        log(f"[floe] {out} holds a finished run of this job: nothing to do (--overwrite trains it again)")
        log(summarise(finished))
        return finished
    t0 = time.perf_counter()
    model, tokenizer = load_model(job.model.name, dtype=job.model.dtype)
    log(f"[floe] model {job.model.name}: loaded in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    train_ds, eval_ds = load_splits(job.data, tokenizer)
    log(f"[floe] data {job.data.source}: {len(train_ds)} train / {len(eval_ds)} validation examples "
        f"({time.perf_counter() - t0:.1f}s)")
    adapter_cfg = dataclasses.replace(job.adapter, base_model_name_or_path=job.model.name)
    model = apply_moe_lora(model, adapter_cfg, seed=job.train.seed)
    wrapped = list(moe_lora_modules(model))
    layers = sorted({int(n.split(".")[-3]) for n in wrapped})
    trainable, total = trainable_parameter_count(model)
    log(f"[floe] MoE-LoRA r={adapter_cfg.r} M={adapter_cfg.num_experts} on {len(wrapped)} modules in "
        f"{len(layers)} layers {layers}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    if job.train.overwrite:
        clear_run(out)
    job_text = yaml.safe_dump(to_dict(job), sort_keys=False)
    if not (out / "job.yaml").is_file() or (out / "job.yaml").read_text() != job_text:
        atomic_write_text(out / "job.yaml", job_text)
    result = train(model, tokenizer, train_ds, eval_ds, dataclasses.replace(job.train, overwrite=False))
    if job.export_peft:
        # An M = 1 adapter folder already is a plain PEFT LoRA adapter: the export is a copy of it.
        shutil.copytree(out / "adapter", out / "peft_adapter", dirs_exist_ok=True)
        log(f"[floe] PEFT LoRA adapter written to {out / 'peft_adapter'}")
    log(summarise(result))
    return result


def summarise(r: TrainResult) -> str:
    lines = [f"[floe] trained {r.steps} steps in {r.train_seconds:.1f}s"
             + (f" ({r.seconds_per_step:.2f} s/step median)" if r.seconds_per_step else "")]
    if len(r.train_losses) > 1:
        first, last = r.train_losses[0], r.train_losses[-1]
        lines.append(f"[floe] training loss: {first[1]:.4f} (step {first[0]}) -> {last[1]:.4f} (step {last[0]})")
    elif r.train_losses:
        lines.append(f"[floe] training loss: {r.train_losses[0][1]:.4f} (step {r.train_losses[0][0]})")
    if r.initial_eval_loss is not None and r.final_eval_loss is not None:
        lines.append(f"[floe] validation loss: {r.initial_eval_loss:.4f} untrained -> {r.final_eval_loss:.4f} trained")
    lines.append(f"[floe] peak memory: {r.peak_memory_mb:.0f} MiB ({r.peak_memory_kind})")
    if r.adapter_dir:
        lines.append(f"[floe] adapter saved to {r.adapter_dir}")
    return "\n".join(lines)
