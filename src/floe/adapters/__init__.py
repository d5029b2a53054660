"""Adapters. One folder per method, PEFT-style: ``config.py``, ``layer.py``, ``model.py``."""
from floe.adapters.moe_lora import (  # noqa: F401
    MoELoraConfig,
    MoELoraLinear,
    adapters_disabled,
    apply_moe_lora,
    export_peft,
    load_adapter,
    moe_lora_modules,
    router_aux_loss,
    save_adapter,
)
