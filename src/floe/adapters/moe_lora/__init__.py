"""MoE-LoRA (HydraLoRA-style): a shared A, M expert B matrices and a softmax router, as a PEFT LoRA adapter.

Names are imported lazily (the CLI's ``convert`` module needs no PEFT), so that building the
``floe convert-adapter`` parser does not import PEFT.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FLOE_PEFT_TYPE": "peft_hook",
    "MoELoraConfig": "config", "MoELoraLinear": "layer",
    **{name: "model" for name in (
        "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "AdapterError", "MoELoraView", "adapter_config",
        "adapter_state_dict", "adapters_disabled", "apply_moe_lora", "load_adapter", "moe_lora_modules",
        "read_adapter_config", "router_aux_loss", "save_adapter")},
    "convert_adapter": "convert",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
