"""LISA (Pan et al. 2024) over MoE-LoRA, as FLoE's appendix D.2 compares it.

MoE-LoRA sits on every layer; every ``interval`` optimizer steps k layers are drawn at random and
only their adapters train. As in LMFlow's LISA callback, the optimizer is built once over all
adapter parameters and keeps its state: a frozen layer's parameters get no gradient, so AdamW
skips them (their moments wait, unchanged, until the layer is drawn again).
"""
from __future__ import annotations

import torch.nn as nn
from transformers import TrainerCallback

from floe.arch import decoder_layers
from floe.pipeline.layers import lisa_draw


def adapter_params_by_layer(model: nn.Module) -> dict[int, list[nn.Parameter]]:
    """The adapter parameters (those created trainable) of each decoder layer."""
    _, layers = decoder_layers(model)
    return {i: [p for n, p in layer.named_parameters() if "lora_" in n or "router" in n]
            for i, layer in enumerate(layers)}


class LisaCallback(TrainerCallback):
    """Redraws the k trainable layers every ``interval`` steps; ``active`` is the current set."""

    def __init__(self, model: nn.Module, k: int, interval: int, seed: int) -> None:
        if interval < 1:
            raise ValueError(f"LISA interval must be >= 1, got {interval}")
        self.params = adapter_params_by_layer(model)
        self.k, self.interval, self.seed = k, interval, seed
        self.active: list[int] = []
        self.history: list[tuple[int, list[int]]] = []  # (step, layers) at each draw

    def on_step_begin(self, args, state, control, **kwargs):
        draw = state.global_step // self.interval
        if state.global_step % self.interval == 0 or not self.active:
            self.active = lisa_draw(len(self.params), self.k, self.seed, draw)
            for i, params in self.params.items():
                for p in params:
                    p.requires_grad_(i in self.active)
                    if i not in self.active:
                        p.grad = None
            self.history.append((state.global_step, list(self.active)))

    def on_train_end(self, args, state, control, **kwargs):
        for params in self.params.values():  # leave every adapter trainable, as apply_moe_lora made it
            for p in params:
                p.requires_grad_(True)
