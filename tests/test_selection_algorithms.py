"""Selection algorithms against independent references (brute force, naive loops, numpy).

Alg. 1 (determination), Alg. 2 (refinement), the ridge least squares of the tuning stage and
the layer score / ranking / top-k. Pure tensors, no model.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from floe.selection.determination import determine
from floe.selection.layer_score import fisher_share, layer_scores, rank_layers, top_k
from floe.selection.lstsq import RidgeSolveError, ridge_solve, solve_towards_one
from floe.selection.masks import MaskSet
from floe.selection.refine_block import block_objective, refine_block as refine

RULES = ("paper", "kwon", "fisher_top")


def _instance(seed: int, layers: int = 3, heads: int = 3, neurons: int = 5, batches: int = 6):
    gen = torch.Generator().manual_seed(seed)
    grads_head = torch.randn(batches, layers, heads, generator=gen)
    grads_neuron = 0.5 * torch.randn(batches, layers, neurons, generator=gen)
    # a shared per-batch component makes units of one block correlate
    grads_neuron += 0.5 * torch.randn(batches, layers, 1, generator=gen)
    cost_head = torch.rand(layers, heads, generator=gen) + 0.2
    cost_neuron = 0.4 * torch.rand(layers, neurons, generator=gen) + 0.05
    return grads_head, grads_neuron, cost_head, cost_neuron


def _fisher(grads: torch.Tensor) -> torch.Tensor:
    return (grads.double() ** 2).sum(0).float()


# ---------------------------------------------------------------------------- Algorithm 1


def _alg1_reference(fh, fn, ch, cn, gamma, rule):
    """Alg. 1 written as the paper's loop over n, in plain Python."""
    fh, fn = fh.reshape(-1).tolist(), fn.reshape(-1).tolist()
    ch, cn = ch.reshape(-1).tolist(), cn.reshape(-1).tolist()
    budget = gamma * (sum(ch) + sum(cn))
    t_h, t_f = sum(ch) / len(ch), sum(cn) / len(cn)
    largest = rule != "paper"
    heads = sorted(range(len(fh)), key=lambda i: (-fh[i] if largest else fh[i], i))
    neurons = sorted(range(len(fn)), key=lambda j: (-fn[j] if largest else fn[j], j))
    best = None
    for n in range(len(fh) + 1):
        if n * t_h > budget:
            continue
        f = min(max(0, math.floor((budget - n * t_h) / t_f)), len(fn))
        loss = sum(fh[i] for i in heads[:n]) + sum(fn[j] for j in neurons[:f])
        if best is None or (loss > best[0] if largest else loss < best[0]):
            best = (loss, n, f, set(heads[:n]), set(neurons[:f]))
    loss, n, f, s_h, s_f = best
    if rule == "kwon":  # S is the kept set
        s_h, s_f = set(range(len(fh))) - s_h, set(range(len(fn))) - s_f
    return loss, n, f, s_h, s_f


def _masked_indices(masks: MaskSet) -> tuple[set[int], set[int]]:
    return (set(torch.nonzero(masks.masked_head.reshape(-1)).reshape(-1).tolist()),
            set(torch.nonzero(masks.masked_neuron.reshape(-1)).reshape(-1).tolist()))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("gamma", [0.2, 0.5, 0.8])
def test_determination_equals_loop_over_head_counts(rule, gamma):
    for seed in range(8):
        gh, gn, ch, cn = _instance(seed, layers=4, heads=4, neurons=7)
        fh, fn = _fisher(gh), _fisher(gn)
        masks = determine(fh, fn, ch, cn, gamma, rule)
        loss, n, f, s_h, s_f = _alg1_reference(fh, fn, ch, cn, gamma, rule)
        assert (masks.diagnostics["n_heads"], masks.diagnostics["n_neurons"]) == (n, f)
        assert masks.diagnostics["objective"] == pytest.approx(loss, rel=1e-9)
        assert _masked_indices(masks) == (s_h, s_f)


