"""The budget holds with per-unit costs after every stage, and each stage's diagnostics are true.

References: a plain loop for the greedy repair; per-unit costs summed from the returned masks;
the masked model's loss from a copy whose masked units' weights are zeroed by hand.
"""
from __future__ import annotations

import copy

import pytest
import torch
from test_selection_model import adapted_model, make_batches

from floe.adapters.moe_lora import adapters_disabled
from floe.arch import decoder_layers
from floe.selection import SelectionConfig, select_layers, weight_taylor
from floe.selection.determination import RULES, determine, repair_budget
from floe.selection.masks import MaskSet
from floe.selection.refine_block import refine_block
from floe.selection.refinement import refine_paper

REL = 1e-9


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _instance(seed: int, layers: int = 4, heads: int = 3, neurons: int = 8, rows: int = 5):
    g = torch.Generator().manual_seed(seed)
    gh = torch.randn(rows, layers, heads, generator=g, dtype=torch.float64) * (torch.rand(layers, heads, generator=g, dtype=torch.float64) + 0.2)
    gn = 0.3 * torch.randn(rows, layers, neurons, generator=g, dtype=torch.float64)
    ch = 0.2 + 3 * torch.rand(layers, heads, generator=g, dtype=torch.float64)  # spread: means misprice units
    cn = 0.01 + torch.rand(layers, neurons, generator=g, dtype=torch.float64) ** 3
    return gh, gn, ch, cn


def _cost(mh, mn, ch, cn, rule) -> float:
    masked = float(ch[mh].sum() + cn[mn].sum())
    return float(ch.sum() + cn.sum()) - masked if rule == "kwon" else masked


def _repair_reference(masks: MaskSet, fh, fn, ch, cn, gamma, rule) -> MaskSet:
    """One unit at a time: move the worst Fisher-per-cost unit until the constrained cost fits."""
    limit = gamma * float(ch.sum() + cn.sum())
    mh, mn = masks.masked_head.clone(), masks.masked_neuron.clone()
    while _cost(mh, mn, ch, cn, rule) > limit:
        best = None
        for kind, member, f, c in (("h", mh, fh, ch), ("n", mn, fn, cn)):
            for layer in range(member.shape[0]):
                for u in range(member.shape[1]):
                    movable = (not member[layer, u]) if rule == "kwon" else bool(member[layer, u])
                    if not movable or c[layer, u] <= 0:
                        continue
                    ratio = float(f[layer, u] / c[layer, u])
                    bad = ratio if rule == "paper" else -ratio
                    if best is None or bad > best[0]:
                        best = (bad, kind, layer, u)
        _, kind, layer, u = best
        (mh if kind == "h" else mn)[layer, u] = rule == "kwon"
    return MaskSet(mh, mn)


@pytest.mark.parametrize("rule", RULES)
def test_repair_fits_the_budget_by_moving_the_worst_fisher_per_cost_first(rule):
    repaired = 0
    for seed in range(25):
        gh, gn, ch, cn = _instance(seed)
        fh, fn = (gh ** 2).sum(0), (gn ** 2).sum(0)
        for gamma in (0.3, 0.5, 0.7):
            start = determine(fh, fn, ch, cn, gamma, rule)
            got = repair_budget(start, fh, fn, ch, cn, gamma, rule)
            ref = _repair_reference(start, fh, fn, ch, cn, gamma, rule)
            assert torch.equal(got.masked_head, ref.masked_head) and torch.equal(got.masked_neuron, ref.masked_neuron)
            limit = gamma * float(ch.sum() + cn.sum())
            rep = got.diagnostics["repair"]
            assert rep["cost_after"] <= limit * (1 + REL) and rep["budget"] == pytest.approx(limit)
            assert rep["cost_before"] == pytest.approx(_cost(start.masked_head, start.masked_neuron, ch, cn, rule))
            if rep["cost_before"] > limit:
                repaired += 1
            else:  # a set that fits is left alone
                assert torch.equal(got.masked_head, start.masked_head)
                assert torch.equal(got.masked_neuron, start.masked_neuron)
    assert repaired >= 5  # the mean-cost pricing of Alg. 1 does overrun C on these instances


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("method", ["paper", "block"])
def test_every_stage_fits_the_budget_with_per_unit_costs(rule, method):
    for seed in range(15):
        gh, gn, ch, cn = _instance(seed)
        fh, fn = (gh ** 2).sum(0), (gn ** 2).sum(0)
        limit = 0.5 * float(ch.sum() + cn.sum())
        masks = repair_budget(determine(fh, fn, ch, cn, 0.5, rule), fh, fn, ch, cn, 0.5, rule)
        assert _cost(masks.masked_head, masks.masked_neuron, ch, cn, rule) <= limit * (1 + REL)
        if method == "paper":
            refined, _ = refine_paper(masks, fh, fn, ch, cn, 0.5, rule)
        else:
            refined, _ = refine_block(masks, gh, gn, ch, cn, 0.5, rule, k_candidates=4, max_iters=None)
        assert _cost(refined.masked_head, refined.masked_neuron, ch, cn, rule) <= limit * (1 + REL)


