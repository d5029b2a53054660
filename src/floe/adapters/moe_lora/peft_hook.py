"""Teach PEFT the ``FLOE_MOE_LORA`` adapter type (installed by ``import floe``; imports nothing heavy).

PEFT picks the config class of a saved adapter from ``adapter_config.json``'s ``peft_type`` via
the dict ``peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING``. A MoE-LoRA adapter with experts is saved
with ``peft_type: FLOE_MOE_LORA``; this module adds ``FLOE_MOE_LORA -> floe.MoELoraConfig`` to
that dict, right away when PEFT is already imported, else as soon as the ``peft`` package has
finished importing (a one-shot import hook, so ``import floe`` does not pay for importing PEFT).
Without FLoE the lookup fails (``KeyError: 'FLOE_MOE_LORA'``) instead of loading a plain LoRA.
"""
from __future__ import annotations

import importlib.abc
import sys

FLOE_PEFT_TYPE = "FLOE_MOE_LORA"


def register() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    config = sys.modules.get("floe.adapters.moe_lora.config")
    if config is not None and not hasattr(config, "MoELoraConfig"):
        return  # PEFT's import was triggered by config.py itself: it registers once it is defined
    from floe.adapters.moe_lora.config import MoELoraConfig

    PEFT_TYPE_TO_CONFIG_MAPPING[FLOE_PEFT_TYPE] = MoELoraConfig  # type: ignore[index]


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, finder) -> None:
        self.inner, self.finder = inner, finder

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        register()


class _AfterPeftImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "peft":
            return None
        sys.meta_path.remove(self)  # one shot; the real finders locate the package
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader, self)
                return spec
        return None


def install() -> None:
    """Register now if PEFT is imported, else once it is (idempotent)."""
    if "peft" in sys.modules and hasattr(sys.modules["peft"], "LoraConfig"):
        register()
    elif not any(isinstance(f, _AfterPeftImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterPeftImport())
