"""Configuration of the rank / expert-count search (paper §3.4) and its errors.

Pure data and validation: nothing here touches Optuna storage or torch.
"""
from __future__ import annotations

from floe.errors import InputError

from dataclasses import asdict, dataclass, field
from typing import Any

PRUNERS = ("none", "median", "halving")
SAMPLERS = ("tpe", "random")


class SearchError(InputError):
    """The search cannot start or go on: bad ranges, unusable storage, mismatched study."""


class TrialFailed(Exception):
    """Raised by an objective (or by the search) when one trial cannot give a value.

    The trial is recorded as failed with ``str(exc)`` as its reason and the study goes on.
    Objectives raise it for their own reasons (e.g. "loss diverged"); NaN / infinite
    values and out-of-memory errors are turned into it by the search itself.
    """


def _is_arithmetic(values: list[int]) -> bool:
    if len(values) < 3:
        return True
    step = values[1] - values[0]
    return all(b - a == step for a, b in zip(values, values[1:]))


@dataclass
class SearchConfig:
    """What the search explores and how. Defaults follow the paper's §4 implementation details:
    r in [2, 32] step 2, M (number of expert B matrices) in {2, 3, 4}, 30 TPE trials."""

    r_min: int = 2
    """Smallest LoRA rank searched."""
    r_max: int = 32
    """Largest LoRA rank searched (r_max - r_min must be a multiple of r_step)."""
    r_step: int = 2
    """Step between searched ranks."""
    experts: list[int] = field(default_factory=lambda: [2, 3, 4])
    """Candidate numbers of experts M (any list of positive integers)."""
    n_trials: int = 30
    """Finished trials the study ends with (complete + pruned + failed with a reason),
    cache hits included; trials cut short by a killed worker are not counted and are retried."""
    seed: int | None = 0
    """Seeds the sampler. Each trial's proposal is seeded by (seed, trial number), so a fresh
    single-worker search is reproducible and a resumed or parallel one proposes new points."""
    sampler: str = "tpe"
    """'tpe' (multivariate TPE; its acquisition maximises l(x)/g(x), i.e. expected improvement)
    or 'random' (baseline)."""
    n_startup_trials: int = 10
    """Random trials before TPE starts modelling (Optuna's default)."""
    pruner: str = "median"
    """'none', 'median' (MedianPruner) or 'halving' (SuccessiveHalvingPruner)."""
    pruner_warmup_steps: int = 0
    """MedianPruner: steps reported before pruning is considered."""
    pruner_startup_trials: int = 5
    """MedianPruner: trials that finish before any is pruned."""
    halving_min_resource: int | None = None
    """SuccessiveHalvingPruner: step of the first rung (None = Optuna's 'auto')."""
    halving_reduction_factor: int = 2
    """SuccessiveHalvingPruner: keep the best 1/factor of the trials at each rung."""
    heartbeat_interval: int = 30
    """Seconds between a running trial's heartbeats in RDB storage."""
    grace_period: int = 120
    """Seconds without a heartbeat after which a running trial counts as abandoned (its worker
    was killed): it is marked failed-stale, not counted, and its configuration is retried."""
    poll_interval: float = 1.0
    """Seconds between storage polls while waiting on another worker's trial."""

    def __post_init__(self) -> None:
        self.experts = [int(m) for m in self.experts] if self.experts is not None else []
        problems = []
        for name in ("r_min", "r_max", "r_step", "n_trials", "n_startup_trials", "heartbeat_interval",
                     "grace_period"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                problems.append(f"{name} must be a positive integer, got {v!r}")
        if not problems and self.r_min > self.r_max:
            problems.append(f"rank range is inverted: r_min={self.r_min} > r_max={self.r_max} "
                            "(swap them, e.g. --r-min 2 --r-max 32)")
        if not problems and (self.r_max - self.r_min) % self.r_step:
            problems.append(f"r_max - r_min = {self.r_max - self.r_min} is not a multiple of r_step = {self.r_step}: "
                            f"the largest rank reachable would be {self.ranks()[-1]}; set r_max to it")
        if not self.experts:
            problems.append("expert list is empty: give at least one number of experts, e.g. --experts 2,3,4")
        elif min(self.experts) < 1:
            problems.append(f"numbers of experts must be >= 1, got {self.experts}")
        elif len(set(self.experts)) != len(self.experts):
            problems.append(f"numbers of experts repeat: {self.experts}")
        if self.sampler not in SAMPLERS:
            problems.append(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.pruner not in PRUNERS:
            problems.append(f"pruner must be one of {PRUNERS}, got {self.pruner!r}")
        if self.pruner_warmup_steps < 0 or self.pruner_startup_trials < 0:
            problems.append("pruner_warmup_steps and pruner_startup_trials must be >= 0")
        if self.halving_min_resource is not None and self.halving_min_resource < 1:
            problems.append(f"halving_min_resource must be >= 1 or None, got {self.halving_min_resource!r}")
        if self.halving_reduction_factor < 2:
            problems.append(f"halving_reduction_factor must be >= 2, got {self.halving_reduction_factor!r}")
        if not self.poll_interval > 0:
            problems.append(f"poll_interval must be > 0, got {self.poll_interval!r}")
        if problems:
            raise SearchError("invalid search configuration: " + "; ".join(problems))
        self.experts = sorted(self.experts)

    def ranks(self) -> list[int]:
        """The candidate ranks r_min, r_min + r_step, ..., <= r_max."""
        return list(range(self.r_min, self.r_max + 1, self.r_step))

    def space_size(self) -> int:
        return len(self.ranks()) * len(self.experts)

    def search_space(self) -> dict[str, Any]:
        """The space as stored with the study: a study may only be resumed or shared
        by searches over exactly this space."""
        return {
            "r": {"low": self.r_min, "high": self.r_max, "step": self.r_step},
            "num_experts": {"choices": list(self.experts), "ordered": _is_arithmetic(self.experts)},
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