def _zeroed_copy(model, masked_head: torch.Tensor, masked_neuron: torch.Tensor):
    """The masked model by hand: zero the o_proj input columns of masked heads and the down_proj
    columns of masked neurons in the pre-trained weights (the adapter is untouched)."""
    out = copy.deepcopy(model)
    d = out.config.head_dim if getattr(out.config, "head_dim", None) else out.config.hidden_size // out.config.num_attention_heads
    _, layers = decoder_layers(out)
    with torch.no_grad():
        for k, layer in enumerate(layers):
            o = getattr(layer.self_attn.o_proj, "base", layer.self_attn.o_proj)
            down = getattr(layer.mlp.down_proj, "base", layer.mlp.down_proj)
            for h in torch.nonzero(masked_head[k]).reshape(-1).tolist():
                o.weight[:, h * d:(h + 1) * d] = 0
            down.weight[:, masked_neuron[k]] = 0
    return out


@pytest.mark.parametrize("rule", RULES)
def test_select_layers_reports_every_stage_within_budget_with_the_true_masked_loss(rule):
    model = adapted_model("llama")
    batches = make_batches(6, batch=2, seed=4)
    sel = select_layers(model, None, batches, SelectionConfig(top_k=2, mask_rule=rule, heldout_batches=2))
    diag = sel.diagnostics
    assert diag["data"] == {"num_batches": 4, "heldout_batches": 2}
    with adapters_disabled(model):
        ch, cn = weight_taylor(model, batches[:4]).taylor()
    limit = 0.5 * float(ch.double().sum() + cn.double().sum())
    for stage in ("determination", "refinement", "tuning"):
        d = diag[stage]
        assert d["fits_budget"] and d["cost"] <= d["budget"] * (1 + REL)
        assert d["budget"] == pytest.approx(limit, rel=1e-5)
        assert sorted(d["ranking"]) == [0, 1, 2, 3]
        assert set(d["loss_increase"]) == {"selection", "heldout"}
    assert diag["determination"]["rank_correlation"] is None
    assert diag["tuning"]["ranking"] == sel.ranking
    # the final masks' per-unit cost, summed independently
    mh, mn = sel.masks["masked_head"], sel.masks["masked_neuron"]
    assert _cost(mh, mn, ch.double(), cn.double(), rule) <= limit * (1 + 1e-5)
    # the true loss increase of the refined binary masks, against weights zeroed by hand
    zeroed = _zeroed_copy(model, mh, mn)

    def mean_loss(m, data):
        with torch.no_grad():
            return sum(float(m(**b, use_cache=False).loss) for b in data) / len(data)

    for key, data in (("selection", batches[:4]), ("heldout", batches[4:])):
        expected = mean_loss(zeroed, data) - mean_loss(model, data)
        assert diag["refinement"]["loss_increase"][key] == pytest.approx(expected, abs=1e-5)


def test_negative_tuned_masks_are_counted_and_clamped_in_the_score():
    from floe.selection.layer_score import layer_scores

    masks = MaskSet(torch.tensor([[True, False]]), torch.tensor([[False, False, True]]))
    tuned_h, tuned_n = torch.tensor([[0.0, -0.5]]), torch.tensor([[2.0, -1.0, 0.0]])
    clamped = layer_scores(masks, tuned_h, tuned_n, 2.0, 1.0)
    by_hand = 1 - (2.0 * 0.0 + 1.0 * (2.0 + 0.0)) / (2 * 2.0 + 3 * 1.0)
    assert float(clamped[0]) == pytest.approx(by_hand)
    model = adapted_model("llama")
    sel = select_layers(model, None, make_batches(4), SelectionConfig(top_k=2, heldout_batches=1))
    tuned = torch.cat([sel.masks["tuned_head"][~sel.masks["masked_head"]],
                       sel.masks["tuned_neuron"][~sel.masks["masked_neuron"]]])
    assert sel.diagnostics["tuning"]["negative_masks_clamped"] == int((tuned < 0).sum())
