"""PEFT's own methods as baselines, on the same targets, layers, rank and seed as MoE-LoRA.

``lora`` (rank r), ``dora`` (LoRA with DoRA's magnitude vector), ``adalora`` (AdaLoRA: starts
at rank 1.5·r and prunes to an average of r by importance, over the run's steps) and
``fim_lora`` (LoRA with FIM-LoRA's per-matrix ``rank_pattern``, average r; docs/fim-lora.md) are
attached with ``peft.get_peft_model``, as ``apply_moe_lora`` attaches MoE-LoRA, and return its ``PeftModel``.
``prompt_tuning`` and ``p_tuning`` put trained virtual tokens before the input: PEFT's wrapper
then runs the model, so evaluation goes through :class:`VirtualTokens`. One training loop
(``floe.train``) serves every method.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from floe.adapters.moe_lora import MoELoraConfig
from floe.adapters.naming import attach
from floe.arch import trainable_parameter_count

LORA_METHODS = ("lora", "dora", "adalora", "fim_lora")
PROMPT_METHODS = ("prompt_tuning", "p_tuning")
PEFT_METHODS = LORA_METHODS + PROMPT_METHODS


def peft_config(method: str, settings: MoELoraConfig, layers: list[int] | None, total_steps: int,
                virtual_tokens: int = 20, allocation: dict[str, Any] | None = None):
    """The PEFT config of ``method`` with MoE-LoRA's targets, rank, alpha and dropout.

    ``allocation``: the ``adapter_config.json`` FIM-LoRA wrote (``fim_lora`` only)."""
    from peft import AdaLoraConfig, LoraConfig, PromptEncoderConfig, PromptTuningConfig

    if method == "prompt_tuning":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual_tokens)
    if method == "p_tuning":  # PEFT's default encoder: a 2-layer MLP of the model's hidden size
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual_tokens)
    common = {"target_modules": list(settings.target_modules), "lora_alpha": settings.lora_alpha,
              "lora_dropout": settings.lora_dropout, "layers_to_transform": layers, "task_type": "CAUSAL_LM"}
    if method == "adalora":
        return AdaLoraConfig(init_r=max(settings.r * 3 // 2, settings.r), target_r=settings.r,
                             total_step=total_steps, tinit=total_steps // 10, tfinal=total_steps // 5, **common)
    if method == "fim_lora":
        if allocation is None:
            raise ValueError("fim_lora needs the allocation (adapter_config.json of floe allocate)")
        return LoraConfig(r=allocation["r"], rank_pattern=allocation["rank_pattern"], **common)
    return LoraConfig(r=settings.r, use_dora=method == "dora", **common)


def attach_peft(model, method: str, settings: MoELoraConfig, layers: list[int] | None, total_steps: int,
                seed: int, **kwargs: Any):
    """``method``'s adapter on ``model``, initialised from ``seed``: the ``PeftModel``."""
    config = peft_config(method, settings, layers, total_steps, **kwargs)
    config.base_model_name_or_path = settings.base_model_name_or_path
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return attach(model, config)  # get_peft_model, keeping the base model's name


def unfreeze_all(model) -> None:
    """``full``: every weight trainable (``floe.train`` then trains the model itself)."""
    for p in model.parameters():
        p.requires_grad_(True)


def trainable_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters of ``model`` (a ``PeftModel``: virtual tokens included)."""
    return trainable_parameter_count(model)


class VirtualTokens(nn.Module):
    """A prompt-learning ``PeftModel`` seen as a plain causal LM by :func:`floe.evaluate`.

    PEFT prepends ``n`` virtual tokens: its logits have ``n`` extra leading positions, which are
    dropped here so position t again predicts token t+1 of the input; ``generate`` is PEFT's
    (it returns the input ids followed by the new tokens, as a plain model does). PEFT ignores
    position ids: left-padded rows put their padding between the virtual tokens and the text.
    """

    prompt_cache = False
    """PEFT prepends the virtual tokens on every call, so a continued key/value cache would hold them twice."""

    def __init__(self, peft) -> None:
        super().__init__()
        self.peft = peft
        self.n = peft.peft_config[peft.active_adapter].num_virtual_tokens

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        out = self.peft(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        out.logits = out.logits[:, self.n:]
        return out

    def generate(self, **kwargs):
        return self.peft.generate(**kwargs)

    @property
    def config(self):
        return self.peft.get_base_model().config

    @property
    def generation_config(self):
        return self.peft.get_base_model().generation_config


def for_evaluation(model, method: str):
    """What :func:`floe.evaluate` should call for a model (its ``PeftModel``) trained by ``method``."""
    return VirtualTokens(model) if method in PROMPT_METHODS else model


class AdaLoraSchedule(TrainerCallback):
    """AdaLoRA's rank allocation, which PEFT leaves to the training loop: after every optimizer
    step (gradients still there), before they are zeroed."""

    def __init__(self, model) -> None:
        self.peft = model

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.peft.base_model.update_and_allocate(state.global_step)
