"""Which decoder layers a baseline adapts: position baselines, a seeded random draw, LISA's draws.

Pure functions of (number of layers, k, seed), so a run's layer set is known before any model
is loaded and is the same on every machine.
"""
from __future__ import annotations

import random

from floe.errors import InputError


def check_k(k: int, num_layers: int) -> None:
    if not 1 <= k <= num_layers:
        raise InputError(f"k={k} is out of range: the model has {num_layers} decoder layers; choose 1..{num_layers}")


def first_layers(num_layers: int, k: int) -> list[int]:
    """The k bottom layers."""
    check_k(k, num_layers)
    return list(range(k))


def last_layers(num_layers: int, k: int) -> list[int]:
    """The k top layers."""
    check_k(k, num_layers)
    return list(range(num_layers - k, num_layers))


def spread_layers(num_layers: int, k: int) -> list[int]:
    """k layers evenly spaced from the first to the last (k = 1: the middle one)."""
    check_k(k, num_layers)
    if k == 1:
        return [num_layers // 2]
    return [round(i * (num_layers - 1) / (k - 1)) for i in range(k)]


def random_layers(num_layers: int, k: int, seed: int) -> list[int]:
    """k distinct layers drawn uniformly by ``seed`` (sorted)."""
    check_k(k, num_layers)
    return sorted(random.Random(f"random-layers/{seed}").sample(range(num_layers), k))


def fixed_layers(method: str, num_layers: int, k: int, seed: int) -> list[int] | None:
    """The layers a method that needs no selection adapts: ``first``, ``last``, ``spread``, ``random``;
    None (every layer) for the rest."""
    choose = {"first": lambda: first_layers(num_layers, k), "last": lambda: last_layers(num_layers, k),
              "spread": lambda: spread_layers(num_layers, k), "random": lambda: random_layers(num_layers, k, seed)}
    return choose[method]() if method in choose else None


def lisa_draw(num_layers: int, k: int, seed: int, draw: int) -> list[int]:
    """LISA's ``draw``-th set of k active layers (a function of seed and draw index, so a resumed
    run draws what an uninterrupted one would)."""
    check_k(k, num_layers)
    return sorted(random.Random(f"lisa/{seed}/{draw}").sample(range(num_layers), k))


def train_key(layers: list[int] | None, num_layers: int) -> list[int] | None:
    """The layer list as a training stage's cache key: the set, sorted (a selection lists its layers in
    rank order, and the order changes neither the adapter nor its training), and None (every layer)
    when it names each layer, so FLoE or random at k = num_layers reuse full-layer MoE-LoRA's training."""
    if layers is None or sorted(layers) == list(range(num_layers)):
        return None
    return sorted(layers)


def position_match(layers: list[int], num_layers: int) -> str | None:
    """The position baseline (``first``, ``last``, ``spread``) whose layer set ``layers`` is, or None.

    A selection that lands on one of them is a choice those baselines make without any selection;
    :func:`position_note` says so to the user."""
    k = len(layers)
    if not 1 <= k < num_layers:
        return None
    for name, fn in (("last", last_layers), ("first", first_layers), ("spread", spread_layers)):
        if sorted(layers) == fn(num_layers, k):
            return name
    return None


def position_note(layers: list[int], num_layers: int) -> str | None:
    """A one-line note when ``layers`` is a position baseline's set (see :func:`position_match`)."""
    name = position_match(layers, num_layers)
    if name is None:
        return None
    return (f"note: the chosen layers are exactly the {name} {len(layers)} of {num_layers}, the `{name}` position "
            f"baseline, which needs no warm-up or selection; compare against `method: {name}` and `random` "
            f"before relying on the selection (docs/results.md)")
