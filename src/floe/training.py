"""Training of MoE-LoRA adapters on top of the Hugging Face ``Trainer``.

Using ``Trainer`` (not a hand loop) buys multi-GPU/multi-node for free: the same call
runs under ``accelerate launch`` or ``torchrun``. The Trainer gets the ``PeftModel`` and saves and
resumes it natively: checkpoints hold only the adapter (PEFT's ``adapter_config.json`` +
``adapter_model.safetensors``, plus optimizer/scheduler/RNG state), never the frozen base weights.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import PeftModel
from transformers import Trainer, TrainerCallback, TrainingArguments

from floe.adapters.moe_lora.model import adapter_config, router_aux_loss
from floe.arch import trainable_parameter_count
from floe.checkpoints import (
    METRICS_FILE,
    RunRecord,
    is_moe_lora,
    load_run_adapter,
    prepare_output,
    save_run_adapter,
    training_settings,
    weights_folder,
)
from floe.errors import InputError
from floe.io import atomic_write_text

__all__ = ["MoELoraTrainer", "TrainConfig", "TrainResult", "train"]

logger = logging.getLogger("floe.training")

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
    keep_best: bool = False
    """Also keep the adapter of the lowest validation loss seen (every eval_steps) in <output_dir>/best_adapter."""
    save_steps: int = 50
    """Write a resumable checkpoint every this many steps."""
    save_total_limit: int = 2
    """Keep at most this many checkpoints."""
    resume: bool = True
    """Resume from the newest complete checkpoint in output_dir, or return a finished run's result."""
    overwrite: bool = False
    """Delete an earlier run in output_dir (checkpoints, adapter, metrics) and start afresh."""
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
    run_config: dict[str, Any] = field(default_factory=dict)
    """The training and adapter settings that determine the result (see ``floe.checkpoints.training_settings``)."""
    best_step: int | None = None
    """keep_best: the step of the lowest validation loss (0: the untrained adapter)."""
    best_eval_loss: float | None = None
    """keep_best: that validation loss."""
    best_adapter_dir: str | None = None
    """keep_best: the folder of the adapter saved at best_step."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainResult":
        d = dict(d)
        for key in ("train_losses", "eval_losses"):
            d[key] = [tuple(x) for x in d.get(key, [])]
        return cls(**d)


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


BEST_DIR = "best_adapter"
BEST_FILE = "best.json"


class BestAdapter(TrainerCallback):
    """``keep_best``: after each evaluation whose validation loss is the lowest so far, save the adapter to
    ``<output_dir>/best_adapter`` (atomically) and its step and loss to ``best.json``. The Trainer's own
    ``load_best_model_at_end`` would replace the final adapter, and both are wanted. A resumed run reads
    ``best.json`` back, so the best of the steps before a kill still counts."""

    def __init__(self, model, out: Path, resuming: bool) -> None:
        self.model, self.out = model, out
        if not resuming:  # a fresh start: no best of an earlier attempt counts
            (out / BEST_FILE).unlink(missing_ok=True)
        record = json.loads((out / BEST_FILE).read_text()) if (out / BEST_FILE).is_file() else {}
        self.step: int | None = record.get("step")
        self.loss: float | None = record.get("eval_loss")

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        loss = (metrics or {}).get("eval_loss")
        if loss is None or not state.is_world_process_zero or (self.loss is not None and loss >= self.loss):
            return
        self.step, self.loss = int(state.global_step), float(loss)
        save_run_adapter(self.model, self.out / BEST_DIR)
        atomic_write_text(self.out / BEST_FILE, json.dumps({"step": self.step, "eval_loss": self.loss}) + "\n")


class MoELoraTrainer(Trainer):
    """``Trainer`` that adds the router load-balancing loss and rounds the warm-up ratio (saving and
    resuming the ``PeftModel`` it trains are the Trainer's own)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        coef = _router_aux_coef(self.accelerator.unwrap_model(model))
        if coef > 0 and model.training:
            aux = router_aux_loss(self.accelerator.unwrap_model(model))
            if aux is not None:
                if return_outputs:
                    return out[0] + coef * aux, out[1]
                return out + coef * aux
        return out

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # A warm-up ratio that rounds to zero steps means no warm-up. transformers rounds a ratio
        # up (3% of 10 steps -> 1 step), and the first optimizer step then runs at learning rate 0.
        if 0 < self.args.warmup_steps < 1:
            self.args.warmup_steps = round(self.args.warmup_steps * num_training_steps)
        return super().create_scheduler(num_training_steps, optimizer)


def _peak_memory() -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


# TrainConfig fields that are TrainingArguments of the same name and meaning, passed as they are.
_PASSED_AS_IS = ("output_dir", "learning_rate", "weight_decay", "max_steps", "gradient_accumulation_steps",
                 "max_grad_norm", "bf16", "seed", "logging_steps", "save_steps", "save_total_limit", "report_to")


def _training_args(cfg: TrainConfig, has_eval: bool) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        **{name: getattr(cfg, name) for name in _PASSED_AS_IS},
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=cfg.lr_scheduler,
        num_train_epochs=cfg.num_epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        activation_checkpointing=cfg.gradient_checkpointing,
        data_seed=cfg.seed,
        logging_first_step=True,
        eval_strategy="steps" if (has_eval and cfg.eval_steps > 0) else "no",
        eval_steps=cfg.eval_steps or None,
        save_strategy="steps",
        disable_tqdm=not cfg.progress_bar,
        remove_unused_columns=False,
        dataloader_pin_memory=cuda,
        ddp_find_unused_parameters=False,
        optim="adamw_torch",
        # CPU-only machines: accelerate needs to be told, or torchrun processes train unsynchronised.
        use_cpu=not (cuda or _has_mps()),
        ddp_backend="gloo" if not cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )


