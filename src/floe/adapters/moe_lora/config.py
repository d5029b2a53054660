"""Configuration of a MoE-LoRA adapter: a PEFT ``LoraConfig`` with experts and a router.

``MoELoraConfig`` is what ``peft.get_peft_model`` takes; ``AdapterSettings`` (settings.py) is the
short form a FLoE job file / command line holds (``adapter:`` section) and turns into one.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch.nn as nn
from peft import LoraConfig

from floe.adapters.moe_lora.peft_hook import FLOE_PEFT_TYPE, register
from floe.adapters.moe_lora.settings import DEFAULT_TARGETS, adapter_problems
# Keys that only a MoE-LoRA adapter has; an M = 1 adapter is saved without them (plain LoRA).
FLOE_ONLY_KEYS = ("num_experts", "router_aux_loss_coef", "alpha", "dropout", "layers", "extra")


@dataclass
class MoELoraConfig(LoraConfig):
    """PEFT ``LoraConfig`` for MoE-LoRA: ``peft.get_peft_model(model, MoELoraConfig(...))``.

    Everything of ``LoraConfig`` applies (``target_modules``, ``layers_to_transform``,
    ``task_type``, ``use_rslora``, ``inference_mode``, ...; not DoRA, LoRA bias or the
    data-driven initialisations). Defaults follow the paper's Table 6. ``alpha``, ``dropout``
    and ``layers`` are FLoE's names for ``lora_alpha``, ``lora_dropout`` and
    ``layers_to_transform``: pass one name of each pair (given ones win).
    """

    r: int = field(default=8, metadata={"help": "Rank of the shared A (and of every expert B)."})
    lora_alpha: float = field(default=32.0, metadata={"help": "Scaling numerator: the update is x alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter's input."})
    target_modules: Optional[Any] = field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        metadata={"help": "Leaf names (or a regex) of the nn.Linear modules to wrap."})
    num_experts: int = field(default=4, metadata={"help": "Expert B matrices M; M = 1 is plain LoRA (no router)."})
    router_aux_loss_coef: float = field(
        default=0.0, metadata={"help": "Weight of the router load-balancing loss (0 = off, as in the paper)."})
    alpha: Optional[float] = field(default=None, metadata={"help": "Alias of lora_alpha."})
    dropout: Optional[float] = field(default=None, metadata={"help": "Alias of lora_dropout."})
    layers: Optional[list[int]] = field(default=None, metadata={"help": "Alias of layers_to_transform."})
    extra: dict = field(default_factory=dict, metadata={"help": "Free-form metadata saved with the adapter."})

    def __post_init__(self) -> None:
        if self.alpha is not None:
            self.lora_alpha = self.alpha
        if self.dropout is not None:
            self.lora_dropout = self.dropout
        if self.layers is not None:
            self.layers_to_transform = self.layers
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None:
            self.layers_to_transform = sorted({int(i) for i in self.layers_to_transform})
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        problems = adapter_problems(self.r, self.num_experts, self.lora_alpha, self.lora_dropout, self.target_modules,
                                    self.layers_to_transform, self.router_aux_loss_coef)
        if problems:
            raise ValueError("invalid MoELoraConfig: " + "; ".join(problems))
        super().__post_init__()
        self.alpha, self.dropout, self.layers = self.lora_alpha, self.lora_dropout, self.layers_to_transform
        from floe.adapters.moe_lora.layer import MoELoraLinear

        self._register_custom_module({nn.Linear: MoELoraLinear})

    @property
    def scaling(self) -> float:
        return float(self.lora_alpha) / self.r

    def to_dict(self) -> dict[str, Any]:
        """PEFT's dict (what ``adapter_config.json`` holds): ``peft_type`` is ``FLOE_MOE_LORA`` for
        M > 1; an M = 1 adapter is written as a plain ``LORA`` config, loadable without FLoE."""
        d = super().to_dict()
        if self.num_experts > 1:
            d["peft_type"] = FLOE_PEFT_TYPE
        else:
            for k in FLOE_ONLY_KEYS:
                d.pop(k, None)
        return d

    def settings(self) -> dict[str, Any]:
        """FLoE's short form (the fields of ``AdapterSettings``), JSON-ready: what a run records."""
        targets = self.target_modules
        return {"r": self.r, "num_experts": self.num_experts, "alpha": float(self.lora_alpha),
                "dropout": float(self.lora_dropout),
                "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
                "layers": None if self.layers_to_transform is None else list(self.layers_to_transform),
                "router_aux_loss_coef": self.router_aux_loss_coef,
                "base_model_name_or_path": self.base_model_name_or_path, "extra": dict(self.extra)}

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> "MoELoraConfig":
        """From an ``adapter_config.json`` dict: a MoE-LoRA one, or a plain PEFT LoRA one (M = 1)."""
        d = dict(d)
        peft_type = str(d.pop("peft_type", "LORA"))
        if peft_type not in ("LORA", FLOE_PEFT_TYPE):
            raise ValueError(f"peft_type {peft_type!r} is neither LORA nor {FLOE_PEFT_TYPE}")
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(d) - known - {"runtime_config"})
        if unknown:
            raise ValueError(f"unknown config keys {unknown} (written by a newer PEFT or FLoE?)")
        kwargs = {k: v for k, v in d.items() if k != "runtime_config"}
        kwargs.setdefault("num_experts", 1)
        return cls(**kwargs)


register()  # PEFT_TYPE_TO_CONFIG_MAPPING['FLOE_MOE_LORA'] = MoELoraConfig (peft_hook.py)
