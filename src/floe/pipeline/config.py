"""``floe run`` configuration: one YAML file from data to report; every field has a default."""
from __future__ import annotations

from dataclasses import dataclass, field

from floe.adapters.moe_lora import AdapterSettings
from floe.errors import InputError
from floe.evaluation import EvalConfig
from floe.specs import DataSpec, ModelSpec
from floe.selection import SelectionConfig
from floe.training import TrainConfig

# method → (needs k, what it trains). The table every check and the report read.
METHODS: dict[str, tuple[bool, str]] = {
    "moe_lora": (False, "MoE-LoRA on every layer (HydraLoRA)"),
    "floe": (True, "warm-up, FLoE layer selection, MoE-LoRA on the k chosen layers"),
    "random": (True, "MoE-LoRA on k layers drawn by seed"),
    "first": (True, "MoE-LoRA on the k bottom layers"),
    "last": (True, "MoE-LoRA on the k top layers"),
    "spread": (True, "MoE-LoRA on k evenly spaced layers"),
    "lisa": (True, "MoE-LoRA on every layer, k drawn layers trainable, redrawn every lisa_interval steps"),
    "lora": (False, "PEFT LoRA of rank r on every layer's targets"),
    "dora": (False, "PEFT DoRA of rank r on every layer's targets"),
    "adalora": (False, "PEFT AdaLoRA, initial rank 1.5r pruned to an average of r"),
}


@dataclass
class WarmupSpec:
    """The warm-up run that FLoE's selection reads (full-layer MoE-LoRA on a sample of the data)."""

    fraction: float = 0.5
    """Share of the training split the warm-up trains on (the paper: 0.5)."""
    max_steps: int = -1
    """Warm-up optimizer steps (-1: one pass over its sample)."""


@dataclass
class SelectSpec:
    """FLoE layer selection on the warm-up adapter."""

    batch_size: int = 4
    """Examples per selection batch."""
    max_examples: int | None = 64
    """Selection examples drawn from the warm-up sample (None = all of it)."""
    config: SelectionConfig = field(default_factory=SelectionConfig)
    """Budget, mask rule, refinement, tuning, scorer (top_k is set from k)."""


@dataclass
class RunConfig:
    """``floe run``: train one method on one data set, evaluate it, and record everything."""

    method: str = "floe"
    """moe_lora | floe | random | first | last | spread | lisa | lora | dora | adalora (see `floe run --help`)."""
    k: int = 8
    """Layers adapted (floe, random, first, last, spread) or trainable at a time (lisa)."""
    seed: int = 41
    """One seed for adapter init, data order, dropout, random/LISA draws (the data split has its own)."""
    model: ModelSpec = field(default_factory=ModelSpec)
    """The base model."""
    data: DataSpec = field(default_factory=DataSpec)
    """Training, validation and test data (the same seeded split for every method)."""
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    """MoE-LoRA rank r, experts M, targets (its layers are set by the method)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimiser and schedule of the final training (output_dir and seed are set by the run)."""
    warmup: WarmupSpec = field(default_factory=WarmupSpec)
    """The warm-up run (method floe only)."""
    select: SelectSpec = field(default_factory=SelectSpec)
    """Layer selection (method floe only)."""
    lisa_interval: int = 20
    """LISA: redraw the trainable layers every this many steps."""
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(split="test", max_examples=120, max_new_tokens=32))
    """Evaluation of the trained model on the test split."""
    compare: list[str] = field(default_factory=lambda: ["moe_lora"])
    """Methods trained and evaluated beside `method` on the same data, split, steps and seed ([] for none)."""
    output_dir: str = "runs/run"
    """Where run.json, the stage folders and the report go."""
    stage_root: str = ""
    """Folder of the cached stages ('' = <output_dir>/stages); runs that share it share equal stages."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            import difflib

            close = difflib.get_close_matches(self.method, list(METHODS), n=1)
            raise InputError(f"method: unknown {self.method!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                             f"choose one of {', '.join(METHODS)}")
        for other in self.compare:
            if other not in METHODS:
                raise InputError(f"compare: unknown method {other!r}; choose from {', '.join(METHODS)}")
        if METHODS[self.method][0] and self.k < 1:
            raise InputError(f"k must be >= 1 for method {self.method}, got {self.k}")
        if self.lisa_interval < 1:
            raise InputError(f"lisa_interval must be >= 1, got {self.lisa_interval}")
