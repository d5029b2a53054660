"""The search objective FLoE uses: validation loss after a short MoE-LoRA training run.

Each trial builds a fresh base model, attaches MoE-LoRA with the trial's (r, M) on all
layers (the paper runs the search on the full-layer warm-up model) or on a given layer set,
trains ``train_config.max_steps`` steps with ``floe.training.train`` and reports the validation
loss at ``eval_points`` evenly spaced steps so a pruner can stop hopeless trials early.
"""
from __future__ import annotations

import dataclasses
import gc
import shutil
import tempfile
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from transformers import TrainerCallback

from floe.adapters.moe_lora import MoELoraConfig, apply_moe_lora
from floe.search.config import SearchError
from floe.search.trial import ObjectiveFn, Reporter
from floe.training import TrainConfig, train

__all__ = ["make_training_objective", "eval_schedule"]


def eval_schedule(steps: int, eval_points: int) -> list[int]:
    """The steps at which a trial's validation loss is reported: ``eval_points`` evenly spaced
    steps, the last one ``steps`` (e.g. 100 steps, 4 points → 25, 50, 75, 100)."""
    if steps < 1 or eval_points < 1:
        raise SearchError(f"need steps >= 1 and eval_points >= 1, got steps={steps}, eval_points={eval_points}")
    if eval_points > steps:
        raise SearchError(f"eval_points={eval_points} is more than the {steps} training steps of a trial")
    if steps % eval_points:
        raise SearchError(f"steps={steps} is not a multiple of eval_points={eval_points}: choose e.g. "
                          f"steps={steps - steps % eval_points or eval_points}")
    every = steps // eval_points
    return [every * k for k in range(1, eval_points + 1)]


class _ReportCallback(TrainerCallback):
    """Hands each in-training evaluation to the search's reporter (which may prune the trial)
    and skips the Trainer's own evaluation at the last step: ``train`` evaluates once more
    after training, and that value is the trial's result."""

    def __init__(self, report: Reporter, last_step: int) -> None:
        self.report = report
        self.last_step = last_step
        self.reported: set[int] = set()

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step >= self.last_step:
            control.should_evaluate = False
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # type: ignore[no-untyped-def]
        step = state.global_step
        if metrics and "eval_loss" in metrics and 0 < step < self.last_step and step not in self.reported:
            self.reported.add(step)
            self.report(float(metrics["eval_loss"]), step)  # raises TrialPruned / TrialFailed


def make_training_objective(
    model_factory: Callable[[], nn.Module],
    tokenizer: Any,
    train_data: Any,
    eval_data: Any,
    train_config: TrainConfig,
    layers: Sequence[int] | None = None,
    *,
    adapter: MoELoraConfig | None = None,
    eval_points: int = 4,
    keep_dir: str | None = None,
) -> ObjectiveFn:
    """An objective ``(r, num_experts, report) -> validation loss`` for ``search_rank``.

    Args:
        model_factory: returns a fresh base model (no adapter) each call, e.g.
            ``lambda: copy.deepcopy(base)``.
        tokenizer, train_data, eval_data: as for ``floe.training.train`` (tokenised datasets).
        train_config: optimiser settings; ``max_steps`` (> 0) is the length of a trial. Its
            output folder, evaluation schedule, checkpointing and logging are overridden per trial.
        layers: decoder layers to adapt (None: all, as the paper's warm-up search).
        adapter: lora_alpha, lora_dropout and target modules of the adapter (``r``, ``num_experts``
            and ``layers_to_transform`` are set per trial); default ``MoELoraConfig()``.
        eval_points: validation losses per trial (the last one is the trial's value).
        keep_dir: where per-trial training folders go when the search gives none (``search_rank``
            with an ``output_dir`` runs each trial in ``<output_dir>/trials/trial-<n>`` and removes
            it); default: a temporary folder, deleted after the trial.
    """
    if train_config.max_steps is None or train_config.max_steps < 1:
        raise SearchError("the search trains each trial for a fixed number of steps: set train_config.max_steps "
                          f"(--steps), got {train_config.max_steps}")
    schedule = eval_schedule(train_config.max_steps, eval_points)
    if len(train_data) == 0 or len(eval_data) == 0:
        raise SearchError(f"empty data: {len(train_data)} training and {len(eval_data)} validation examples")
    base_adapter = adapter or MoELoraConfig()
    layer_list = None if layers is None else sorted({int(i) for i in layers})

    def objective(r: int, num_experts: int, report: Reporter) -> float:
        given = getattr(report, "workdir", None)  # owned (made and removed) by the search
        workdir = str(given) if given is not None else tempfile.mkdtemp(prefix=f"trial-r{r}-m{num_experts}-",
                                                                          dir=keep_dir)
        cfg = dataclasses.replace(
            train_config, output_dir=workdir, eval_steps=schedule[0], eval_before_training=False, resume=False,
            save_steps=train_config.max_steps + 1, report_to=[], progress_bar=False,
            logging_steps=train_config.max_steps,  # one training-loss line per trial
        )
        model = None
        try:
            torch.manual_seed(cfg.seed)  # same adapter initialisation stream for every (r, M)
            model = apply_moe_lora(model_factory(), dataclasses.replace(base_adapter, r=r, num_experts=num_experts,
                                                                          layers_to_transform=layer_list))
            result = train(model, tokenizer, train_data, eval_data, cfg,
                           callbacks=[_ReportCallback(report, train_config.max_steps)])
            value = result.final_eval_loss
            return float("nan") if value is None else float(value)
        finally:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if given is None and keep_dir is None:
                shutil.rmtree(workdir, ignore_errors=True)

    return objective
