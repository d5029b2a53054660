"""Checkpoints and run records of a training run: what a resume must not lose, which saves are
complete, and which earlier run an output folder holds.

Each checkpoint gets ``floe_record.json`` written last (the untrained validation loss, the time
trained so far and the run's settings); a checkpoint without it, or with a cut-short file, was
killed while saving and is skipped. A finished run leaves ``train_metrics.json``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import TrainerCallback

from floe.adapters.moe_lora.model import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    adapter_config,
    load_adapter,
    moe_lora_modules,
    read_weights,
    save_adapter,
)
from floe.config import to_dict
from floe.errors import InputError
from floe.io import atomic_dir, atomic_write_text, share_tree

logger = logging.getLogger("floe.training")

METRICS_FILE = "train_metrics.json"
FULL_WEIGHTS_NAME = "model.safetensors"  # full fine-tuning: the Trainer's and save_pretrained's file
RECORD_FILE = "floe_record.json"  # written last into each checkpoint: what a resume must not lose
# Keys that do not change what a run computes: a re-run may differ in them.
NEUTRAL_KEYS = frozenset({"output_dir", "progress_bar", "report_to", "resume", "overwrite", "save_steps",
                          "save_total_limit", "logging_steps"})


class RunRecord(TrainerCallback):
    """Writes, last, into every checkpoint what a resume must keep: the untrained validation loss,
    the time trained so far and the run's settings. A checkpoint without it is incomplete."""

    def __init__(self, run_config: dict[str, Any], initial_eval_loss: float | None, prior_seconds: float) -> None:
        self.run_config, self.initial_eval_loss, self.prior_seconds = run_config, initial_eval_loss, prior_seconds
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return self.prior_seconds + time.perf_counter() - self.start

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            record = {"step": state.global_step, "initial_eval_loss": self.initial_eval_loss,
                      "train_seconds": self.seconds(), "run_config": self.run_config}
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            share_tree(folder)  # the Trainer's writers make some files private (0600)
            atomic_write_text(folder / RECORD_FILE, json.dumps(record, indent=2) + "\n")


def _checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def _checkpoint_problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from (a save cut short), or None when it is complete."""
    from safetensors import safe_open

    if not (ckpt / RECORD_FILE).is_file():
        return f"no {RECORD_FILE}: its save did not finish"
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "trainer_state.json is missing or cut short"
    full = not (ckpt / ADAPTER_CONFIG_NAME).exists() and (ckpt / FULL_WEIGHTS_NAME).exists()  # full fine-tuning
    try:
        with safe_open(str(ckpt / (FULL_WEIGHTS_NAME if full else ADAPTER_WEIGHTS_NAME)), framework="pt"):
            pass
        json.loads((ckpt / ("config.json" if full else ADAPTER_CONFIG_NAME)).read_text())
    except Exception:  # safetensors raises its own error type for a cut file
        return f"its {'model' if full else 'adapter'} is missing or cut short"
    for name in ("optimizer.pt", "scheduler.pt"):
        if not zipfile.is_zipfile(ckpt / name):
            return f"{name} is missing or cut short"
    return None


def complete_checkpoints(output_dir: str | os.PathLike, remove_damaged: bool = False) -> list[Path]:
    """Checkpoints in ``output_dir`` that a run can resume from, newest first.

    A damaged one (its save was killed: no record file, or a cut-short file) is skipped with a
    one-line warning naming it, and removed when ``remove_damaged``.
    """
    out = Path(output_dir)
    found = sorted((p for p in out.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)),
                   key=_checkpoint_step, reverse=True)
    good = []
    for ckpt in found:
        problem = _checkpoint_problem(ckpt)
        if problem is None:
            good.append(ckpt)
            continue
        logger.warning("skipping damaged checkpoint %s (%s)%s", ckpt, problem,
                       "; removed it" if remove_damaged else "")
        if remove_damaged:
            shutil.rmtree(ckpt, ignore_errors=True)
    return good


def clear_run(output_dir: str | os.PathLike) -> None:
    """Remove what a training run writes into ``output_dir`` (for ``overwrite``)."""
    out = Path(output_dir)
    for p in [*out.glob("checkpoint-*"), out / "adapter", out / "model", out / "peft_adapter", out / "runs"]:
        shutil.rmtree(p, ignore_errors=True)
    for name in (METRICS_FILE, "job.yaml"):
        (out / name).unlink(missing_ok=True)


def _earlier_run(out: Path, checkpoints: list[Path]) -> tuple[dict | None, dict | None]:
    """(settings, finished metrics) of the run already in ``out``, from its metrics or newest checkpoint."""
    if (out / METRICS_FILE).is_file():
        metrics = json.loads((out / METRICS_FILE).read_text())
        return metrics.get("run_config"), metrics
    if checkpoints:
        return json.loads((checkpoints[0] / RECORD_FILE).read_text())["run_config"], None
    return None, None


def _refuse_other_run(out: Path, differences: list[str]) -> None:
    raise InputError(
        f"{out} holds a run with other settings ({'; '.join(differences[:6])}"
        f"{'; ...' if len(differences) > 6 else ''}): choose another output_dir (--output-dir), "
        "or set overwrite: true (--overwrite) to delete that run and start afresh")


def prepare_output(out: Path, settings: dict[str, Any], resume: bool,
                   overwrite: bool) -> tuple[dict | None, Path | None, dict[str, Any]]:
    """What ``out`` holds for a run of ``settings``: ``(finished metrics, checkpoint to resume from,
    its record)``, each None/empty when there is none.

    ``overwrite`` clears ``out`` first. An earlier run with other settings is refused
    (``InputError``), and so is one of these settings when ``resume`` is off. Damaged checkpoints
    are skipped (and removed when ``resume``).
    """
    from floe.config import config_differences

    if overwrite:
        clear_run(out)
    checkpoints = complete_checkpoints(out, remove_damaged=resume) if out.is_dir() else []
    earlier, finished = _earlier_run(out, checkpoints)
    if earlier is not None:
        differences = config_differences(earlier, settings)
        if differences:
            _refuse_other_run(out, differences)
        if not resume:
            raise InputError(f"{out} holds a run of these settings and resume is off: set resume: true to "
                             "continue it, overwrite: true (--overwrite) to start afresh, or use another output_dir")
    resume_from = checkpoints[0] if checkpoints and finished is None else None
    record = json.loads((resume_from / RECORD_FILE).read_text()) if resume_from else {}
    return finished, resume_from, record


def is_moe_lora(model) -> bool:
    """Whether the model's adapter is MoE-LoRA (not another PEFT method)."""
    return bool(moe_lora_modules(model))


