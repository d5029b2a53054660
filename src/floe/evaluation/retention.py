"""Retention: what fine-tuning costs a model's other abilities (docs/evaluation.md, "Retention").

A trained adapter and the base model are scored on multiple-choice tasks the adapter never trained
on (BIG-bench tasks outside the training mixture, chosen where the base model is clearly above
chance); the change in accuracy is the forgetting. Biderman et al. (2024, "LoRA learns less and
forgets less") put learning (in-domain loss) and forgetting on one curve; the long-training grid
places every layer choice on it (docs/results.md).

Accuracy is :func:`floe.evaluation.choice.evaluate_choice`'s: the option with the highest summed
log-likelihood given the prompt, zero-shot by default.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from floe.errors import InputError


@dataclass
class RetentionConfig:
    """Multiple-choice tasks outside the training data, scored before and after training."""

    tasks: list[str] = field(default_factory=list)
    """BIG-bench multiple-choice task names (as in bigbench:<task>) to score the adapter on ([] = off)."""
    max_examples: int | None = 100
    """Examples per task: the first N of the task's seeded shuffle (None = all)."""
    num_shots: int = 0
    """Solved examples of the same task prepended (0 = zero-shot)."""
    batch_size: int = 8
    """Sequences (prompt + option) per forward pass."""
    max_length: int = 512
    """Longest prompt + option in tokens; longer prompts are cut from the left."""
    seed: int = 0
    """Seed of each task's shuffle (which examples are scored) and of the shots."""

    def __post_init__(self) -> None:
        if self.max_examples is not None and self.max_examples < 1:
            raise InputError(f"retention.max_examples must be >= 1 or null (all), got {self.max_examples}")
        for name in ("batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise InputError(f"retention.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_shots < 0:
            raise InputError(f"retention.num_shots must be >= 0, got {self.num_shots}")
        bad = [t for t in self.tasks if not t or ":" in t or "," in t]
        if bad:
            raise InputError(f"retention.tasks: {bad!r} are not BIG-bench task names; give plain names such as "
                             f"date_understanding (no 'bigbench:' prefix, one task per list item)")

    @property
    def enabled(self) -> bool:
        return bool(self.tasks)

    @property
    def source(self) -> str:
        return "bigbench:" + ",".join(self.tasks)


def check_outside_training(cfg: RetentionConfig, training_source: str) -> None:
    """Refuse a retention task that is part of the training data: it would measure learning, not forgetting."""
    if not training_source.startswith("bigbench:"):
        return
    trained = [t.strip() for t in training_source.removeprefix("bigbench:").split(",")]
    overlap = [t for t in cfg.tasks if t in trained or (t.startswith("natural_instructions") and
                                                        "natural_instructions" in trained)]
    if overlap:
        raise InputError(f"retention.tasks {overlap} are part of the training data {training_source}; retention "
                         f"measures tasks the adapter never trained on. Fix: choose other tasks "
                         f"(docs/evaluation.md lists measured ones).")


def evaluate_retention(model, tokenizer, cfg: RetentionConfig, progress: bool = False) -> dict[str, Any]:
    """Accuracy of ``model`` as it is in memory on each retention task (with its chance level)."""
    from floe.data import load_records
    from floe.evaluation.choice import evaluate_choice, has_options
    from floe.evaluation.prompts import shot_pools

    t0 = time.perf_counter()
    records = load_records(cfg.source, split="all", seed=cfg.seed, max_per_task=cfg.max_examples, on_error="skip")
    no_options = sorted({r.meta.get("task", "") for r in records if not has_options(r)})
    if no_options:
        raise InputError(f"retention.tasks: {no_options} have no multiple-choice options (target_scores); "
                         f"retention needs multiple-choice tasks")
    shots = shot_pools(records) if cfg.num_shots else None  # a record is never its own shot (draw_shots)
    was_training = model.training
    model.eval()
    try:
        from tqdm.auto import tqdm

        with tqdm(total=sum(len(r.meta["choices"]) for r in records), desc="retention", disable=not progress,
                  leave=False) as bar:
            out = evaluate_choice(model, tokenizer, records, shots=shots, num_shots=cfg.num_shots,
                                  shot_seed=cfg.seed, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                  progress=bar.update, keep_predictions=False)
    finally:
        model.train(was_training)
    return {"accuracy": out["accuracy"], "chance": out["chance"], "examples": out["examples"],
            "per_task": out["per_task"], "truncated_prompts": out["truncated_prompts"],
            "seconds": time.perf_counter() - t0}


def retention_delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """Accuracy after training minus before, per task and macro-averaged (negative = forgetting)."""
    per_task = {t: after["per_task"][t]["accuracy"] - v["accuracy"] for t, v in before["per_task"].items()
                if t in after["per_task"]}
    return {"accuracy": after["accuracy"] - before["accuracy"], "per_task": per_task}