@pytest.mark.parametrize("rule", RULES)
def test_determination_equals_brute_force_over_all_subsets(rule):
    """Among all sets of n heads and f(n) neurons (Alg. 1's candidates), none beats the result."""
    for seed in range(4):
        gh, gn, ch, cn = _instance(seed, layers=2, heads=2, neurons=3)
        fh, fn = _fisher(gh).reshape(-1).tolist(), _fisher(gn).reshape(-1).tolist()
        gamma = 0.45
        budget = gamma * float(ch.sum() + cn.sum())
        t_h, t_f = float(ch.mean()), float(cn.mean())
        best = None
        for s_h in itertools.product([0, 1], repeat=len(fh)):
            n = sum(s_h)
            if n * t_h > budget:
                continue
            f_n = min(max(0, math.floor((budget - n * t_h) / t_f)), len(fn))
            for s_f in itertools.product([0, 1], repeat=len(fn)):
                if sum(s_f) != f_n:
                    continue
                value = sum(a * b for a, b in zip(s_h, fh)) + sum(a * b for a, b in zip(s_f, fn))
                if best is None or (value < best if rule == "paper" else value > best):
                    best = value
        masks = determine(torch.tensor(fh).reshape(2, 2), torch.tensor(fn).reshape(2, 3),
                          ch, cn, gamma, rule)
        assert masks.diagnostics["objective"] == pytest.approx(best, rel=1e-6)
        in_s_h, in_s_f = masks.masked_head, masks.masked_neuron
        if rule == "kwon":
            in_s_h, in_s_f = ~in_s_h, ~in_s_f
        achieved = float(torch.tensor(fh)[in_s_h.reshape(-1)].sum()
                         + torch.tensor(fn)[in_s_f.reshape(-1)].sum())
        assert achieved == pytest.approx(best, rel=1e-6)
        # S is priced at the means and fits the budget
        assert in_s_h.sum() * t_h + in_s_f.sum() * t_f <= budget + 1e-9


def test_determination_prefers_fewest_heads_on_ties():
    ch, cn = torch.ones(2, 3), torch.ones(2, 4)
    masks = determine(torch.zeros(2, 3), torch.zeros(2, 4), ch, cn, 0.5, "paper")
    assert masks.diagnostics["n_heads"] == 0 and masks.diagnostics["n_neurons"] == 7


def test_determination_rejects_bad_input():
    fh, fn, ch, cn = torch.rand(2, 3), torch.rand(2, 4), torch.rand(2, 3), torch.rand(2, 4)
    for gamma in (0.0, 1.0, 1.5, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="gamma"):
            determine(fh, fn, ch, cn, gamma)
    with pytest.raises(ValueError, match="mask_rule"):
        determine(fh, fn, ch, cn, 0.5, "largest")
    with pytest.raises(ValueError, match="same shape"):
        determine(fh, fn, ch[:, :2], cn, 0.5)
    with pytest.raises(ValueError, match="negative"):
        determine(fh, fn, -ch, cn, 0.5)
    with pytest.raises(ValueError, match="NaN"):
        determine(fh * float("nan"), fn, ch, cn, 0.5)
    with pytest.raises(ValueError, match="zero"):
        determine(fh, fn, torch.zeros(2, 3), torch.zeros(2, 4), 0.5)


# ---------------------------------------------------------------------------- Algorithm 2


def _j_reference(masked_head, masked_neuron, grads_head, grads_neuron) -> float:
    """J(M) by loops: per block (layer x type) and batch, square the sum over members."""
    total = 0.0
    for masked, grads in ((masked_head, grads_head), (masked_neuron, grads_neuron)):
        g = grads.double().numpy()
        for layer in range(masked.shape[0]):
            members = [u for u in range(masked.shape[1]) if masked[layer, u]]
            for b in range(g.shape[0]):
                total += sum(g[b, layer, u] for u in members) ** 2
    return total


