"""FLoE: Fisher-based layer selection and sparse MoE-LoRA adaptation of causal LMs.

Public API (imported lazily so ``import floe`` stays cheap)::

    from floe import load_model, load_data, MoELoraConfig, apply_moe_lora, train, TrainConfig
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "floe.models",
    "load_data": "floe.data",
    "load_records": "floe.data",
    "DataCollator": "floe.data",
    "MoELoraConfig": "floe.adapters.moe_lora",
    "MoELoraLinear": "floe.adapters.moe_lora",
    "apply_moe_lora": "floe.adapters.moe_lora",
    "save_adapter": "floe.adapters.moe_lora",
    "load_adapter": "floe.adapters.moe_lora",
    "adapters_disabled": "floe.adapters.moe_lora",
    "train": "floe.training",
    "TrainConfig": "floe.training",
    "TrainResult": "floe.training",
    "TrainJob": "floe.jobs",
    "run_train": "floe.jobs",
    "select_layers": "floe.selection",
    "SelectionConfig": "floe.selection",
    "Selection": "floe.selection",
    "search_rank": "floe.search",
    "SearchConfig": "floe.search",
    "make_training_objective": "floe.search",
    "run": "floe.pipeline",
    "RunConfig": "floe.pipeline",
    "evaluate": "floe.evaluation",
    "EvalConfig": "floe.evaluation",
    "allocate_ranks": "floe.allocate",
    "AllocateConfig": "floe.allocate",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

# PEFT learns the MoE-LoRA adapter type (peft_type FLOE_MOE_LORA) once it is imported, so that
# peft.PeftModel.from_pretrained loads FLoE adapters after `import floe` (docs/method.md).
from floe.adapters.moe_lora.peft_hook import install as _install_peft_hook  # noqa: E402

_install_peft_hook()


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'floe' has no attribute {name!r}")
