"""Adapters. One folder per method, PEFT-style: ``config.py``, ``layer.py``, ``model.py``."""
from __future__ import annotations

from typing import Any

_EXPORTS = ("AdapterSettings", "MoELoraConfig", "MoELoraLinear", "adapters_disabled", "apply_moe_lora",
            "load_adapter", "moe_lora_modules", "router_aux_loss", "save_adapter")
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        from floe.adapters import moe_lora

        return getattr(moe_lora, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
