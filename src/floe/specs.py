"""The model and data sections every job shares (``model:`` and ``data:`` in a job's YAML file).

``floe train``, ``select``, ``eval``, ``search``, ``run`` and ``allocate`` read the same two
sections, so one config file can serve several commands.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelSpec:
    """Which base model to load."""

    name: str = "smollm2-135m"
    """Built-in name (smollm2-135m), local folder, or hub id (hub needs FLOE_ONLINE=1)."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16, float16 or auto."""


@dataclass
class DataSpec:
    """Which data to train and validate on."""

    source: str = "bigbench:natural_instructions"
    """bigbench:<task>, bigbench:natural_instructions, a JSON/JSONL file, a dataset folder or hub name."""
    max_length: int = 512
    """Longest tokenised example (prompt + response); longer ones are an error unless on_error=skip."""
    max_per_task: int | None = 60
    """Cap on examples per task in each split, taken after the seeded per-task split (a single task too; None = all)."""
    max_train_examples: int | None = None
    """Cap on training examples after splitting (None = all)."""
    max_eval_examples: int | None = 128
    """Cap on validation examples (None = all)."""
    fraction: float = 1.0
    """Share of the training split to use (the paper's warm-up uses 0.5)."""
    val_fraction: float = 0.1
    """Share of each task held out for validation."""
    test_fraction: float = 0.1
    """Share of each task held out for test."""
    seed: int = 42
    """Seed of the train/validation/test split and of sampling."""
    on_error: str = "raise"
    """What to do with malformed or over-long examples: raise, or skip (logged)."""
    truncate_prompt: bool = False
    """Cut over-long prompts from the left instead of failing (the response is never cut)."""


def split_options(spec: DataSpec) -> dict:
    """The options of :func:`floe.data.load_records` that decide which examples a split holds: the one
    mapping of a data spec onto the loader, so every job and stage draws the same split."""
    return {"seed": spec.seed, "max_per_task": spec.max_per_task, "val_fraction": spec.val_fraction,
            "test_fraction": spec.test_fraction, "on_error": spec.on_error}


def load_split(spec: DataSpec, tokenizer, split: str, max_examples: int | None):
    """One tokenised split of a data spec (the training split takes ``spec.fraction``), at most ``max_examples``."""
    from floe.data import load_data

    return load_data(spec.source, tokenizer, split=split, max_length=spec.max_length,
                     truncate_prompt=spec.truncate_prompt, max_examples=max_examples,
                     **({"fraction": spec.fraction} if split == "train" else {}), **split_options(spec))


def load_splits(spec: DataSpec, tokenizer):
    """Tokenised (train, validation) datasets for a data spec."""
    return (load_split(spec, tokenizer, "train", spec.max_train_examples),
            load_split(spec, tokenizer, "validation", spec.max_eval_examples))
