"""PEFT's own LoRA-family methods as baselines, on the same targets, layers, rank and seed as MoE-LoRA.

``lora`` (rank r), ``dora`` (LoRA with DoRA's magnitude vector) and ``adalora`` (AdaLoRA: starts
at rank 1.5·r and prunes to an average of r by importance, over the run's steps) are attached
with ``peft.get_peft_model`` in place, as ``apply_moe_lora`` attaches MoE-LoRA, so one training
loop (``floe.train``) serves every method.
"""
from __future__ import annotations

import torch
from transformers import TrainerCallback

from floe.adapters.moe_lora import AdapterSettings
from floe.adapters.moe_lora.model import _PEFT_ATTR, peft_model

PEFT_METHODS = ("lora", "dora", "adalora")


def peft_config(method: str, settings: AdapterSettings, layers: list[int] | None, total_steps: int):
    """The PEFT config of ``method`` with MoE-LoRA's targets, rank, alpha and dropout."""
    from peft import AdaLoraConfig, LoraConfig

    common = dict(target_modules=list(settings.target_modules), lora_alpha=settings.alpha,
                  lora_dropout=settings.dropout, layers_to_transform=layers, task_type="CAUSAL_LM")
    if method == "adalora":
        return AdaLoraConfig(init_r=max(settings.r * 3 // 2, settings.r), target_r=settings.r,
                             total_step=total_steps, tinit=total_steps // 10, tfinal=total_steps // 5, **common)
    return LoraConfig(r=settings.r, use_dora=method == "dora", **common)


def attach_peft(model, method: str, settings: AdapterSettings, layers: list[int] | None, total_steps: int,
                seed: int) -> None:
    """Attach ``method``'s adapter to ``model`` in place, initialised from ``seed``."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wrapper = get_peft_model(model, peft_config(method, settings, layers, total_steps))
    model.__dict__[_PEFT_ATTR] = wrapper  # floe.train finds the PeftModel as it finds MoE-LoRA's


class AdaLoraSchedule(TrainerCallback):
    """AdaLoRA's rank allocation, which PEFT leaves to the training loop: after every optimizer
    step (gradients still there), before they are zeroed."""

    def __init__(self, model) -> None:
        self.peft = peft_model(model)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.peft.base_model.update_and_allocate(state.global_step)
