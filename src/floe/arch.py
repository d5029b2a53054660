"""Architecture-agnostic access to the parts of a decoder-only transformer FLoE touches.

Works for LLaMA / Qwen2 / Mistral / Gemma-style models (and most others in
transformers): the decoder layers are the longest ``nn.ModuleList`` of blocks, each
with an attention module holding ``o_proj`` and an MLP holding ``down_proj``. Also the
one place for the small model facts every stage needs: head counts and sizes, the
parameter counts, the device, and the keys of a batch the model's forward takes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "labels", "position_ids")
"""Batch keys a causal LM's forward takes; others (e.g. a data set's bookkeeping) are dropped."""


@dataclass(frozen=True)
class AttentionGeometry:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int


def unwrapped(model: nn.Module) -> nn.Module:
    """The model a ``PeftModel`` wraps (``get_base_model()``), or ``model`` itself: where FLoE names layers and
    modules, so the names are the same for both. (Checked by module, so this file needs no PEFT import.)"""
    is_peft = type(model).__module__.startswith("peft.") and callable(getattr(model, "get_base_model", None))
    return model.get_base_model() if is_peft else model


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(qualified_name, layers)`` of the model's decoder-layer list.

    Found generically: the longest ``nn.ModuleList`` whose name ends in ``layers``/``h``/
    ``blocks`` (``model.layers`` in LLaMA-style models); for a ``PeftModel``, named within the model
    it wraps (as :func:`floe.adapters.moe_lora.moe_lora_modules` names its layers). Raises
    ``ValueError`` otherwise.
    """
    model = unwrapped(model)
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


def text_config(config: Any) -> Any:
    """The language-model part of a config (multimodal configs nest it; text-only ones are it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def head_shape(config: Any) -> tuple[int, int, int]:
    """``(num_heads, num_kv_heads, head_dim)`` of a transformers config: ``head_dim`` when the
    config has it (e.g. Gemma), else ``hidden_size // num_attention_heads`` (e.g. Qwen2Config has
    none); as many kv heads as query heads when the config does not say (no GQA)."""
    cfg = text_config(config)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return heads, kv_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads


def geometry(config: Any) -> AttentionGeometry:
    """Layer count, head counts and sizes, and FFN width from a transformers config."""
    cfg = text_config(config)
    heads, kv_heads, head_dim = head_shape(cfg)
    return AttentionGeometry(num_layers=cfg.num_hidden_layers, num_heads=heads, num_kv_heads=kv_heads,
                             head_dim=head_dim, intermediate_size=cfg.intermediate_size)


def find_child(layer: nn.Module, leaf: str) -> tuple[str, nn.Module]:
    """The unique sub-module of ``layer`` whose name ends in ``leaf`` (e.g. ``o_proj``)."""
    hits = [(n, m) for n, m in layer.named_modules() if n.split(".")[-1] == leaf]
    if len(hits) != 1:
        raise ValueError(f"expected exactly one '{leaf}' in {type(layer).__name__}, found {[n for n, _ in hits]}")
    return hits[0]


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (``parameters()`` yields a tied tensor once)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def model_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """The keys of ``batch`` a causal LM's forward takes (``MODEL_INPUT_KEYS``, not None), as
    tensors on ``device``."""
    return {k: torch.as_tensor(v).to(device) for k, v in batch.items() if k in MODEL_INPUT_KEYS and v is not None}


def model_summary(model: nn.Module) -> dict[str, Any]:
    """Shape of a decoder-only LM read from its config, plus its parameter count.

    Keys: family (``model_type``), architecture, num_layers, hidden_size,
    num_attention_heads, num_key_value_heads, head_dim, intermediate_size,
    vocab_size, tie_word_embeddings, num_parameters (shared tensors counted once),
    dtype.
    """
    text = text_config(model.config)
    heads, kv_heads, head_dim = head_shape(text)
    first = next(model.parameters(), None)
    return {
        "family": model.config.model_type,
        "architecture": type(model).__name__,
        "num_layers": text.num_hidden_layers,
        "hidden_size": text.hidden_size,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": getattr(text, "intermediate_size", None),
        "vocab_size": getattr(text, "vocab_size", None),
        "tie_word_embeddings": bool(getattr(text, "tie_word_embeddings", False)),
        "num_parameters": trainable_parameter_count(model)[1],
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
    }
