"""The inputs of :func:`~floe.selection.api.select_layers`, checked: configuration, top-k, the base and
adapted models (an adapter folder is loaded), and the batches with the held-out ones split off.
Each failure is a :class:`~floe.selection.importance.SelectionError` that says what to change.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn

from floe.adapters.moe_lora import ADAPTER_WEIGHTS_NAME, adapter_state_dict, load_adapter, moe_lora_modules
from floe.arch import unwrapped
from floe.selection.config import SelectionConfig
from floe.selection.fingerprints import sha256_file, sha256_tensors
from floe.selection.importance import SelectionError
from floe.selection.masks import unit_geometry


def check_config(config: SelectionConfig | None) -> SelectionConfig:
    """``config``, or the default configuration for ``None``."""
    cfg = config or SelectionConfig()
    if not isinstance(cfg, SelectionConfig):
        raise SelectionError(f"config must be a SelectionConfig, got {type(cfg).__name__}")
    return cfg


def check_top_k(top_k: int | float, num_layers: int) -> None:
    """A layer count must lie in 1..L (a fraction is checked by the config)."""
    if isinstance(top_k, int) and not 1 <= top_k <= num_layers:
        raise SelectionError(f"top_k={top_k} is out of range: the model has {num_layers} layers; "
                             f"choose 1..{num_layers} or a fraction in (0, 1]")


def resolve_models(model: nn.Module,
                   adapted: nn.Module | str | os.PathLike | None) -> tuple[nn.Module, nn.Module, dict]:
    """``(base, adapted, adapter fingerprint)``; loads an adapter folder into ``model``. A ``PeftModel`` given
    for either is read through the model it wraps (selection names layers and modules as the base model does)."""
    model = unwrapped(model)
    adapted = unwrapped(adapted) if isinstance(adapted, nn.Module) else adapted
    if adapted is None:
        if not moe_lora_modules(model):
            raise SelectionError("select_layers needs the warm-up (full-layer MoE-LoRA) adapter: pass its "
                                 "folder as the second argument, or a model that carries it")
        return model, model, {"source": "attached", "sha256": sha256_tensors(adapter_state_dict(model).values())}
    if isinstance(adapted, (str, os.PathLike)):
        directory = Path(adapted)
        if not directory.is_dir():
            raise SelectionError(f"adapter folder {directory} does not exist; pass the warm-up adapter "
                                 "folder written by `floe train` (<output_dir>/adapter)")
        load_adapter(model, directory)  # AdapterError (a ValueError) when it does not fit the model
        weights = directory / ADAPTER_WEIGHTS_NAME
        return model, model, {"source": str(directory), "sha256": sha256_file(weights)}
    if not isinstance(adapted, nn.Module):
        raise SelectionError(f"adapted must be a model, an adapter folder or None, got {type(adapted).__name__}")
    if not moe_lora_modules(adapted):
        raise SelectionError("the adapted model has no MoE-LoRA layers; pass the warm-up adapter or its folder")
    if adapted is not model:
        a, b = unit_geometry(model), unit_geometry(adapted)
        if a != b or getattr(model.config, "vocab_size", None) != getattr(adapted.config, "vocab_size", None):
            raise SelectionError(f"the adapted model does not match the base model: base {a}, adapted {b}; "
                                 "the adapter must have been trained on this base model")
    return model, adapted, {"source": "module", "sha256": sha256_tensors(adapter_state_dict(adapted).values())}


def _materialise(data: Iterable[dict], num_batches: int | None, held: int = 0) -> list[dict]:
    """The first ``num_batches + held`` batches (all when ``num_batches`` is None) as a list, validated."""
    if isinstance(data, Mapping):
        raise SelectionError("data must be an iterable of batches (dicts), got a single dict; wrap it in a list")
    batches: list[dict] = []
    for i, batch in enumerate(data):
        if num_batches is not None and i >= num_batches + held:
            break
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise SelectionError(f"batch {i} is not a dict with 'input_ids' (got {type(batch).__name__}); "
                                 "pass batches from floe.data.iter_batches(dataset, batch_size, DataCollator(tokenizer))")
        ids = batch["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise SelectionError(f"batch {i}: input_ids must be a 2-D (batch, seq) tensor, got "
                                 f"{tuple(getattr(ids, 'shape', ()))}; single examples need collating into batches")
        labels = batch.get("labels")
        if not isinstance(labels, torch.Tensor) or labels.shape != ids.shape:
            raise SelectionError(f"batch {i}: needs 'labels' shaped like input_ids (response tokens, -100 "
                                 "elsewhere); build batches with floe.data.DataCollator")
        if int((labels[:, 1:] != -100).sum()) == 0:
            raise SelectionError(f"batch {i} has no response tokens (every label is -100 after the shift), "
                                 "so its loss is undefined; check the data's prompt/response split")
        batches.append(dict(batch))
    if not batches:
        raise SelectionError("select_layers got no batches; give it at least one batch of selection data")
    if num_batches is not None and len(batches) < num_batches + held:
        raise SelectionError(f"the data gives only {len(batches)} batches but num_batches={num_batches}"
                             + (f" plus heldout_batches={held} held-out batches are needed" if held else "")
                             + "; lower them or use more data / a smaller batch size")
    return batches


def split_heldout(data: Iterable[dict], heldout: Iterable[dict] | None,
                   cfg: SelectionConfig) -> tuple[list[dict], list[dict]]:
    """``(selection batches, held-out batches)``: the given held-out batches, or the last
    ``cfg.heldout_batches`` of the data — never more than half of them, so small data still
    leaves the selection most of it (the number used is in ``diagnostics.data``)."""
    if heldout is not None:
        held = list(heldout)
        return _materialise(data, cfg.num_batches), (_materialise(held, None) if held else [])
    batches = _materialise(data, cfg.num_batches, cfg.heldout_batches)
    n_held = min(cfg.heldout_batches, len(batches) // 2)
    if cfg.num_batches is not None:
        n_held = len(batches) - cfg.num_batches
    if n_held == 0:
        return batches, []
    return batches[:-n_held], batches[-n_held:]
