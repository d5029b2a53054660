"""``peft.get_peft_model`` that keeps the base-model name the caller asked for.

PEFT replaces a config's ``base_model_name_or_path`` by the loaded model's own path, with a
warning. For a built-in model that path is a folder in this machine's FLoE cache; the name
the user asked for (``smollm2-135m``, a hub id) is what another machine can load the saved
adapter onto. Every place FLoE attaches an adapter with PEFT goes through :func:`attach`.
"""
from __future__ import annotations

import warnings
from typing import Any

from torch import nn

_RENAMED = ".*base_model_name_or_path. was renamed"  # PEFT's warning; the name is put back below


def attach(model: nn.Module, config: Any) -> Any:
    """``peft.get_peft_model(model, config)`` whose adapters record ``config.base_model_name_or_path``
    (when unset: the model's own ``config._name_or_path``, as PEFT would)."""
    from peft import get_peft_model

    name = config.base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_RENAMED)
        wrapper = get_peft_model(model, config)
    if name:
        for cfg in wrapper.peft_config.values():
            cfg.base_model_name_or_path = name
    return wrapper
