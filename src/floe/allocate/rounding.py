"""Proportional rank allocation under bounds, with the total kept exactly.

Two pure steps (FIM-LoRA: "redistribute the rank budget proportionally"):

1. **Water-filling** (continuous shares): find ``lam >= 0`` with
   ``sum_i clip(lam * s_i, lo_i, hi_i) = T`` and set ``x_i = clip(lam * s_i, lo_i, hi_i)``.
   A matrix whose proportional share falls below its minimum is lifted to it, one above its
   cap is held at the cap, and the others share what is left in proportion to their scores;
   this is the fixed point that iterated clamping converges to, found here directly.
2. **Largest remainder** (Hamilton's method): ``r_i = floor(x_i)`` plus one for the
   ``T - sum floor(x_i)`` matrices with the largest fractional parts.

Everything is computed in exact rational arithmetic (``fractions.Fraction``; a float
converts to a Fraction exactly), so ``sum x_i == T`` holds exactly and the integer step
provably lands on ``T``: the leftover ``R = T - sum floor(x_i)`` equals the sum of the
fractional parts, each below 1, so more than ``R`` matrices have a non-zero fractional part,
and each of those has ``floor(x_i) + 1 <= hi_i`` because ``x_i <= hi_i`` with integer
``hi_i``. Floats would make step 2 depend on rounding noise (``2.9999999`` vs ``3``).
With a few hundred matrices the exact arithmetic costs milliseconds.
"""
from __future__ import annotations

from floe.errors import InputError

import math
import operator
from fractions import Fraction
from typing import Sequence


class BudgetError(InputError):
    """The rank budget cannot be spread under the given per-matrix bounds."""


def _as_bounds(value: int | Sequence[int], n: int, what: str) -> list[int]:
    vals = [value] * n if isinstance(value, int) else list(value)
    if len(vals) != n:
        raise ValueError(f"{what} has {len(vals)} entries for {n} matrices")
    out = []
    for v in vals:
        try:
            if isinstance(v, bool):
                raise TypeError
            out.append(operator.index(v))  # ints and numpy integers, not floats
        except TypeError:
            raise ValueError(f"{what} must be integers, got {v!r}") from None
    return out


def check_budget(total: int, lo: Sequence[int], hi: Sequence[int]) -> None:
    """Raise ``BudgetError`` unless ``sum(lo) <= total <= sum(hi)`` and ``lo_i <= hi_i``."""
    bad = [i for i, (a, b) in enumerate(zip(lo, hi)) if a > b]
    if bad:
        i = bad[0]
        raise BudgetError(
            f"matrix {i} has minimum rank {lo[i]} above its cap {hi[i]} (the cap is the smaller of the "
            f"configured maximum and min(d_in, d_out)); lower the minimum rank or raise the maximum."
        )
    n, lo_sum, hi_sum = len(lo), sum(lo), sum(hi)
    if total < lo_sum:
        raise BudgetError(
            f"total rank budget {total} is below {lo_sum}, the sum of the minimum ranks of the {n} matrices: "
            f"every adapted matrix needs at least its minimum rank. Raise the budget (budget rank >= minimum "
            f"rank) or lower the minimum rank."
        )
    if total > hi_sum:
        raise BudgetError(
            f"total rank budget {total} is above {hi_sum}, the sum of the rank caps of the {n} matrices: "
            f"the budget cannot be spent. Lower the budget rank or raise the maximum rank per matrix."
        )


def _check_scores(scores: Sequence[float]) -> list[Fraction]:
    out = []
    for i, s in enumerate(scores):
        s = float(s)
        if not math.isfinite(s) or s < 0:
            raise ValueError(f"score of matrix {i} is {s!r}; scores must be finite and >= 0")
        out.append(Fraction(s))
    return out


def _clipped_sum(lam: Fraction, s: list[Fraction], lo: list[int], hi: list[int]) -> Fraction:
    return sum((min(max(lam * si, a), b) for si, a, b in zip(s, lo, hi)), Fraction(0))