def _constrained_cost(masks, cost_head, cost_neuron, rule) -> float:
    masked = float(cost_head.double()[masks.masked_head].sum()
                   + cost_neuron.double()[masks.masked_neuron].sum())
    total = float(cost_head.double().sum() + cost_neuron.double().sum())
    return total - masked if rule == "kwon" else masked


@pytest.mark.parametrize("rule", RULES)
def test_refinement_keeps_budget_and_never_worsens_objective(rule):
    for seed in range(6):
        gh, gn, ch, cn = _instance(seed, layers=4, heads=4, neurons=12, batches=8)
        gamma = 0.5
        budget = gamma * float(ch.sum() + cn.sum())
        start = determine(_fisher(gh), _fisher(gn), ch, cn, gamma, rule)
        refined, diag = refine(start, gh, gn, ch, cn, gamma, rule, k_candidates=3)
        j0 = _j_reference(start.masked_head, start.masked_neuron, gh, gn)
        j1 = _j_reference(refined.masked_head, refined.masked_neuron, gh, gn)
        if rule == "fisher_top":
            assert j1 >= j0 - 1e-9 * j0
        else:
            assert j1 <= j0 + 1e-9 * j0
        assert diag["objective_before"] == pytest.approx(j0, rel=1e-9)
        assert diag["objective_after"] == pytest.approx(j1, rel=1e-9)
        # the logged per-swap gains add up to the total improvement
        gained = sum(s[-1] for s in diag["swaps"])
        assert gained == pytest.approx(abs(j1 - j0), rel=1e-6, abs=1e-9)
        c0 = _constrained_cost(start, ch, cn, rule)
        c1 = _constrained_cost(refined, ch, cn, rule)
        assert c1 <= max(budget, c0) * (1 + 1e-12)
        assert diag["cost_after"] == pytest.approx(c1, rel=1e-9)
        # swaps move one unit out and one in: the number of masked units is unchanged
        n_masked = lambda m: int(m.masked_head.sum() + m.masked_neuron.sum())  # noqa: E731
        assert n_masked(refined) == n_masked(start)
        assert diag["iterations"] == len(diag["swaps"])


def _naive_swap_search(start, gh, gn, ch, cn, gamma, rule, max_iters):
    """Alg. 2 by exhaustion: every (p out, q in) pair, J recomputed from scratch each time."""
    g = [gh.double().numpy(), gn.double().numpy()]
    c = [ch.double().numpy(), cn.double().numpy()]
    member = [start.masked_head.numpy().copy(), start.masked_neuron.numpy().copy()]
    total = c[0].sum() + c[1].sum()
    budget = gamma * total
    sense = 1.0 if rule == "fisher_top" else -1.0

    def j_of(m):
        return sum(float(((gt * mt[None]).sum(2) ** 2).sum()) for gt, mt in zip(g, m))

    def cost_of(m):
        masked = sum(float((ct * mt).sum()) for ct, mt in zip(c, m))
        return total - masked if rule == "kwon" else masked

    units = [(t, l, u) for t in range(2) for l in range(member[t].shape[0])
             for u in range(member[t].shape[1])]
    for _ in range(max_iters):
        j0, c0 = j_of(member), cost_of(member)
        best = None
        for p in units:
            if not member[p[0]][p[1:]]:
                continue
            for q in units:
                if member[q[0]][q[1:]]:
                    continue
                trial = [m.copy() for m in member]
                trial[p[0]][p[1:]], trial[q[0]][q[1:]] = False, True
                if cost_of(trial) > max(budget, c0) * (1 + 1e-12):
                    continue
                gain = sense * (j_of(trial) - j0)
                if gain > 1e-9 and (best is None or gain > best[0]):
                    best = (gain, trial)
        if best is None:
            break
        member = best[1]
    return member


