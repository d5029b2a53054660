"""``refine: block``, an option beside Alg. 2 (:mod:`.refinement`): the earlier block-correlated search

    J(M) = sum_blocks sum_b ( sum_{u in M ∩ block} g[b, u] )^2,

blocks = (layer, type), the empirical Fisher of Eq. 7 kept within each block, minimised
(``paper``, ``kwon``) or maximised (``fisher_top``) by swaps of any two units of one type or of
different types in any layers. Estimated from a few gradient rows, J overfits them
(``docs/method.md``, "Refinement"). Candidates per type: the ``K`` members whose removal
improves J most and the ``K`` non-members whose addition improves it most; the best valid
positive-gain pair is applied until none is left or ``max_iters`` swaps were made. Gains are
incremental: with the per-block per-row sums ``s[b, block]`` kept up to date, toggling ``u``
changes J by ``F_u -/+ 2 sum_b s[b, block(u)] g[b, u]``, and a pair in the same block adds
``-2 <g_p, g_q>``. The gradients are held as a float64 copy.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from floe.selection.determination import budget_from_fraction, check_costs, check_rule
from floe.selection.masks import MaskSet
from floe.selection.refinement import REL_TOL, TYPES, check_cap, check_mask_shapes


class _Block:
    """Refinement state for one unit type over all layers.

    ``g``: ``(L, N, B)`` float64 gradients (a unit's batch vector is contiguous);
    ``member``: ``(L, N)`` current masked set;
    ``sums``: ``(L, B)`` per-layer per-batch sums over members; ``gain``: ``(L, N)``
    improvement ``sense * dJ`` if the unit alone changed membership. Per layer it also keeps
    the ``k`` best members to leave and non-members to join, so that after a swap only the
    touched layers are recomputed and the global candidates come from ``L * k`` entries.
    """

    def __init__(self, grads: torch.Tensor, member: torch.Tensor, cost: torch.Tensor,
                 sense: float, k: int) -> None:
        self.g = grads.permute(1, 2, 0).to(torch.float64).contiguous()
        self.member = member.clone()
        self.cost = cost.to(torch.float64)
        self.fisher = (self.g ** 2).sum(2)
        self.sense = sense
        n_layers, n_units, n_batches = self.g.shape
        self.n_units = n_units
        self.k = min(k, n_units)
        self.sums = torch.zeros(n_layers, n_batches, dtype=torch.float64)
        self.gain = torch.empty(n_layers, n_units, dtype=torch.float64)
        self.top = {pool: (torch.empty(n_layers, self.k, dtype=torch.float64),
                           torch.empty(n_layers, self.k, dtype=torch.long))
                    for pool in ("leave", "join")}
        for layer in range(n_layers):
            self.sums[layer] = self.member[layer].to(torch.float64) @ self.g[layer]
            self.refresh_layer(layer)

    def set_member(self, layer: int, unit: int, value: bool) -> None:
        """Move one unit in or out of the set; call :meth:`refresh_layer` afterwards."""
        if bool(self.member[layer, unit]) != value:
            self.member[layer, unit] = value
            self.sums[layer] += self.g[layer, unit] if value else -self.g[layer, unit]

    def refresh_layer(self, layer: int) -> None:
        """Recompute one layer's gains and candidates from its current sums."""
        g, member = self.g[layer], self.member[layer]
        proj = g @ self.sums[layer]
        # toggling u changes J by F_u - 2 proj_u (member leaves) or F_u + 2 proj_u (joins)
        self.gain[layer] = self.sense * (self.fisher[layer]
                                         + torch.where(member, -2.0, 2.0) * proj)
        for pool, in_pool in (("leave", member), ("join", ~member)):
            vals, idx = torch.topk(torch.where(in_pool, self.gain[layer], -torch.inf), self.k)
            self.top[pool][0][layer], self.top[pool][1][layer] = vals, idx

    def candidates(self, pool: str, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(layers, units, gains)`` of the ``k`` best units of ``pool`` over all layers."""
        vals, idx = self.top[pool]
        best = torch.topk(vals.reshape(-1), min(k, vals.numel()))
        keep = torch.isfinite(best.values)  # -inf: fewer than k units in the pool
        flat = best.indices[keep]
        return flat // self.k, idx.reshape(-1)[flat], best.values[keep]

    def exact_objective(self) -> float:
        """This type's part of J recomputed from the members (no accumulated rounding)."""
        sums = torch.einsum("ln,lnb->lb", self.member.to(torch.float64), self.g)
        return float((sums ** 2).sum())

    def vectors(self, layers: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """Gradient vectors of the given units, ``(n, B)``."""
        return self.g[layers, units]


def block_objective(masked_head: torch.Tensor, masked_neuron: torch.Tensor,
                    grads_head: torch.Tensor, grads_neuron: torch.Tensor) -> float:
    """``J(M) = sum_blocks sum_b (sum_{u in M ∩ block} g[b, u])^2`` for blocks = (layer, type)."""
    total = 0.0
    for member, grads in ((masked_head, grads_head), (masked_neuron, grads_neuron)):
        sums = (grads.double() * member.unsqueeze(0)).sum(2)  # (B, L)
        total += float((sums ** 2).sum())
    return total


def _check_inputs(masks: MaskSet, grads_head: torch.Tensor, grads_neuron: torch.Tensor, cost_head: torch.Tensor,
                  cost_neuron: torch.Tensor, rule: str, k_candidates: int, max_iters: int | None) -> None:
    check_rule(rule)
    check_costs(cost_head, cost_neuron)
    check_mask_shapes(masks, cost_head, cost_neuron)
    _check_grads(masks, grads_head, grads_neuron)
    if isinstance(k_candidates, bool) or not isinstance(k_candidates, int) or k_candidates < 1:
        raise ValueError(f"k_candidates must be an int >= 1, got {k_candidates!r}")
    check_cap("max_iters", max_iters)


def _check_grads(masks: MaskSet, grads_head: torch.Tensor, grads_neuron: torch.Tensor) -> None:
    for name, grads, member in (("grads_head", grads_head, masks.masked_head),
                                ("grads_neuron", grads_neuron, masks.masked_neuron)):
        if not isinstance(grads, torch.Tensor) or grads.dim() != 3 \
                or tuple(grads.shape[1:]) != tuple(member.shape):
            raise ValueError(f"{name} must have shape (batches, {member.shape[0]}, "
                             f"{member.shape[1]}) to match the masks; got "
                             f"{tuple(getattr(grads, 'shape', ()))}")
        if not bool(torch.isfinite(grads).all()):
            raise ValueError(f"{name} contains NaN or inf; recompute the mask gradients")
    if grads_head.shape[0] != grads_neuron.shape[0]:
        raise ValueError(f"grads_head has {grads_head.shape[0]} batches, grads_neuron "
                         f"{grads_neuron.shape[0]}; they must come from the same batches")


def _best_swap(blocks: list[_Block], k: int, cost_sign: float, slack: float,
               tol: float) -> tuple[float, int, int, int, int, int] | None:
    """The valid pair (p leaves, q joins) with the largest improvement, or ``None``.

    Returns ``(gain, type_p, layer_p, unit_p, type_q, layer_q, unit_q)`` (types index
    ``blocks``). The constrained cost changes by ``cost_sign * (c_q - c_p)`` (``+1``: cost of
    the masked set, ``-1``: of the kept set) and may grow by at most ``slack``.
    """
    leave = [(t, *b.candidates("leave", k)) for t, b in enumerate(blocks)]
    join = [(t, *b.candidates("join", k)) for t, b in enumerate(blocks)]
    best = None
    for tp, lay_p, unit_p, gain_p in leave:
        bp = blocks[tp]
        for tq, lay_q, unit_q, gain_q in join:
            if gain_p.numel() == 0 or gain_q.numel() == 0:
                continue
            bq = blocks[tq]
            gains = gain_p[:, None] + gain_q[None, :]
            if tp == tq:  # same (layer, type) block: the pair adds -2 <g_p, g_q> to dJ
                same = lay_p[:, None] == lay_q[None, :]
                if bool(same.any()):
                    cross = bp.vectors(lay_p, unit_p) @ bp.vectors(lay_q, unit_q).T
                    gains = gains + bp.sense * (-2.0) * cross * same
            dcost = cost_sign * (bq.cost[lay_q, unit_q][None, :]
                                 - bp.cost[lay_p, unit_p][:, None])
            gains = torch.where(dcost <= slack, gains, -torch.inf)
            flat_best = int(torch.argmax(gains))
            value = float(gains.reshape(-1)[flat_best])
            if value > tol and (best is None or value > best[0]):
                i, j = divmod(flat_best, gains.shape[1])
                best = (value, tp, int(lay_p[i]), int(unit_p[i]),
                        tq, int(lay_q[j]), int(unit_q[j]))
    return best


@contextlib.contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    """Run the swap loop single-threaded, restoring torch's thread count afterwards.

    Every op in the loop is small (a matrix-vector product over one layer, a few top-k, a
    (2K x 2K) pair table); measured on 2 shared cores, extra intra-op threads only added
    synchronisation stalls (about 2.5x slower per swap).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _set_members(blocks: list[_Block], changes: list[tuple[int, int, int, bool]]) -> None:
    """Apply ``(type, layer, unit, is_member)`` changes and refresh the touched layers."""
    for t, layer, unit, value in changes:
        blocks[t].set_member(layer, unit, value)
    for t, layer in {(t, layer) for t, layer, _, _ in changes}:
        blocks[t].refresh_layer(layer)


def refine_block(masks: MaskSet, grads_head: torch.Tensor, grads_neuron: torch.Tensor,
                 cost_head: torch.Tensor, cost_neuron: torch.Tensor, budget: float,
                 rule: str = "paper", k_candidates: int = 64,
                 max_iters: int | None = 1000) -> tuple[MaskSet, dict[str, Any]]:
    """``refine: block``: swap search on the block-correlated objective J (an option, not Alg. 2).

    ``masks``: the masked set from :func:`~floe.selection.determination.determine`;
    ``grads_head`` ``(B, L, H)`` / ``grads_neuron`` ``(B, L, F)``: per-batch mask gradients;
    ``cost_head`` / ``cost_neuron``: per-unit Taylor costs; ``budget``: the fraction ``gamma``
    in (0, 1) given to ``determine``; ``rule`` as there. ``k_candidates`` (>= 1) members and
    non-members of each type are tried per iteration; at most ``max_iters`` (>= 0; ``None``: no
    cap) swaps.

    Returns the refined masked set and a diagnostics dict (also attached to the set):
    ``rule``, ``sense`` (``"min"``/``"max"`` of J), ``constrained`` (``"masked"``/``"kept"``
    cost), ``budget`` (C), ``cost_before``/``cost_after`` (of the constrained set, per-unit
    costs), ``objective_before``/``objective_after`` (J), ``iterations`` (swaps made),
    ``stopped`` (``"no_improving_swap"``, ``"max_iters"`` or ``"nothing_to_swap"``),
    ``k_candidates`` and ``swaps``: ``[type_p, layer_p, unit_p, type_q, layer_q, unit_q, gain]``
    per swap (p left the masked set, q joined it; type ``"head"`` or ``"neuron"``).
    """
    _check_inputs(masks, grads_head, grads_neuron, cost_head, cost_neuron, rule, k_candidates, max_iters)
    cap = float("inf") if max_iters is None else max_iters
    budget_c = budget_from_fraction(budget, cost_head, cost_neuron)

    sense = 1.0 if rule == "fisher_top" else -1.0     # +1: maximise J, -1: minimise J
    cost_sign = -1.0 if rule == "kwon" else 1.0        # kwon constrains the kept set
    blocks = [_Block(grads_head, masks.masked_head, cost_head, sense, k_candidates),
              _Block(grads_neuron, masks.masked_neuron, cost_neuron, sense, k_candidates)]
    total_cost = float(sum(b.cost.sum() for b in blocks))
    tol = REL_TOL * max(float(sum(b.fisher.sum() for b in blocks)), 1e-300)
    cost_tol = REL_TOL * total_cost

    def constrained_cost() -> float:
        masked = float(sum((b.cost * b.member).sum() for b in blocks))
        return masked if cost_sign > 0 else total_cost - masked

    def objective() -> float:
        return float(sum((b.sums ** 2).sum() for b in blocks))

    cost_before, j_before = constrained_cost(), objective()
    j_now, cost_now = j_before, cost_before
    swaps: list[list[Any]] = []
    n_masked = sum(int(b.member.sum()) for b in blocks)
    stopped = "max_iters"
    if n_masked in (0, sum(b.member.numel() for b in blocks)):
        stopped = "nothing_to_swap"
    with _one_intra_op_thread():
        while stopped != "nothing_to_swap" and len(swaps) < cap:
            # valid: constrained cost <= C, or no growth if the start already overran C
            slack = max(budget_c, cost_now) - cost_now + cost_tol
            best = _best_swap(blocks, k_candidates, cost_sign, slack, tol)
            if best is None:
                stopped = "no_improving_swap"
                break
            _, tp, lp, up, tq, lq, uq = best
            _set_members(blocks, [(tp, lp, up, False), (tq, lq, uq, True)])
            j_new = objective()
            if sense * (j_new - j_now) <= tol:  # rounding ate the predicted gain: undo, stop
                _set_members(blocks, [(tq, lq, uq, False), (tp, lp, up, True)])
                stopped = "no_improving_swap"
                break
            swaps.append([TYPES[tp], lp, up, TYPES[tq], lq, uq, sense * (j_new - j_now)])
            j_now = j_new
            cost_now += cost_sign * float(blocks[tq].cost[lq, uq] - blocks[tp].cost[lp, up])

    diagnostics: dict[str, Any] = dict(
        method="block", rule=rule, sense="max" if sense > 0 else "min",
        constrained="kept" if cost_sign < 0 else "masked", budget=budget_c,
        cost_before=cost_before, cost_after=constrained_cost(),
        objective_before=j_before, objective_after=sum(b.exact_objective() for b in blocks),
        iterations=len(swaps), stopped=stopped, k_candidates=k_candidates, swaps=swaps,
    )
    refined = MaskSet(blocks[0].member.clone(), blocks[1].member.clone(), diagnostics)
    return refined, diagnostics
