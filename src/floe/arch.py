"""Architecture-agnostic access to the parts of a decoder-only transformer FLoE touches.

Works for LLaMA / Qwen2 / Mistral / Gemma-style models (and most others in
transformers): the decoder layers are the longest ``nn.ModuleList`` of blocks, each
with an attention module holding ``o_proj`` and an MLP holding ``down_proj``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class AttentionGeometry:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(qualified_name, layers)`` of the model's decoder-layer list.

    Found generically: the longest ``nn.ModuleList`` whose name ends in ``layers``/``h``/
    ``blocks`` (``model.layers`` in LLaMA-style models). Raises ``ValueError`` otherwise.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks"):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError(
            f"could not find the decoder layers of {type(model).__name__}: no nn.ModuleList named "
            "'layers', 'h' or 'blocks'. FLoE supports LLaMA/Qwen2/Mistral/Gemma-style causal LMs."
        )
    return best


def geometry(config) -> AttentionGeometry:
    """Head counts and sizes from a transformers config (``head_dim`` when the config has it,
    e.g. Gemma; otherwise ``hidden_size // num_attention_heads`` as in Qwen2)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return AttentionGeometry(
        num_layers=cfg.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate_size=cfg.intermediate_size,
    )


def find_child(layer: nn.Module, leaf: str) -> tuple[str, nn.Module]:
    """The unique sub-module of ``layer`` whose name ends in ``leaf`` (e.g. ``o_proj``)."""
    hits = [(n, m) for n, m in layer.named_modules() if n.split(".")[-1] == leaf]
    if len(hits) != 1:
        raise ValueError(f"expected exactly one '{leaf}' in {type(layer).__name__}, found {[n for n, _ in hits]}")
    return hits[0]