def _adapter_settings(model) -> dict[str, Any]:
    """The adapter's settings: MoE-LoRA's short form, or any other PEFT method's config."""
    if not isinstance(model, PeftModel):
        return {"full_finetune": True}
    if is_moe_lora(model):
        return to_dict(adapter_config(model))
    return {k: v for k, v in model.peft_config[model.active_adapter].to_dict().items() if k != "revision"}


def training_settings(cfg: Any, model) -> dict[str, Any]:
    """The settings that determine a run's result: the training ones of ``cfg`` (a ``TrainConfig``) bar
    ``NEUTRAL_KEYS``, and the adapter's."""
    settings = {"train": {k: v for k, v in asdict(cfg).items() if k not in NEUTRAL_KEYS},
                "adapter": _adapter_settings(model)}
    return json.loads(json.dumps(settings, default=str))  # tuples -> lists, as read back from a file


def weights_folder(out: Path, model) -> Path:
    """Where a finished run's weights go: ``adapter/``, or ``model/`` for full fine-tuning (no adapter)."""
    return out / ("adapter" if isinstance(model, PeftModel) else "model")


def save_run_adapter(model, folder: Path) -> None:
    """Save a run's final adapter (any PEFT method: PEFT's folder), or for full fine-tuning the whole
    model (``save_pretrained``'s safetensors), atomically."""
    if isinstance(model, PeftModel):
        save_adapter(model, folder)
    else:
        atomic_dir(folder, lambda tmp: model.save_pretrained(str(tmp), safe_serialization=True))


def load_run_adapter(model, folder: Path) -> None:
    """Load a finished run's weights (written by :func:`save_run_adapter`) into ``model``, trainable."""
    if is_moe_lora(model):
        load_adapter(model, folder, trainable=True)  # FLoE's checks: same layers, rank and scaling
    elif isinstance(model, PeftModel):  # another PEFT method (the pipeline's baselines): PEFT's loader
        model.load_adapter(str(folder), adapter_name=model.active_adapter, is_trainable=True)
    else:
        load_full_weights(model, folder)


def load_full_weights(model, folder: Path) -> None:
    """Load a full fine-tuning's ``model.safetensors`` into ``model`` (a tied output matrix may be absent)."""
    missing, unexpected = model.load_state_dict(read_weights(folder / FULL_WEIGHTS_NAME), strict=False)
    tied = {"lm_head.weight"} if getattr(getattr(model, "config", None), "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise InputError(f"{folder / FULL_WEIGHTS_NAME} does not fit the model: missing {sorted(set(missing) - tied)[:4]}, "
                         f"unexpected {sorted(unexpected)[:4]}; was it saved from another base model?")
