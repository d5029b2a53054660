"""Determination stage: the greedy mask search of Algorithm 1 (paper Eq. 11-12, Alg. 1).

Inputs are per-unit scores over all layers at once: ``fisher_head`` / ``cost_head`` of shape
``(L, H)`` (query heads) and ``fisher_neuron`` / ``cost_neuron`` of shape ``(L, F)`` (FFN
neurons). Fisher ``F_u = sum_e g[e, u]^2`` (per example, or per batch) comes from the adapted
model, the Taylor cost ``c_u`` (Eq. 4) from the base model (docs/method.md, "Importance").

Budget: ``C = gamma * sum_u c_u`` with ``gamma`` in (0, 1). Alg. 1 prices every head at the mean
head cost ``t_h`` and every neuron at the mean neuron cost ``t_f``; for ``n = 0 .. #heads``
(``n * t_h <= C``) it takes ``f = clip(floor((C - n t_h) / t_f), 0, #neurons)`` neurons and
forms ``S_n`` = the ``n`` heads and ``f`` neurons with the smallest (``paper``) or largest
(``kwon``, ``fisher_top``) Fisher, then keeps the best ``S_n``.

The three ``rule`` readings (docs/method.md, "Determination"):

=============  ======================  ===========================  ======================
rule           S_n takes               best S_n                     S is
=============  ======================  ===========================  ======================
``paper``      smallest Fisher         smallest total Fisher        the masked set (m=0)
``kwon``       largest Fisher          largest total Fisher         the kept set (m=1)
``fisher_top`` largest Fisher          largest total Fisher         the masked set (m=0)
=============  ======================  ===========================  ======================

Whatever the rule, :func:`determine` returns the *masked* units, so downstream code is
rule-agnostic. Alg. 1 prices units at the mean costs, so its set can exceed ``C`` under the
per-unit costs; :func:`repair_budget` then makes it fit (the pipeline always calls it).
Implementation: one stable sort per unit type and prefix sums make the whole
scan over ``n`` a vectorised ``O(N log N)`` (ties in Fisher are broken by flat index, lower
first; ties between ``n`` values keep the smallest ``n``, as the loop's strict ``<`` does).
"""
from __future__ import annotations

import math

import torch

from floe.selection.masks import MaskSet

RULES = ("paper", "kwon", "fisher_top")

# Guards floor((C - n t_h) / t_f) against an exact multiple landing just below an integer.
_FLOOR_EPS = 1e-9


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"mask_rule must be one of {RULES}, got {rule!r}")
    return rule


def check_scores(fisher_head: torch.Tensor, fisher_neuron: torch.Tensor,
                 cost_head: torch.Tensor, cost_neuron: torch.Tensor) -> None:
    """Shapes ``(L, H)`` / ``(L, F)`` agree, values finite, costs non-negative."""
    named = {"fisher_head": fisher_head, "fisher_neuron": fisher_neuron,
             "cost_head": cost_head, "cost_neuron": cost_neuron}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor (layers, units); got "
                             f"{type(t).__name__} with shape {tuple(getattr(t, 'shape', ()))}")
        if t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf; recompute the scores")
    if fisher_head.shape != cost_head.shape:
        raise ValueError(f"fisher_head {tuple(fisher_head.shape)} and cost_head "
                         f"{tuple(cost_head.shape)} must have the same shape (L, H)")
    if fisher_neuron.shape != cost_neuron.shape:
        raise ValueError(f"fisher_neuron {tuple(fisher_neuron.shape)} and cost_neuron "
                         f"{tuple(cost_neuron.shape)} must have the same shape (L, F)")
    if fisher_head.shape[0] != fisher_neuron.shape[0]:
        raise ValueError(f"head scores have {fisher_head.shape[0]} layers, neuron scores "
                         f"{fisher_neuron.shape[0]}")
    check_costs(cost_head, cost_neuron)


