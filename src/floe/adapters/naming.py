"""``peft.get_peft_model`` that keeps the base-model name the caller asked for.

PEFT replaces a config's ``base_model_name_or_path`` by the loaded model's own path, with a
warning. For a built-in model that path is a folder in this machine's FLoE cache; the name
the user asked for (``smollm2-135m``, a hub id) is what another machine can load the saved
adapter onto. Every place FLoE attaches an adapter with PEFT goes through :func:`attach`.

That name is no folder, so PEFT's ``save_pretrained`` could not look its ``config.json`` up to
see whether the vocabulary was resized, and would warn on every save ("Could not find a config
file in smollm2-135m", or ask the hub when online). FLoE never resizes the embeddings, and
MoE-LoRA never trains them, so FLoE's saves pass :data:`SAVE_KWARGS`: no embedding weights are
saved and nothing is looked up. The ``PeftModel`` that :func:`attach` returns saves that way too
(the Trainer's checkpoints call its ``save_pretrained``).
"""
from __future__ import annotations

import functools
import warnings
from typing import Any

from torch import nn

_RENAMED = ".*base_model_name_or_path. was renamed"  # PEFT's warning; the name is put back below

SAVE_KWARGS: dict[str, Any] = {"save_embedding_layers": False}
"""PEFT save arguments: no embedding weights (never resized nor trained here), so no look-up of the base model."""


def attach(model: nn.Module, config: Any) -> Any:
    """``peft.get_peft_model(model, config)`` whose adapters record ``config.base_model_name_or_path``
    (when unset: the model's own ``config._name_or_path``, as PEFT would) and whose
    ``save_pretrained`` defaults to :data:`SAVE_KWARGS`."""
    from peft import get_peft_model

    name = config.base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_RENAMED)
        # PEFT 0.21 asks transformers 5 a deprecated name; not the user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        wrapper = get_peft_model(model, config)
    if name:
        for cfg in wrapper.peft_config.values():
            cfg.base_model_name_or_path = name
    wrapper.save_pretrained = functools.partial(wrapper.save_pretrained, **SAVE_KWARGS)
    return wrapper
