"""Deterministic per-task splits, caps, mixing and fraction sampling (pure functions).

Order of operations, per task then across tasks:

1. split each task into train / validation / test by a seeded permutation of the whole
   task (independent of every cap below, so held-out examples never leak into train);
2. keep the first ``max_per_task`` of the requested split;
3. mix tasks: with ``max_examples``, ``equal`` mixing gives each task the same share
   (tasks with fewer examples give all they have, the rest is shared among the others;
   FLANv2-style mixtures), ``proportional`` takes a seeded sample of the pooled examples;
4. keep ``fraction`` of each task's share (the paper's 50 % warm-up sample is then a
   subset of the full training data for the same seed);
5. shuffle the result by seed.

Every choice is a prefix of a seeded permutation, so larger caps give supersets.

Ours rather than ``datasets.Dataset.train_test_split`` / ``shuffle``: those draw from numpy
generators seeded by an int, so they would hold out other examples than earlier runs did, and
their splits are not prefix-stable under caps and fractions, nor per task in a mixture.
"""
from __future__ import annotations

import random
from typing import Sequence, TypeVar

T = TypeVar("T")

SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation",
                 "dev": "validation", "test": "test", "all": "all"}


def canonical_split(split: str) -> str:
    try:
        return SPLIT_ALIASES[split.lower()]
    except KeyError:
        raise ValueError(f"split must be one of train, validation, test, all; got {split!r}") from None


def permutation(n: int, *key: object) -> list[int]:
    """A permutation of ``range(n)`` fixed by ``key`` (str-seeded: the same on every platform/run)."""
    order = list(range(n))
    random.Random(":".join(map(str, key))).shuffle(order)
    return order


def held_out_size(n: int, fraction: float) -> int:
    """Examples a held-out split of ``fraction`` gets: rounded, at least 1 when the fraction is positive."""
    if fraction <= 0 or n < 3:
        return 0
    return max(1, round(n * fraction))


def split_indices(n: int, task: str, seed: int, val_fraction: float, test_fraction: float) -> dict[str, list[int]]:
    """Indices of train / validation / test for a task of ``n`` examples, each in a seeded random order."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction and test_fraction must be in [0, 1) and sum below 1, "
                         f"got {val_fraction} and {test_fraction}")
    order = permutation(n, "floe-split", seed, task)
    n_test = held_out_size(n, test_fraction)
    n_val = min(held_out_size(n, val_fraction), max(n - n_test - 1, 0))
    return {"test": order[:n_test], "validation": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}


def equal_shares(sizes: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` among tasks as equally as their sizes allow (water-filling).

    Small tasks contribute everything they have; the remainder is shared equally among
    the larger ones (differences of at most one example, given to larger tasks first).
    """
    shares: dict[str, int] = {}
    left = total
    ordered = sorted(sizes, key=lambda t: (sizes[t], t))
    for i, task in enumerate(ordered):
        fair = left // (len(ordered) - i)
        shares[task] = min(sizes[task], fair)
        left -= shares[task]
    for task in reversed(ordered):  # hand out the rounding remainder
        if left <= 0:
            break
        if shares[task] < sizes[task]:
            shares[task] += 1
            left -= 1
    return shares


def proportional_shares(sizes: dict[str, int], total: int, seed: int) -> dict[str, int]:
    """Split ``total`` as a seeded uniform sample of the pooled examples would."""
    pool = [t for t in sorted(sizes) for _ in range(sizes[t])]
    shares = dict.fromkeys(sizes, 0)
    for i in permutation(len(pool), "floe-mix-sample", seed)[:total]:
        shares[pool[i]] += 1
    return shares


def fraction_size(n: int, fraction: float) -> int:
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return n if fraction == 1 else max(1, round(n * fraction)) if n else 0


def select(
    tasks: dict[str, Sequence[T]],
    split: str,
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    max_per_task: int | None = None,
    max_examples: int | None = None,
    fraction: float = 1.0,
    mixing: str = "equal",
    presplit: dict[str, dict[str, Sequence[T]]] | None = None,
) -> list[T]:
    """Pick the items of ``split`` from several tasks (steps 1-5 of the module docstring).

    ``presplit`` gives tasks that come with their own splits (e.g. a Hugging Face data set
    with ``train``/``test``): those are used as they are, and a missing held-out split is
    carved out of that task's ``train`` with the fractions.
    """
    split = canonical_split(split)
    chosen: dict[str, list[T]] = {}
    for task, items in tasks.items():
        if split == "all":
            chosen[task] = [items[i] for i in permutation(len(items), "floe-split", seed, task)]
        else:
            parts = split_indices(len(items), task, seed, val_fraction, test_fraction)
            chosen[task] = [items[i] for i in parts[split]]
    for task, native in (presplit or {}).items():
        chosen[task] = _from_native(native, task, split, seed, val_fraction, test_fraction)
    if max_per_task is not None:
        chosen = {t: v[:max_per_task] for t, v in chosen.items()}
    if max_examples is not None and sum(map(len, chosen.values())) > max_examples:
        sizes = {t: len(v) for t, v in chosen.items()}
        if mixing == "equal":
            shares = equal_shares(sizes, max_examples)
        elif mixing == "proportional":
            shares = proportional_shares(sizes, max_examples, seed)
        else:
            raise ValueError(f"mixing must be 'equal' or 'proportional', got {mixing!r}")
        chosen = {t: v[:shares[t]] for t, v in chosen.items()}
    chosen = {t: v[:fraction_size(len(v), fraction)] for t, v in chosen.items()}
    pooled = [x for t in sorted(chosen) for x in chosen[t]]
    return [pooled[i] for i in permutation(len(pooled), "floe-shuffle", seed)]


def _from_native(native: dict[str, Sequence[T]], task: str, split: str, seed: int,
                 val_fraction: float, test_fraction: float) -> list[T]:
    def shuffled(items: Sequence[T], *tag: str) -> list[T]:
        return [items[i] for i in permutation(len(items), "floe-split", seed, task, *tag)]

    if split == "all":
        return [x for name in sorted(native) for x in shuffled(native[name], name)]
    if split != "train" and split in native:
        return shuffled(native[split], split)
    if "train" not in native:
        raise ValueError(f"{task}: has splits {sorted(native)}, none of them {split!r} or 'train' to carve it from")
    carve_val = 0.0 if "validation" in native else val_fraction
    carve_test = 0.0 if "test" in native else test_fraction
    train = native["train"]
    parts = split_indices(len(train), task, seed, carve_val, carve_test)
    return [train[i] for i in parts[split]]
