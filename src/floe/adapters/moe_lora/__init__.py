"""MoE-LoRA (HydraLoRA-style): a shared A, M expert B matrices and a softmax router."""
from floe.adapters.moe_lora.config import MoELoraConfig
from floe.adapters.moe_lora.layer import MoELoraLinear
from floe.adapters.moe_lora.model import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdapterError,
    adapter_state_dict,
    adapters_disabled,
    apply_moe_lora,
    export_peft,
    load_adapter,
    moe_lora_modules,
    read_adapter_config,
    router_aux_loss,
    save_adapter,
    trainable_parameter_count,
)

__all__ = [
    "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "AdapterError", "MoELoraConfig", "MoELoraLinear",
    "adapter_state_dict", "adapters_disabled", "apply_moe_lora", "export_peft", "load_adapter",
    "moe_lora_modules", "read_adapter_config", "router_aux_loss", "save_adapter",
    "trainable_parameter_count",
]