def check_costs(cost_head: torch.Tensor, cost_neuron: torch.Tensor) -> None:
    """Per-unit Taylor costs: 2-D, finite, non-negative, same number of layers."""
    for name, t in (("cost_head", cost_head), ("cost_neuron", cost_neuron)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.numel() == 0:
            raise ValueError(f"{name} must be a non-empty 2-D tensor (layers, units); got "
                             f"{type(t).__name__} with shape {tuple(getattr(t, 'shape', ()))}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf; recompute the Taylor costs")
        if bool((t < 0).any()):
            raise ValueError(f"{name} has negative entries; Taylor costs are sums of "
                             "absolute values and must be >= 0")
    if cost_head.shape[0] != cost_neuron.shape[0]:
        raise ValueError(f"cost_head has {cost_head.shape[0]} layers, cost_neuron "
                         f"{cost_neuron.shape[0]}")


def budget_from_fraction(gamma: float, cost_head: torch.Tensor,
                         cost_neuron: torch.Tensor) -> float:
    """``C = gamma * sum_u c_u`` (docs/method.md, "Determination"); ``gamma`` must lie in (0, 1)."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) \
            or not 0.0 < float(gamma) < 1.0:
        raise ValueError(f"budget must be a fraction gamma in (0, 1) of the total Taylor cost, "
                         f"got {gamma!r}")
    total = float(cost_head.double().sum() + cost_neuron.double().sum())
    if not total > 0.0:
        raise ValueError("the total Taylor cost is zero, so a budget gamma * total cost is "
                         "meaningless; check the cost computation (adapters off, loss on "
                         "response tokens)")
    return float(gamma) * total


def mean_costs(cost_head: torch.Tensor, cost_neuron: torch.Tensor) -> tuple[float, float]:
    """``(t_h, t_f)``: mean Taylor cost of a head and of a neuron (Alg. 1 inputs)."""
    return float(cost_head.double().mean()), float(cost_neuron.double().mean())


def _feasible_counts(budget_c: float, t_h: float, t_f: float, n_heads: int,
                     n_neurons: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Alg. 1 lines 3-8: the head counts ``n`` with ``n t_h <= C`` and their ``f``."""
    n = torch.arange(n_heads + 1, dtype=torch.float64)
    n = n[n * t_h <= budget_c]
    if t_f > 0:
        f = torch.floor((budget_c - n * t_h) / t_f + _FLOOR_EPS)
    else:  # neurons cost nothing: every neuron fits
        f = torch.full_like(n, float(n_neurons))
    f = f.clamp(0, n_neurons)
    return n.long(), f.long()


def determine(fisher_head: torch.Tensor, fisher_neuron: torch.Tensor, cost_head: torch.Tensor,
              cost_neuron: torch.Tensor, budget: float, rule: str = "paper") -> MaskSet:
    """Algorithm 1 (greedy mask search) over all layers at once; returns the masked units.

    ``budget`` is the fraction ``gamma`` in (0, 1): ``C = gamma * sum_u c_u``. ``rule`` is one
    of ``"paper"``, ``"kwon"``, ``"fisher_top"`` (see the module docstring). The result's
    ``diagnostics`` has ``rule``, ``budget`` (C), ``gamma``, ``t_h``, ``t_f``, ``n_heads`` /
    ``n_neurons`` (the chosen ``n`` and ``f``, counted in S), ``objective`` (total Fisher of
    S), ``mean_cost`` (n t_h + f t_f) and ``masked_cost`` (per-unit cost of the masked set).
    """
    check_rule(rule)
    check_scores(fisher_head, fisher_neuron, cost_head, cost_neuron)
    budget_c = budget_from_fraction(budget, cost_head, cost_neuron)
    t_h, t_f = mean_costs(cost_head, cost_neuron)
    n_layers, heads_per_layer = fisher_head.shape
    fh = fisher_head.reshape(-1).double()
    fn = fisher_neuron.reshape(-1).double()

    descending = rule != "paper"  # paper: smallest Fisher; kwon / fisher_top: largest
    order_h = torch.sort(fh, descending=descending, stable=True).indices
    order_f = torch.sort(fn, descending=descending, stable=True).indices
    prefix_h = torch.cat([fh.new_zeros(1), torch.cumsum(fh[order_h], 0)])
    prefix_f = torch.cat([fn.new_zeros(1), torch.cumsum(fn[order_f], 0)])

    n, f = _feasible_counts(budget_c, t_h, t_f, fh.numel(), fn.numel())
    objective = prefix_h[n] + prefix_f[f]
    # argmin/argmax return the first extreme value: the smallest n among ties (Alg. 1's strict <)
    best = int(torch.argmax(objective) if descending else torch.argmin(objective))
    n_best, f_best = int(n[best]), int(f[best])

    in_s_h = torch.zeros(fh.numel(), dtype=torch.bool)
    in_s_h[order_h[:n_best]] = True
    in_s_f = torch.zeros(fn.numel(), dtype=torch.bool)
    in_s_f[order_f[:f_best]] = True
    if rule == "kwon":  # S is the kept set
        in_s_h, in_s_f = ~in_s_h, ~in_s_f
    masks = MaskSet(in_s_h.reshape(n_layers, heads_per_layer),
                    in_s_f.reshape(n_layers, fisher_neuron.shape[1]))
    masks.diagnostics.update(
        rule=rule, gamma=float(budget), budget=budget_c, t_h=t_h, t_f=t_f,
        n_heads=n_best, n_neurons=f_best, objective=float(objective[best]),
        mean_cost=n_best * t_h + f_best * t_f,
        masked_cost=masks.masked_cost(cost_head, cost_neuron),
    )
    return masks


def constrained_cost(masked_head: torch.Tensor, masked_neuron: torch.Tensor, cost_head: torch.Tensor,
                     cost_neuron: torch.Tensor, rule: str) -> float:
    """Per-unit cost the budget bounds: of the masked set (``paper``, ``fisher_top``) or of the kept
    set (``kwon``)."""
    masked = float(cost_head.double()[masked_head].sum() + cost_neuron.double()[masked_neuron].sum())
    if rule != "kwon":
        return masked
    return float(cost_head.double().sum() + cost_neuron.double().sum()) - masked


def repair_budget(masks: MaskSet, fisher_head: torch.Tensor, fisher_neuron: torch.Tensor,
                  cost_head: torch.Tensor, cost_neuron: torch.Tensor, budget: float,
                  rule: str = "paper") -> MaskSet:
    """Make Alg. 1's set fit ``C`` under per-unit costs (Alg. 1 prices units at the mean costs).

    ``paper`` / ``fisher_top`` (the masked set's cost is bounded): unmask units, worst
    Fisher-per-cost first, until the masked cost is ``<= C`` — for ``paper`` (which minimises the
    masked Fisher) the worst is the largest ``F_u / c_u``, for ``fisher_top`` (maximises it) the
    smallest. ``kwon`` (the kept set's cost is bounded): mask kept units, smallest ``F_u / c_u``
    first (kwon maximises the kept Fisher), until the kept cost is ``<= C``. Zero-cost units are
    never moved (they free no budget). A set that already fits is returned unchanged. The
    result's diagnostics are the input's plus ``repair``: ``cost_before``, ``cost_after``,
    ``budget`` and ``units_moved`` (``heads``/``neurons``).
    """
    check_rule(rule)
    check_scores(fisher_head, fisher_neuron, cost_head, cost_neuron)
    budget_c = budget_from_fraction(budget, cost_head, cost_neuron)
    before = constrained_cost(masks.masked_head, masks.masked_neuron, cost_head, cost_neuron, rule)
    mh, mn = masks.masked_head.clone(), masks.masked_neuron.clone()
    moved_h = moved_n = 0
    if before > budget_c:
        pool = torch.cat([(~mh if rule == "kwon" else mh).reshape(-1), (~mn if rule == "kwon" else mn).reshape(-1)])
        f = torch.cat([fisher_head.reshape(-1), fisher_neuron.reshape(-1)]).double()
        c = torch.cat([cost_head.reshape(-1), cost_neuron.reshape(-1)]).double()
        ratio = f / c.clamp_min(1e-300)
        badness = ratio if rule == "paper" else -ratio
        badness = torch.where(pool & (c > 0), badness, -torch.inf)
        order = torch.sort(badness, descending=True, stable=True).indices
        order = order[torch.isfinite(badness[order])]
        freed = torch.cumsum(c[order], 0)
        need = before - budget_c
        count = int(torch.searchsorted(freed, torch.tensor([need], dtype=torch.float64)).item()) + 1
        move = order[: min(count, order.numel())]
        flat_h, flat_n = mh.reshape(-1), mn.reshape(-1)
        n_heads = flat_h.numel()
        move_h, move_n = move[move < n_heads], move[move >= n_heads] - n_heads
        flat_h[move_h] = rule == "kwon"
        flat_n[move_n] = rule == "kwon"
        moved_h, moved_n = int(move_h.numel()), int(move_n.numel())
    after = constrained_cost(mh, mn, cost_head, cost_neuron, rule)
    diagnostics = dict(masks.diagnostics)
    diagnostics["repair"] = dict(cost_before=before, cost_after=after, budget=budget_c,
                                 units_moved=dict(heads=moved_h, neurons=moved_n))
    diagnostics["masked_cost"] = float(cost_head.double()[mh].sum() + cost_neuron.double()[mn].sum())
    return MaskSet(mh, mn, diagnostics)