@pytest.mark.parametrize("rule", RULES)
def test_refinement_follows_exhaustive_swap_search(rule):
    """With every unit a candidate, the incremental search makes the same swaps as a search
    that recomputes J from scratch for every pair."""
    for seed in range(3):
        gh, gn, ch, cn = _instance(seed, layers=3, heads=3, neurons=5, batches=6)
        start = determine(_fisher(gh), _fisher(gn), ch, cn, 0.5, rule)
        refined, _ = refine(start, gh, gn, ch, cn, 0.5, rule, k_candidates=100, max_iters=6)
        expected = _naive_swap_search(start, gh, gn, ch, cn, 0.5, rule, max_iters=6)
        assert np.array_equal(refined.masked_head.numpy(), expected[0])
        assert np.array_equal(refined.masked_neuron.numpy(), expected[1])


def test_refinement_swaps_across_types_and_layers():
    """At least one instance makes a head <-> neuron or cross-layer swap (refine: block)."""
    crossed = False
    for seed in range(10):
        gh, gn, ch, cn = _instance(seed, layers=4, heads=4, neurons=12, batches=8)
        start = determine(_fisher(gh), _fisher(gn), ch, cn, 0.5, "paper")
        _, diag = refine(start, gh, gn, ch, cn, 0.5, "paper")
        crossed |= any(s[0] != s[3] or s[1] != s[4] for s in diag["swaps"])
    assert crossed


def _brute_force_optimum(grads_head, grads_neuron, cost_head, cost_neuron, size, limit, rule):
    """Best J over all masked sets of the given size whose constrained cost is <= limit."""
    layers, heads = cost_head.shape
    neurons = cost_neuron.shape[1]
    units = [("h", l, u) for l in range(layers) for u in range(heads)] + \
            [("n", l, u) for l in range(layers) for u in range(neurons)]
    cost_head, cost_neuron = cost_head.double(), cost_neuron.double()
    total_cost = float(cost_head.sum() + cost_neuron.sum())
    best = None
    for combo in itertools.combinations(range(len(units)), size):
        mh = torch.zeros(layers, heads, dtype=torch.bool)
        mn = torch.zeros(layers, neurons, dtype=torch.bool)
        for i in combo:
            kind, l, u = units[i]
            (mh if kind == "h" else mn)[l, u] = True
        cost = float(cost_head[mh].sum() + cost_neuron[mn].sum())
        if (total_cost - cost if rule == "kwon" else cost) > limit * (1 + 1e-12):
            continue
        value = block_objective(mh, mn, grads_head, grads_neuron)
        if best is None or (value > best[0] if rule == "fisher_top" else value < best[0]):
            best = (value, mh, mn)
    return best


def _swap_one(mh, mn, out_unit, in_unit):
    mh, mn = mh.clone(), mn.clone()
    for (kind, l, u), value in ((out_unit, False), (in_unit, True)):
        (mh if kind == "h" else mn)[l, u] = value
    return mh, mn


@pytest.mark.parametrize("rule", RULES)
def test_refinement_reaches_optimum_one_swap_away(rule):
    """Started one valid swap away from the brute-force optimum, refinement lands on it."""
    checked = 0
    for seed in range(6):
        gh, gn, ch, cn = _instance(seed, layers=2, heads=2, neurons=3, batches=5)
        gamma = 0.45
        budget = gamma * float(ch.sum() + cn.sum())
        size = 4 if rule == "kwon" else 3
        best = _brute_force_optimum(gh, gn, ch, cn, size, budget, rule)
        if best is None:
            continue
        j_opt, mh, mn = best
        members = [("h", *map(int, i)) for i in torch.nonzero(mh)] + \
                  [("n", *map(int, i)) for i in torch.nonzero(mn)]
        others = [("h", *map(int, i)) for i in torch.nonzero(~mh)] + \
                 [("n", *map(int, i)) for i in torch.nonzero(~mn)]
        for out_unit, in_unit in itertools.product(members, others):
            sh, sn = _swap_one(mh, mn, out_unit, in_unit)
            start = MaskSet(sh, sn)
            if _constrained_cost(start, ch, cn, rule) > budget:
                continue
            refined, _ = refine(start, gh, gn, ch, cn, gamma, rule, k_candidates=100)
            j = block_objective(refined.masked_head, refined.masked_neuron, gh, gn)
            assert j == pytest.approx(j_opt, rel=1e-9), (seed, out_unit, in_unit)
            checked += 1
    assert checked > 20


