"""Refinement stage (paper Alg. 2, Eq. 13-15): swaps that improve Alg. 1's mask under the budget.

``refine: paper`` (default, :func:`refine_paper`) is Alg. 2 as the paper writes it. Objective:
the **diagonal** Fisher of the masked set, ``Σ_{u ∈ M} F_u`` (Eq. 11-13). Candidates (Eq. 14):
within **one layer**, a masked head and an unmasked neuron, or a masked neuron and an unmasked
head, exchange their status (``p`` leaves the masked set, ``q`` joins it; Eq. 15's gain
``F_p − F_q``). A swap is valid when the budget still holds with the **per-unit** Taylor costs
(after the repair of :func:`~floe.selection.determination.repair_budget` the start fits; if a
start overruns ``C`` a swap may not increase the cost). The best valid improving swap over all
layers is applied, and the search repeats until no improving swap is left or an explicit cap
``max_swaps`` is reached (the stop reason says which). Every candidate pair is searched: per
layer and direction, the ``q`` side is sorted by cost once and a running minimum of its Fisher
gives each ``p`` its best valid partner, so one step is ``O(L · F log F)``, vectorised over layers.

Direction and budget per ``rule``: ``paper`` minimises the masked Fisher under ``cost(masked)
<= C``; ``kwon`` maximises the kept Fisher (on the diagonal: minimises the masked Fisher) under
``cost(kept) <= C``; ``fisher_top`` maximises the masked Fisher under ``cost(masked) <= C``.
A swap keeps the number of masked units, so it can only trade a head against neurons of
different cost and Fisher: head↔neuron swaps at different costs can improve Alg. 1's solution.

``refine: block``, the earlier block-correlated search, is an option in :mod:`.refine_block`.
"""
from __future__ import annotations

from typing import Any

import torch

from floe.selection.determination import budget_from_fraction, check_rule, check_scores
from floe.selection.masks import MaskSet

TYPES = ("head", "neuron")
REL_TOL = 1e-12  # gains / cost overruns below this fraction of the scale count as zero


def check_mask_shapes(masks: MaskSet, cost_head: torch.Tensor, cost_neuron: torch.Tensor) -> None:
    """The masks must have the shapes of the per-unit costs, ``(L, H)`` and ``(L, F)``."""
    if masks.masked_head.shape != cost_head.shape or masks.masked_neuron.shape != cost_neuron.shape:
        raise ValueError(f"mask shapes {tuple(masks.masked_head.shape)}, "
                         f"{tuple(masks.masked_neuron.shape)} do not match cost shapes "
                         f"{tuple(cost_head.shape)}, {tuple(cost_neuron.shape)}")


def check_cap(name: str, value: int | None) -> None:
    """A swap cap is ``None`` (no cap) or an int >= 0."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name} must be None (no cap) or an int >= 0, got {value!r}")


class _Partners:
    """For one unit type ``q`` (the joining side): per layer, units sorted by cost, and a running
    minimum of ``value_q`` over the non-members in that order, so that the best valid partner of
    any ``p`` is one binary search away. After a swap only the touched layer is recomputed.

    ``cheaper``: valid partners have ``c_q <= t`` (prefix minimum); else ``c_q >= t`` (suffix).
    """

    def __init__(self, value: torch.Tensor, cost: torch.Tensor, member: torch.Tensor, cheaper: bool):
        self.order = torch.argsort(cost, dim=1, stable=True)
        self.sorted_cost = torch.gather(cost, 1, self.order).contiguous()
        self.sorted_value = torch.gather(value, 1, self.order)
        self.cheaper = cheaper
        self.run = torch.empty_like(self.sorted_value)
        self.arg = torch.empty_like(self.order)
        for layer in range(value.shape[0]):
            self.refresh(layer, member[layer])

    def refresh(self, layer: int, member: torch.Tensor) -> None:
        vals = torch.where(member[self.order[layer]], torch.inf, self.sorted_value[layer])
        n = vals.numel()
        if self.cheaper:
            run, arg = torch.cummin(vals, dim=0)
        else:
            run, arg = torch.cummin(vals.flip(0), dim=0)
            run, arg = run.flip(0), (n - 1 - arg).flip(0)
        self.run[layer], self.arg[layer] = run, arg

    def best(self, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, units)`` of the best valid partner per layer and query (``threshold``: ``(L, Q)``);
        value ``inf`` where none qualifies."""
        n = self.run.shape[1]
        pos = torch.searchsorted(self.sorted_cost, threshold.contiguous(), right=self.cheaper)
        pos = pos - 1 if self.cheaper else pos
        ok = (pos >= 0) & (pos < n)
        pos = pos.clamp(0, n - 1)
        value = torch.where(ok, torch.gather(self.run, 1, pos), torch.inf)
        return value, torch.gather(self.order, 1, torch.gather(self.arg, 1, pos))


