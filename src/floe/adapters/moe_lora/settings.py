"""A job's ``adapter:`` section: FLoE's short form of a ``MoELoraConfig`` (no PEFT import here)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from floe.adapters.moe_lora.config import MoELoraConfig

DEFAULT_TARGETS = ("gate_proj", "up_proj", "down_proj")


def adapter_problems(r, num_experts, alpha, dropout, target_modules, layers, router_aux_loss_coef) -> list[str]:
    """What is wrong with these MoE-LoRA hyperparameters (empty when nothing): the one check that
    both ``AdapterSettings`` and ``MoELoraConfig`` run."""
    problems = []
    if not isinstance(r, int) or r < 1:
        problems.append(f"r must be a positive integer, got {r!r}")
    if not isinstance(num_experts, int) or num_experts < 1:
        problems.append(f"num_experts must be a positive integer, got {num_experts!r}")
    if not 0.0 <= float(dropout) < 1.0:
        problems.append(f"dropout must be in [0, 1), got {dropout!r}")
    if float(alpha) <= 0:
        problems.append(f"alpha must be positive, got {alpha!r}")
    if not target_modules:
        problems.append("target_modules is empty: name at least one module, e.g. ('gate_proj', 'up_proj', 'down_proj')")
    if layers is not None and (len(layers) == 0 or min(layers) < 0):
        problems.append(f"layers must be None (all) or a non-empty list of layer indices >= 0, got {layers!r}")
    if router_aux_loss_coef < 0:
        problems.append(f"router_aux_loss_coef must be >= 0, got {router_aux_loss_coef!r}")
    return problems


@dataclass
class AdapterSettings:
    """Where and how MoE-LoRA is attached (a job's ``adapter:`` section). Defaults follow the paper's Table 6."""

    r: int = 8
    """Rank of the shared down-projection A (and of every expert B)."""
    num_experts: int = 4
    """Number of expert B matrices M; M = 1 is plain LoRA (no router)."""
    alpha: float = 32.0
    """LoRA scaling numerator: the update is multiplied by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter's input (not on the base path)."""
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    """Leaf names of the nn.Linear modules to wrap in each selected decoder layer."""
    layers: list[int] | None = None
    """Indices of the decoder layers to adapt; None adapts all layers."""
    router_aux_loss_coef: float = 0.0
    """Weight of the router load-balancing loss (0 = off, as in the paper)."""
    base_model_name_or_path: str | None = None
    """Model the adapter was trained on (informational; checked shapes are what guard loading)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata saved with the adapter (e.g. selection fingerprint)."""

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.layers is not None:
            self.layers = sorted({int(i) for i in self.layers})
        problems = adapter_problems(self.r, self.num_experts, self.alpha, self.dropout, self.target_modules,
                                    self.layers, self.router_aux_loss_coef)
        if problems:
            raise ValueError("invalid adapter settings: " + "; ".join(problems))

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.r

    def to_peft(self) -> "MoELoraConfig":
        """The PEFT config these settings describe."""
        from floe.adapters.moe_lora.config import MoELoraConfig

        return MoELoraConfig(r=self.r, num_experts=self.num_experts, lora_alpha=self.alpha, lora_dropout=self.dropout,
                             target_modules=list(self.target_modules), layers_to_transform=self.layers,
                             router_aux_loss_coef=self.router_aux_loss_coef,
                             base_model_name_or_path=self.base_model_name_or_path, extra=dict(self.extra))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d