def water_fill(scores: Sequence[float], total: int, lo: int | Sequence[int], hi: int | Sequence[int]) -> list[Fraction]:
    """Continuous shares ``x_i = clip(lam * s_i, lo_i, hi_i)`` with ``sum x_i == total`` exactly.

    Matrices with score 0 stay at their minimum while the others can absorb the budget;
    if the positive-score matrices all reach their caps, the rest is shared equally (by
    water-filling with equal weights) among the zero-score ones — the limit of adding an
    infinitesimal equal score to all. All scores zero therefore means a uniform split.
    """
    n = len(scores)
    s = _check_scores(scores)
    lo_l, hi_l = _as_bounds(lo, n, "minimum ranks"), _as_bounds(hi, n, "rank caps")
    check_budget(total, lo_l, hi_l)
    pos = [i for i in range(n) if s[i] > 0]
    zero = [i for i in range(n) if s[i] == 0]
    x: list[Fraction] = [Fraction(a) for a in lo_l]
    if total == sum(lo_l):
        return x
    pos_full = sum(hi_l[i] for i in pos) + sum(lo_l[i] for i in zero)
    if total > pos_full:  # positives saturate; zeros share the rest uniformly
        for i in pos:
            x[i] = Fraction(hi_l[i])
        rest = water_fill([1.0] * len(zero), total - sum(hi_l[i] for i in pos),
                          [lo_l[i] for i in zero], [hi_l[i] for i in zero])
        for i, xi in zip(zero, rest):
            x[i] = xi
        return x
    # f(lam) = sum clip(lam s_i, lo_i, hi_i) over positives (+ zeros at lo) is continuous,
    # non-decreasing and linear between the breakpoints lo_i/s_i and hi_i/s_i: bracket
    # ``total`` between two breakpoints by bisection, then solve the linear piece exactly.
    ps, plo, phi = [s[i] for i in pos], [lo_l[i] for i in pos], [hi_l[i] for i in pos]
    base = Fraction(sum(lo_l[i] for i in zero))
    f = lambda lam: base + _clipped_sum(lam, ps, plo, phi)  # noqa: E731
    bps = sorted({Fraction(a) / si for si, a in zip(ps, plo)} | {Fraction(b) / si for si, b in zip(ps, phi)})
    # Invariant f(bps[lo_k]) < total <= f(bps[hi_k]): f(bps[0]) = sum lo < total (the equal case
    # returned above) and f(bps[-1]) = pos_full >= total.
    lo_k, hi_k = 0, len(bps) - 1
    while hi_k - lo_k > 1:
        mid = (lo_k + hi_k) // 2
        if f(bps[mid]) >= total:
            hi_k = mid
        else:
            lo_k = mid
    a, b = bps[lo_k], bps[hi_k]
    fa, fb = f(a), f(b)
    lam = a + (total - fa) * (b - a) / (fb - fa)  # fa < total <= fb, so fb > fa
    for i, si, l_, h_ in zip(pos, ps, plo, phi):
        x[i] = min(max(lam * si, Fraction(l_)), Fraction(h_))
    assert sum(x) == total, "water-filling lost exactness"  # guaranteed by the construction above
    return x


def largest_remainder(shares: Sequence[Fraction], total: int, scores: Sequence[float] | None = None) -> list[int]:
    """Hamilton rounding of exact shares summing to ``total``: floors, then +1 by largest fraction.

    Ties in the fractional part go to the larger score, then to the lower index, so the
    result is deterministic.
    """
    floors = [math.floor(x) for x in shares]
    left = total - sum(floors)
    if left < 0 or left > len(shares):
        raise ValueError(f"shares sum to {float(sum(shares))}, not to the total {total}")
    sc = [0.0] * len(shares) if scores is None else [float(v) for v in scores]
    order = sorted(range(len(shares)), key=lambda i: (-(shares[i] - floors[i]), -sc[i], i))
    for i in order[:left]:
        floors[i] += 1
    return floors


def allocate(scores: Sequence[float], total: int, lo: int | Sequence[int] = 1,
             hi: int | Sequence[int] | None = None) -> list[int]:
    """Integer ranks ``r_i`` with ``lo_i <= r_i <= hi_i`` and ``sum r_i == total``, proportional to ``scores``.

    Water-filling then largest-remainder rounding (see the module docstring). ``hi=None``
    means no cap beyond ``total``. Raises ``BudgetError`` when ``total`` is outside
    ``[sum lo, sum hi]``.
    """
    n = len(scores)
    if n == 0:
        raise ValueError("no matrices to allocate ranks to")
    if isinstance(total, bool) or not isinstance(total, int):
        raise ValueError(f"total rank budget must be an integer, got {total!r}")
    hi = total if hi is None else hi
    shares = water_fill(scores, total, lo, hi)
    ranks = largest_remainder(shares, total, scores)
    lo_l, hi_l = _as_bounds(lo, n, "minimum ranks"), _as_bounds(hi, n, "rank caps")
    assert sum(ranks) == total and all(a <= r <= b for r, a, b in zip(ranks, lo_l, hi_l))
    return ranks