def refine_paper(masks: MaskSet, fisher_head: torch.Tensor, fisher_neuron: torch.Tensor,
                 cost_head: torch.Tensor, cost_neuron: torch.Tensor, budget: float,
                 rule: str = "paper", max_swaps: int | None = None) -> tuple[MaskSet, dict[str, Any]]:
    """Algorithm 2 (Eq. 13-15): best within-layer head↔neuron swap on the diagonal Fisher, repeated.

    ``masks``: the masked set (Alg. 1, repaired to fit the budget); ``fisher_*``: diagonal Fisher
    ``(L, H)`` / ``(L, F)``; ``cost_*``: per-unit Taylor costs; ``budget``: the fraction gamma;
    ``rule`` as in :func:`~floe.selection.determination.determine`; ``max_swaps``: ``None`` (search
    until no improving swap is left) or a cap >= 0.

    Returns the refined set and diagnostics (also attached to it): ``method`` ("paper"),
    ``rule``, ``sense`` (of the masked Fisher), ``constrained`` ("masked"/"kept" cost), ``budget``
    (C), ``cost_before``/``cost_after`` (per-unit, constrained set), ``objective_before``/
    ``objective_after`` (masked diagonal Fisher), ``iterations``, ``stopped``
    (``"no_improving_swap"``, ``"max_swaps"`` or ``"nothing_to_swap"``), ``max_swaps`` and
    ``swaps``: ``[type_p, layer, unit_p, type_q, unit_q, gain]`` (p left the masked set, q joined).
    """
    check_rule(rule)
    check_scores(fisher_head, fisher_neuron, cost_head, cost_neuron)
    check_mask_shapes(masks, cost_head, cost_neuron)
    check_cap("max_swaps", max_swaps)
    cap = float("inf") if max_swaps is None else max_swaps
    budget_c = budget_from_fraction(budget, cost_head, cost_neuron)
    s = -1.0 if rule == "fisher_top" else 1.0   # gain = s (F_p - F_q): +1 minimises the masked Fisher
    cost_sign = -1.0 if rule == "kwon" else 1.0  # kwon bounds the kept set's cost
    fisher = [fisher_head.double(), fisher_neuron.double()]
    cost = [cost_head.double(), cost_neuron.double()]
    member = [masks.masked_head.clone(), masks.masked_neuron.clone()]
    total_cost = float(cost[0].sum() + cost[1].sum())
    tol = REL_TOL * max(float(fisher[0].sum() + fisher[1].sum()), 1e-300)
    cost_tol = REL_TOL * total_cost

    def constrained() -> float:
        masked = float(cost[0][member[0]].sum() + cost[1][member[1]].sum())
        return masked if cost_sign > 0 else total_cost - masked

    def objective() -> float:
        return float(fisher[0][member[0]].sum() + fisher[1][member[1]].sum())

    cost_before, obj_before = constrained(), objective()
    cost_now = cost_before
    swaps: list[list[Any]] = []
    stopped = "max_swaps"
    if not any(bool(m.any()) for m in member) or all(bool(m.all()) for m in member):
        stopped = "nothing_to_swap"
    partners = [_Partners(s * fisher[t], cost[t], member[t], cost_sign > 0) for t in (0, 1)]
    while stopped != "nothing_to_swap" and len(swaps) < cap:
        slack = max(budget_c, cost_now) - cost_now + cost_tol
        best = None
        for tp, tq in ((0, 1), (1, 0)):  # (head leaves, neuron joins), (neuron leaves, head joins)
            # q valid: cost_sign (c_q - c_p) <= slack, i.e. c_q <= c_p + slack (masked cost bounded)
            partner, unit_q = partners[tq].best(cost[tp] + cost_sign * slack)
            gain = torch.where(member[tp], s * fisher[tp] - partner, -torch.inf)
            flat = int(torch.argmax(gain))
            value = float(gain.reshape(-1)[flat])
            if value > tol and (best is None or value > best[0]):
                layer, up = divmod(flat, gain.shape[1])
                best = (value, tp, layer, up, tq, int(unit_q[layer, up]))
        if best is None:
            stopped = "no_improving_swap"
            break
        value, tp, layer, up, tq, uq = best
        member[tp][layer, up] = False
        member[tq][layer, uq] = True
        for t in (0, 1):
            partners[t].refresh(layer, member[t][layer])
        cost_now += cost_sign * float(cost[tq][layer, uq] - cost[tp][layer, up])
        swaps.append([TYPES[tp], layer, up, TYPES[tq], uq, value])

    diagnostics: dict[str, Any] = dict(
        method="paper", rule=rule, sense="max" if s < 0 else "min",
        constrained="kept" if cost_sign < 0 else "masked", budget=budget_c,
        cost_before=cost_before, cost_after=constrained(), objective_before=obj_before,
        objective_after=objective(), iterations=len(swaps), stopped=stopped, max_swaps=max_swaps,
        swaps=swaps,
    )
    return MaskSet(member[0], member[1], diagnostics), diagnostics
