"""Fingerprints of a selection's inputs (``Selection.fingerprints``): hashes of the model config,
adapter weights, data and configuration, and the package versions, so that a ``selection.json``
says what it was computed from.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from floe.arch import trainable_parameter_count
from floe.provenance import package_versions
from floe.selection.config import SelectionConfig, jsonable


def sha256_tensors(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 over the tensors' dtypes and bytes, in order."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Name, config hash, parameter count and dtype of the base model."""
    cfg = getattr(model, "config", None)
    text = cfg.to_json_string(use_diff=False) if cfg is not None else ""
    return {
        "name_or_path": getattr(cfg, "_name_or_path", None),
        "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "parameters": trainable_parameter_count(model)[1],
        "dtype": str(next(model.parameters()).dtype),
    }


def data_fingerprint(batches: list[dict]) -> dict[str, Any]:
    """Hash and size (batches, examples, tokens, response tokens) of the selection batches."""
    keys = ("input_ids", "attention_mask", "labels")
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    return {
        "sha256": sha256_tensors(b[k] for b in batches for k in keys if k in b),
        "num_batches": len(batches),
        "examples": sum(int(b["input_ids"].shape[0]) for b in batches),
        "tokens": tokens,
        "response_tokens": sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches),
    }


def versions() -> dict[str, str]:
    """Versions of floe, torch and transformers."""
    return package_versions(("floe", "torch", "transformers"), python=False)


def input_fingerprints(base: nn.Module, adapter: dict[str, Any], batches: list[dict], cfg: SelectionConfig,
                       world_size: int) -> dict[str, Any]:
    """``Selection.fingerprints``: model, adapter (as given), data, configuration hash, versions."""
    return {
        "model": model_fingerprint(base),
        "adapter": adapter,
        "data": data_fingerprint(batches),
        "config_sha256": hashlib.sha256(json.dumps(jsonable(cfg.to_dict()), sort_keys=True).encode()).hexdigest(),
        "versions": versions(),
        "world_size": world_size,
    }