def _match_rate(rule: str, seeds: range) -> tuple[float, int]:
    matches = total = 0
    for seed in seeds:
        gh, gn, ch, cn = _instance(seed, layers=2, heads=2, neurons=3, batches=5)
        gamma = 0.45
        budget = gamma * float(ch.sum() + cn.sum())
        start = determine(_fisher(gh), _fisher(gn), ch, cn, gamma, rule)
        c0 = _constrained_cost(start, ch, cn, rule)
        size = int(start.masked_head.sum() + start.masked_neuron.sum())
        best = _brute_force_optimum(gh, gn, ch, cn, size, max(budget, c0), rule)
        refined, _ = refine(start, gh, gn, ch, cn, gamma, rule, k_candidates=100)
        j = block_objective(refined.masked_head, refined.masked_neuron, gh, gn)
        # the brute force over the same feasible sets bounds the local search
        assert (j <= best[0] * (1 + 1e-9)) if rule == "fisher_top" else (j >= best[0] * (1 - 1e-9))
        matches += j == pytest.approx(best[0], rel=1e-9)
        total += 1
    return matches / total, total


@pytest.mark.parametrize("rule", RULES)
def test_refinement_is_bounded_by_brute_force_and_usually_matches_it(rule):
    """Local search from Alg. 1's set on random tiny instances: never beyond the brute-force
    optimum, and it finds that optimum on most instances (rate printed with ``-s``)."""
    rate, total = _match_rate(rule, range(30))
    print(f"refinement matched the brute-force optimum on {rate:.0%} of {total} ({rule})")
    # The 30 instances are seeded, so the rate is fixed: 87 % (paper, fisher_top) and 90 % (kwon), measured
    # 2026-12-03. A local search may stop short of the optimum (no improving single swap), so 100 % is not
    # owed; 0.8 (24 of 30) fails if it stops short on three more instances than today.
    assert rate >= 0.8


def test_refinement_rejects_bad_input():
    gh, gn, ch, cn = _instance(0)
    start = determine(_fisher(gh), _fisher(gn), ch, cn, 0.5)
    with pytest.raises(ValueError, match="grads_head"):
        refine(start, gh[:, :, :2], gn, ch, cn, 0.5)
    with pytest.raises(ValueError, match="batches"):
        refine(start, gh, gn[:3], ch, cn, 0.5)
    with pytest.raises(ValueError, match="k_candidates"):
        refine(start, gh, gn, ch, cn, 0.5, k_candidates=0)
    with pytest.raises(ValueError, match="max_iters"):
        refine(start, gh, gn, ch, cn, 0.5, max_iters=-1)
    with pytest.raises(ValueError, match="gamma"):
        refine(start, gh, gn, ch, cn, 2.0)


def test_refinement_zero_iterations_returns_start():
    gh, gn, ch, cn = _instance(1)
    start = determine(_fisher(gh), _fisher(gn), ch, cn, 0.5)
    refined, diag = refine(start, gh, gn, ch, cn, 0.5, max_iters=0)
    assert torch.equal(refined.masked_head, start.masked_head)
    assert torch.equal(refined.masked_neuron, start.masked_neuron)
    assert diag["iterations"] == 0 and diag["stopped"] == "max_iters"


# ---------------------------------------------------------------------------- ridge solve


