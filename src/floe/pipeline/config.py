"""``floe run`` configuration: one YAML file from data to report; every field has a default."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from floe.adapters.moe_lora import MoELoraConfig
from floe.errors import InputError
from floe.evaluation import EvalConfig
from floe.evaluation.retention import RetentionConfig, check_outside_training
from floe.selection import SelectionConfig
from floe.specs import DataSpec, ModelSpec
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
    "fim_lora": (False, "PEFT LoRA with FIM-LoRA's per-matrix ranks (calibration gradients, average r)"),
    "prompt_tuning": (False, "PEFT prompt tuning: virtual_tokens trained input embeddings"),
    "p_tuning": (False, "PEFT P-tuning: virtual_tokens embeddings from a trained MLP prompt encoder"),
    "full": (False, "full fine-tuning: every weight of the model trained"),
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
class SearchSpec:
    """Optional Bayesian search of r and M (paper §3.4) on full-layer MoE-LoRA over the warm-up sample;
    the best (r, M) replaces ``adapter.r`` / ``adapter.num_experts`` in every trained method."""

    enabled: bool = False
    """Run the search stage (off: train with adapter.r and adapter.num_experts as given)."""
    n_trials: int = 30
    """Finished Optuna TPE trials (the paper: 30)."""
    steps: int = 20
    """Optimizer steps of each trial (a multiple of eval_points)."""
    eval_points: int = 4
    """Validation losses a trial reports (the median pruner reads them)."""
    r_min: int = 2
    """Smallest rank searched (the paper: 2)."""
    r_max: int = 32
    """Largest rank searched (the paper: 32)."""
    r_step: int = 2
    """Step between searched ranks (the paper: 2)."""
    experts: list[int] = field(default_factory=lambda: [2, 3, 4])
    """Candidate numbers of experts M (the paper: 2-4 single-domain, 6-10 mixed)."""


@dataclass
class RunConfig:
    """``floe run``: train one method on one data set, evaluate it, and record everything."""

    method: str = "floe"
    """One of METHODS: moe_lora, floe, random, first, last, spread, lisa, lora, dora, adalora, fim_lora,
    prompt_tuning, p_tuning, full (see `floe run --help`)."""
    k: int = 8
    """Layers adapted (floe, random, first, last, spread) or trainable at a time (lisa)."""
    seed: int = 41
    """One seed for adapter init, data order, dropout, random/LISA draws (the data split has its own)."""
    model: ModelSpec = field(default_factory=ModelSpec)
    """The base model."""
    data: DataSpec = field(default_factory=DataSpec)
    """Training, validation and test data (the same seeded split for every method)."""
    adapter: MoELoraConfig = field(default_factory=MoELoraConfig)
    """MoE-LoRA (PEFT's LoraConfig names): r, experts M, lora_alpha, targets (its layers are set by the method)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimiser and schedule of the final training (output_dir and seed are set by the run)."""
    warmup_run: WarmupSpec = field(default_factory=WarmupSpec)
    """The warm-up run whose adapter the selection reads (method floe only; not train.warmup_ratio)."""
    select: SelectSpec = field(default_factory=SelectSpec)
    """Layer selection (method floe only)."""
    lisa_interval: int = 20
    """LISA: redraw the trainable layers every this many steps."""
    virtual_tokens: int = 20
    """prompt_tuning / p_tuning: trained virtual tokens put before every input."""
    fim_passes: int = 8
    """fim_lora: calibration forward/backward passes (one training batch each) that score the matrices."""
    search: SearchSpec = field(default_factory=SearchSpec)
    """Optional rank/expert search, run first, before the warm-up (off by default); its best r and M replace
    adapter.r / adapter.num_experts of every trained method."""
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(split="test", max_examples=120, max_new_tokens=32))
    """Evaluation of the trained model on the test split (with train.keep_best: of the best adapter too)."""
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    """Multiple-choice tasks outside the training data, scored on the base model and on each trained adapter
    (the best one with train.keep_best); off while tasks is []."""
    compare: list[str] = field(default_factory=lambda: ["moe_lora"])
    """Methods trained and evaluated beside `method` on the same data, split, steps and seed ([] for none)."""
    output_dir: str = "runs/run"
    """Where run.json, the stage folders and the report go."""
    stage_root: str = ""
    """Folder of the cached stages ('' = <output_dir>/stages); runs that share it share equal stages."""

    RENAMED: ClassVar[dict[str, str]] = {"warmup": "warmup_run"}
    """Old config keys still read, with a deprecation warning."""

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
        for name in ("lisa_interval", "virtual_tokens", "fim_passes"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_outside_training(self.retention, self.data.source)
        if self.search.enabled:  # a bad range, trial count or trial length fails here, before any stage
            from floe.search.objective import eval_schedule

            self.search_config()
            eval_schedule(self.search.steps, self.search.eval_points)

    def search_config(self):
        """The ``floe.search.SearchConfig`` of ``search`` (seeded by the run's seed)."""
        from floe.search import SearchConfig

        s = self.search
        return SearchConfig(r_min=s.r_min, r_max=s.r_max, r_step=s.r_step, experts=list(s.experts),
                            n_trials=s.n_trials, seed=self.seed)