def _has_mps() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def _router_aux_coef(model) -> float:
    return adapter_config(model).router_aux_loss_coef if is_moe_lora(model) else 0.0


def train(model, tokenizer, train_data, eval_data=None, config: TrainConfig | None = None,
          callbacks: list[TrainerCallback] | None = None, *, full: bool = False) -> TrainResult:
    """Train the MoE-LoRA adapter already applied to ``model`` (see ``apply_moe_lora``), any other PEFT
    adapter, or with ``full=True`` the model itself (full fine-tuning: no adapter; the weights go to
    ``<output_dir>/model``).

    Saves the final adapter to ``<output_dir>/adapter`` and the metrics to
    ``<output_dir>/train_metrics.json``. When ``output_dir`` holds an earlier run of the same
    settings and ``config.resume``: a finished run is not trained again (its adapter is loaded
    into ``model`` and its result returned); an unfinished one resumes from its newest complete
    checkpoint, keeping the untrained validation loss, the loss history and the time spent.
    A run with other settings there is refused (``InputError``) unless ``config.overwrite``.
    """
    from floe.data import DataCollator

    cfg = config or TrainConfig()
    if full and isinstance(model, PeftModel):
        raise ValueError("train(full=True) fine-tunes the model itself, but it has an adapter attached")
    if not full and not isinstance(model, PeftModel):
        raise ValueError("train() needs a PeftModel: pass what floe.apply_moe_lora(model, MoELoraConfig(...)) or "
                         "peft.get_peft_model(model, floe.MoELoraConfig(...)) (any PEFT config works) returns")
    if len(train_data) == 0:
        raise InputError("train() got an empty training set")
    out = Path(cfg.output_dir)
    settings = training_settings(cfg, model)
    finished, resume_from, record = prepare_output(out, settings, cfg.resume, cfg.overwrite)
    if finished is not None:
        logger.warning("%s holds a finished run of these settings: not training again (overwrite: true "
                       "starts afresh)", out)
        load_run_adapter(model, weights_folder(out, model))
        return TrainResult.from_dict(finished)

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
    initial_eval = record.get("initial_eval_loss")
    if eval_data is not None and cfg.eval_before_training and resume_from is None:
        initial_eval = float(trainer.evaluate()["eval_loss"])
    best = None
    if cfg.keep_best and eval_data is not None:
        best = BestAdapter(model, out, resuming=resume_from is not None)
    if best is not None:
        trainer.add_callback(best)
        if initial_eval is not None and resume_from is None:  # the untrained adapter is the first candidate
            best.on_evaluate(args, trainer.state, None, metrics={"eval_loss": initial_eval})
    run_record = RunRecord(settings, initial_eval, record.get("train_seconds", 0.0))
    trainer.add_callback(run_record)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_seconds = run_record.seconds()  # this part and the parts before a resume
    history = trainer.state.log_history
    final_eval = None
    if eval_data is not None:  # reuse the scheduled evaluation of the last step when there was one
        last = [h["eval_loss"] for h in history if "eval_loss" in h and h.get("step") == trainer.state.global_step]
        final_eval = float(last[-1]) if last else float(trainer.evaluate()["eval_loss"])

    train_losses = [(h["step"], float(h["loss"])) for h in history if "loss" in h]
    eval_losses = [(h["step"], float(h["eval_loss"])) for h in history if "eval_loss" in h]
    if initial_eval is not None and not any(s == 0 for s, _ in eval_losses):
        eval_losses.insert(0, (0, initial_eval))
    steady = timer.times[1:] if len(timer.times) > 1 else timer.times
    peak, kind = _peak_memory()
    trainable, total = trainable_parameter_count(model)
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
        total_params=total,
        adapter_dir=None,
        run_config=settings,
    )
    if best is not None and best.step is not None:
        result.best_step, result.best_eval_loss = best.step, best.loss
        result.best_adapter_dir = str(out / BEST_DIR)
    if trainer.args.should_save:
        adapter_dir = weights_folder(out, model)
        save_run_adapter(model, adapter_dir)
        result.adapter_dir = str(adapter_dir)
        atomic_write_text(out / METRICS_FILE, json.dumps(result.to_dict(), indent=2) + "\n")
    return result