def _system(seed: int, rows: int = 40, cols: int = 6):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(rows, cols))
    b = rng.normal(size=rows)
    return a, b


def test_ridge_solve_equals_numpy_lstsq_as_damping_vanishes():
    for seed in range(5):
        a, b = _system(seed)
        expected = np.linalg.lstsq(a, b, rcond=None)[0]
        gram, rhs = torch.from_numpy(a.T @ a), torch.from_numpy(a.T @ b)
        for damping in (0.0, 1e-10):
            np.testing.assert_allclose(ridge_solve(gram, rhs, damping).numpy(), expected,
                                       rtol=1e-6, atol=1e-8)
        # float32 input: float32 output, same answer to float32 precision
        out32 = ridge_solve(gram.float(), rhs.float(), 0.0)
        assert out32.dtype == torch.float32
        np.testing.assert_allclose(out32.numpy(), expected, rtol=1e-3, atol=1e-4)


def test_ridge_solve_equals_damped_closed_form():
    a, b = _system(7)
    gram, rhs = a.T @ a, a.T @ b
    damping = 0.3
    expected = np.linalg.solve(gram + damping * np.mean(np.diag(gram)) * np.eye(6), rhs)
    got = ridge_solve(torch.from_numpy(gram), torch.from_numpy(rhs), damping).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_ridge_solution_shrinks_monotonically_to_zero():
    a, b = _system(3)
    gram, rhs = torch.from_numpy(a.T @ a), torch.from_numpy(a.T @ b)
    norms = [float(ridge_solve(gram, rhs, d).norm())
             for d in (0.0, 1e-3, 1e-2, 0.1, 1.0, 10.0, 1e3, 1e6, 1e12)]
    assert all(later <= earlier * (1 + 1e-12) for earlier, later in zip(norms, norms[1:]))
    assert norms[-1] < 1e-10 * norms[0]


def test_solve_towards_one_fits_free_units_and_zeroes_masked():
    rng = np.random.default_rng(11)
    a = rng.normal(size=(50, 5))
    b = a @ np.array([1.2, 0.0, 0.7, 1.0, 0.0]) + 0.01 * rng.normal(size=50)
    free = torch.tensor([True, False, True, True, False])
    gram, atb = torch.from_numpy(a.T @ a), torch.from_numpy(a.T @ b)
    m = solve_towards_one(gram, atb, 0.0, free)
    expected = np.linalg.lstsq(a[:, free.numpy()], b, rcond=None)[0]
    np.testing.assert_allclose(m[free].numpy(), expected, rtol=1e-8)
    assert torch.all(m[~free] == 0)
    # heavy damping pulls the free values to 1, not to 0
    m_damped = solve_towards_one(gram, atb, 1e12, free)
    np.testing.assert_allclose(m_damped[free].numpy(), 1.0, atol=1e-8)


def test_ridge_solve_errors():
    singular = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    rhs = torch.tensor([1.0, 2.0], dtype=torch.float64)
    with pytest.raises(RidgeSolveError):
        ridge_solve(singular, rhs, 0.0)
    assert torch.isfinite(ridge_solve(singular, rhs, 1e-3)).all()  # damping fixes it
    with pytest.raises(torch.linalg.LinAlgError):  # RidgeSolveError is a LinAlgError
        ridge_solve(singular * float("nan"), rhs, 1.0)
    with pytest.raises(ValueError, match="damping"):
        ridge_solve(singular, rhs, -1.0)
    with pytest.raises(ValueError, match="square"):
        ridge_solve(torch.ones(2, 3), rhs, 1.0)
    with pytest.raises(ValueError, match="rhs"):
        ridge_solve(singular, torch.ones(3), 1.0)


# ---------------------------------------------------------------------------- layer score


