"""Training of MoE-LoRA adapters on top of the Hugging Face ``Trainer``.

Using ``Trainer`` (not a hand loop) buys multi-GPU/multi-node for free: the same call
runs under ``accelerate launch`` or ``torchrun``. Checkpoints hold only the adapter
(plus optimizer/scheduler/RNG state), never the frozen base weights.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from floe.adapters.moe_lora import (
    adapter_state_dict,
    load_adapter,
    moe_lora_modules,
    router_aux_loss,
    save_adapter,
)
from floe.adapters.moe_lora.model import adapter_config
from floe.io import atomic_write_text


@dataclass
class TrainConfig:
    """Training hyperparameters. Defaults follow the paper's Table 6 where it gives one."""

    output_dir: str = "runs/train"
    """Folder for checkpoints, TensorBoard logs, the final adapter and metrics."""
    learning_rate: float = 2e-4
    """Peak learning rate of AdamW (Table 6)."""
    weight_decay: float = 0.0
    """AdamW weight decay (Table 6: 0)."""
    warmup_ratio: float = 0.03
    """Share of the steps spent in linear warm-up (Table 6)."""
    lr_scheduler: str = "cosine"
    """Learning-rate schedule after warm-up (any transformers scheduler name)."""
    num_epochs: float = 1.0
    """Passes over the training data (Table 6: 1); ignored when max_steps > 0."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: use num_epochs)."""
    batch_size: int = 4
    """Examples per device per forward pass."""
    gradient_accumulation_steps: int = 1
    """Forward passes per optimizer step (effective batch = batch_size × this × devices)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    bf16: bool = False
    """Train under bfloat16 autocast (needs a GPU or a CPU with bf16 support)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    seed: int = 41
    """Random seed for adapter init, data order and dropout (Table 6: 41)."""
    logging_steps: int = 5
    """Log the training loss every this many steps."""
    eval_steps: int = 0
    """Evaluate every this many steps (0: only at the start and the end)."""
    eval_before_training: bool = True
    """Measure the validation loss of the untrained adapter first (B = 0: the base model)."""
    save_steps: int = 50
    """Write a resumable checkpoint every this many steps."""
    save_total_limit: int = 2
    """Keep at most this many checkpoints."""
    resume: bool = True
    """Resume from the newest checkpoint in output_dir when there is one."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Logging integrations (tensorboard, wandb, ...; [] for none)."""
    progress_bar: bool = True
    """Show a tqdm progress bar."""

    def __post_init__(self) -> None:
        checks = {
            "learning_rate": self.learning_rate > 0,
            "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "batch_size": self.batch_size >= 1,
            "gradient_accumulation_steps": self.gradient_accumulation_steps >= 1,
            "num_epochs": self.num_epochs > 0 or self.max_steps > 0,
            "max_steps": self.max_steps == -1 or self.max_steps >= 1,
            "save_steps": self.save_steps >= 1,
            "logging_steps": self.logging_steps >= 1,
            "eval_steps": self.eval_steps >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid TrainConfig value(s): {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass
class TrainResult:
    """What a training run measured."""

    steps: int
    train_losses: list[tuple[int, float]]
    eval_losses: list[tuple[int, float]]
    initial_eval_loss: float | None
    final_eval_loss: float | None
    seconds_per_step: float | None
    train_seconds: float
    peak_memory_mb: float
    peak_memory_kind: str
    trainable_params: int
    total_params: int
    adapter_dir: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _StepTimer(TrainerCallback):
    """Wall time of each optimizer step (evaluation and saving excluded)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0: float | None = None

    def on_step_begin(self, args, state, control, **kw):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if self._t0 is not None:
            self.times.append(time.perf_counter() - self._t0)
            self._t0 = None


class MoELoraTrainer(Trainer):
    """``Trainer`` that adds the router load-balancing loss and checkpoints only the adapter."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        coef = adapter_config(self.accelerator.unwrap_model(model)).router_aux_loss_coef
        if coef > 0 and model.training:
            aux = router_aux_loss(self.accelerator.unwrap_model(model))
            if aux is not None:
                if return_outputs:
                    return out[0] + coef * aux, out[1]
                return out + coef * aux
        return out

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        save_adapter(self.accelerator.unwrap_model(self.model), Path(output_dir) / "adapter")
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_adapter(model or self.model, Path(resume_from_checkpoint) / "adapter", trainable=True)


def _peak_memory() -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def _training_args(cfg: TrainConfig, has_eval: bool) -> TrainingArguments:
    eval_strategy = "steps" if (has_eval and cfg.eval_steps > 0) else "no"
    return TrainingArguments(
        output_dir=cfg.output_dir,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=cfg.lr_scheduler,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_grad_norm=cfg.max_grad_norm,
        bf16=cfg.bf16,
        activation_checkpointing=cfg.gradient_checkpointing,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy=eval_strategy,
        eval_steps=cfg.eval_steps or None,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=cfg.report_to,
        disable_tqdm=not cfg.progress_bar,
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        optim="adamw_torch",
        # CPU-only machines: accelerate needs to be told, or torchrun processes train unsynchronised.
        use_cpu=not (torch.cuda.is_available() or _has_mps()),
        ddp_backend="gloo" if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )


def _has_mps() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def train(model, tokenizer, train_data, eval_data=None, config: TrainConfig | None = None,
          callbacks: list[TrainerCallback] | None = None) -> TrainResult:
    """Train the MoE-LoRA adapter already applied to ``model`` (see ``apply_moe_lora``).

    Saves the final adapter to ``<output_dir>/adapter`` and the metrics to
    ``<output_dir>/train_metrics.json``; resumes from the newest checkpoint when
    ``config.resume`` and one exists.
    """
    from floe.data import DataCollator

    cfg = config or TrainConfig()
    if not moe_lora_modules(model):
        raise ValueError("train() needs a model with MoE-LoRA layers: call floe.apply_moe_lora(model, MoELoraConfig(...)) first")
    if len(train_data) == 0:
        raise ValueError("train() got an empty training set")
    transformers.set_seed(cfg.seed)
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: the checkpointed blocks need a grad input
    args = _training_args(cfg, eval_data is not None)
    timer = _StepTimer()
    trainer = MoELoraTrainer(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=DataCollator(tokenizer),
        processing_class=tokenizer,
        callbacks=[timer, *(callbacks or [])],
    )
    resume_from = get_last_checkpoint(cfg.output_dir) if (cfg.resume and os.path.isdir(cfg.output_dir)) else None

    initial_eval = None
    if eval_data is not None and cfg.eval_before_training and resume_from is None:
        initial_eval = float(trainer.evaluate()["eval_loss"])
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.perf_counter() - start
    history = trainer.state.log_history
    final_eval = None
    if eval_data is not None:  # reuse the scheduled evaluation of the last step when there was one
        last = [h["eval_loss"] for h in history if "eval_loss" in h and h.get("step") == trainer.state.global_step]
        final_eval = float(last[-1]) if last else float(trainer.evaluate()["eval_loss"])

    train_losses = [(h["step"], float(h["loss"])) for h in history if "loss" in h]
    eval_losses = [(h["step"], float(h["eval_loss"])) for h in history if "eval_loss" in h]
    if initial_eval is None:
        initial_eval = next((v for s, v in eval_losses if s == 0), None)
    steady = timer.times[1:] if len(timer.times) > 1 else timer.times
    peak, kind = _peak_memory()
    trainable = sum(p.numel() for p in adapter_state_dict(model).values())
    result = TrainResult(
        steps=trainer.state.global_step,
        train_losses=train_losses,
        eval_losses=eval_losses,
        initial_eval_loss=initial_eval,
        final_eval_loss=final_eval,
        seconds_per_step=statistics.median(steady) if steady else None,
        train_seconds=train_seconds,
        peak_memory_mb=peak,
        peak_memory_kind=kind,
        trainable_params=trainable,
        total_params=sum(p.numel() for p in model.parameters()),
        adapter_dir=None,
    )
    if trainer.args.should_save:
        adapter_dir = Path(cfg.output_dir) / "adapter"
        save_adapter(model, adapter_dir)
        result.adapter_dir = str(adapter_dir)
        atomic_write_text(Path(cfg.output_dir) / "train_metrics.json",
                          json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    return result

