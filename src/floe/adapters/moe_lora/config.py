"""Configuration of a MoE-LoRA adapter: a PEFT ``LoraConfig`` with experts and a router.

``MoELoraConfig`` is the one adapter config: what ``peft.get_peft_model`` takes, what
``adapter_config.json`` holds, and the ``adapter:`` section of a FLoE job file (PEFT's field
names; the section lists FLoE's fields, any other ``LoraConfig`` field may be set too).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Optional

import torch.nn as nn
from peft import LoraConfig

from floe.adapters.moe_lora.peft_hook import FLOE_PEFT_TYPE, register

DEFAULT_TARGETS = ("gate_proj", "up_proj", "down_proj")
# Keys that only a MoE-LoRA adapter has; an M = 1 adapter is saved without them (plain LoRA).
FLOE_ONLY_KEYS = ("num_experts", "router_aux_loss_coef", "extra")
# The adapter: section's keys before they took PEFT's names (FLoE <= 0.1.0 job files and adapter
# folders). Old job files are read with a FutureWarning (floe.config.from_dict); recorded
# fingerprints hash the old names (``fingerprint_form``), so cached stages and grid cells still match.
RENAMED = {"alpha": "lora_alpha", "dropout": "lora_dropout", "layers": "layers_to_transform"}


def _problems(c: "MoELoraConfig") -> list[str]:
    """What is wrong with the MoE-LoRA hyperparameters of ``c`` (empty when nothing)."""
    problems = []
    if not isinstance(c.r, int) or isinstance(c.r, bool) or c.r < 1:
        problems.append(f"r must be a positive integer, got {c.r!r}")
    if not isinstance(c.num_experts, int) or isinstance(c.num_experts, bool) or c.num_experts < 1:
        problems.append(f"num_experts must be a positive integer, got {c.num_experts!r}")
    if not 0.0 <= float(c.lora_dropout) < 1.0:
        problems.append(f"lora_dropout must be in [0, 1), got {c.lora_dropout!r}")
    if float(c.lora_alpha) <= 0:
        problems.append(f"lora_alpha must be positive, got {c.lora_alpha!r}")
    if not c.target_modules:
        problems.append("target_modules is empty: name at least one module, e.g. ['gate_proj', 'up_proj', 'down_proj']")
    layers = c.layers_to_transform
    if layers is not None and (len(layers) == 0 or min(layers) < 0):
        problems.append(f"layers_to_transform must be null (all) or a non-empty list of layer indices >= 0, "
                        f"got {layers!r}")
    if c.router_aux_loss_coef < 0:
        problems.append(f"router_aux_loss_coef must be >= 0, got {c.router_aux_loss_coef!r}")
    return problems


@dataclass
class MoELoraConfig(LoraConfig):
    """PEFT ``LoraConfig`` for MoE-LoRA: ``peft.get_peft_model(model, MoELoraConfig(...))``.

    Everything of ``LoraConfig`` applies (``layers_to_transform``, ``task_type``, ``use_rslora``,
    ``inference_mode``, ...; not DoRA, LoRA bias or the data-driven initialisations). Defaults
    follow the paper's Table 6.
    """

    RENAMED: ClassVar[dict[str, str]] = RENAMED
    # The fields a job's adapter: section lists (--print-config) and records; any other LoraConfig
    # field is recorded only when it differs from its default (floe.config.to_dict).
    SECTION_FIELDS: ClassVar[tuple[str, ...]] = (
        "r", "num_experts", "lora_alpha", "lora_dropout", "target_modules", "layers_to_transform",
        "router_aux_loss_coef", "base_model_name_or_path", "extra")

    r: int = field(default=8, metadata={"help": "Rank of the shared A (and of every expert B)."})
    lora_alpha: float = field(default=32.0, metadata={"help": "Scaling numerator: the update is x lora_alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter's input (not the base path)."})
    target_modules: Optional[Any] = field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        metadata={"help": "Leaf names (or a regex) of the nn.Linear modules to wrap in each adapted layer."})
    layers_to_transform: Optional[list[int]] = field(
        default=None, metadata={"help": "Indices of the decoder layers to adapt; null adapts every layer."})
    num_experts: int = field(default=4, metadata={"help": "Expert B matrices M; M = 1 is plain LoRA (no router)."})
    router_aux_loss_coef: float = field(
        default=0.0, metadata={"help": "Weight of the router load-balancing loss (0 = off, as in the paper)."})
    extra: dict = field(default_factory=dict, metadata={"help": "Free-form metadata saved with the adapter."})

    def __post_init__(self) -> None:
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None:
            self.layers_to_transform = sorted({int(i) for i in self.layers_to_transform})
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(dict.fromkeys(self.target_modules))
        given = self.target_modules
        problems = _problems(self)
        if problems:
            raise ValueError("invalid MoELoraConfig: " + "; ".join(problems))
        super().__post_init__()
        if isinstance(given, list):  # PEFT makes it a set; a list keeps the order the job gave (and records)
            self.target_modules = given
        from floe.adapters.moe_lora.layer import MoELoraLinear

        self._register_custom_module({nn.Linear: MoELoraLinear})

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

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> "MoELoraConfig":
        """From an ``adapter_config.json`` dict: a MoE-LoRA one, or a plain PEFT LoRA one (M = 1)."""
        d = dict(d)
        peft_type = str(d.pop("peft_type", "LORA"))
        if peft_type not in ("LORA", FLOE_PEFT_TYPE):
            raise ValueError(f"peft_type {peft_type!r} is neither LORA nor {FLOE_PEFT_TYPE}")
        for old in RENAMED:  # FLoE <= 0.1.0 saved copies of lora_alpha etc. under its own names
            d.pop(old, None)
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(d) - known - {"runtime_config"})
        if unknown:
            raise ValueError(f"unknown config keys {unknown} (written by a newer PEFT or FLoE?)")
        kwargs = {k: v for k, v in d.items() if k != "runtime_config"}
        kwargs.setdefault("num_experts", 1)
        return cls(**kwargs)


def fingerprint_form(section: dict[str, Any]) -> dict[str, Any]:
    """An ``adapter:`` section's dict (``floe.config.to_dict``) under the names recorded fingerprints
    hash (FLoE <= 0.1.0's ``alpha``, ``dropout``, ``layers``): the one place the rename is undone."""
    old = {new: o for o, new in RENAMED.items()}
    return {old.get(k, k): v for k, v in section.items()}


register()  # PEFT_TYPE_TO_CONFIG_MAPPING['FLOE_MOE_LORA'] = MoELoraConfig (peft_hook.py)