def test_layer_scores_equal_naive_loop():
    gen = torch.Generator().manual_seed(5)
    layers, heads, neurons = 5, 4, 9
    masks = MaskSet(torch.rand(layers, heads, generator=gen) < 0.4,
                    torch.rand(layers, neurons, generator=gen) < 0.6)
    tuned_h = torch.randn(layers, heads, generator=gen) + 1
    tuned_n = torch.randn(layers, neurons, generator=gen) + 1
    t_h, t_f = 0.7, 0.05
    for th_values, tn_values in ((tuned_h, tuned_n), (None, None), (tuned_h, None)):
        got = layer_scores(masks, th_values, tn_values, t_h, t_f)
        for layer in range(layers):
            num = den = 0.0
            for u in range(heads):
                value = 1.0 if th_values is None else max(float(th_values[layer, u]), 0.0)
                num += 0.0 if masks.masked_head[layer, u] else t_h * value
                den += t_h
            for u in range(neurons):
                value = 1.0 if tn_values is None else max(float(tn_values[layer, u]), 0.0)
                num += 0.0 if masks.masked_neuron[layer, u] else t_f * value
                den += t_f
            assert float(got[layer]) == pytest.approx(1 - num / den, rel=1e-5, abs=1e-6)


def test_layer_score_of_binary_masks_is_cost_weighted_masked_fraction():
    masks = MaskSet(torch.tensor([[True, True], [False, False]]),
                    torch.tensor([[False, False, False], [True, True, True]]))
    scores = layer_scores(masks, None, None, 3.0, 1.0)
    torch.testing.assert_close(scores, torch.tensor([6 / 9, 3 / 9]))
    # a masked unit counts 0 whatever the tuning stage wrote there
    tuned = torch.full((2, 2), 5.0)
    torch.testing.assert_close(layer_scores(masks, tuned, None, 3.0, 1.0)[0], scores[0])


def test_rank_layers_descending_with_index_tiebreak():
    assert rank_layers(torch.tensor([0.5, 0.7, 0.5, 0.7, 0.1])) == [1, 3, 0, 2, 4]
    with pytest.raises(ValueError, match="NaN"):
        rank_layers(torch.tensor([0.5, float("nan")]))


def test_top_k_count_and_fraction():
    ranking = [3, 0, 2, 1, 5, 4, 7, 6]
    assert top_k(ranking, 3, 8) == [3, 0, 2]
    assert top_k(ranking, 0.25, 8) == [3, 0]
    assert top_k(ranking, 1.0, 8) == ranking
    assert top_k(ranking, 0.01, 8) == [3]  # at least one layer
    assert top_k(list(range(30)), 0.1, 30) == [0, 1, 2]  # 0.1 * 30 is 3, not 4
    assert top_k(ranking, np.int64(2), 8) == [3, 0]


@pytest.mark.parametrize("k", [0, 9, -1, 0.0, 1.5, -0.2, float("nan"), True, "3", None])
def test_top_k_rejects_out_of_range(k):
    with pytest.raises(ValueError, match="k"):
        top_k([3, 0, 2, 1, 5, 4, 7, 6], k, 8)


def test_top_k_rejects_ranking_that_is_not_a_permutation():
    with pytest.raises(ValueError, match="permutation"):
        top_k([0, 0, 1], 1, 3)
    with pytest.raises(ValueError, match="permutation"):
        top_k([0, 1], 1, 3)


def test_fisher_share_equals_naive_sum():
    gen = torch.Generator().manual_seed(2)
    fh, fn = torch.rand(4, 3, generator=gen), torch.rand(4, 6, generator=gen)
    share = fisher_share(fh, fn)
    total = sum(float(x) for x in fh.reshape(-1)) + sum(float(x) for x in fn.reshape(-1))
    for layer in range(4):
        expected = (sum(float(x) for x in fh[layer]) + sum(float(x) for x in fn[layer])) / total
        assert float(share[layer]) == pytest.approx(expected, rel=1e-6)
    assert float(share.sum()) == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="total Fisher"):
        fisher_share(torch.zeros(4, 3), torch.zeros(4, 6))
