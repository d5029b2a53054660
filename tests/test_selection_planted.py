"""Ranking direction on a model whose layer importance is planted by construction.

Layers 1 and 2 are made redundant (their ``o_proj`` and ``down_proj`` weights scaled by 1e-3 and
frozen while the model is pre-trained on a permutation-chain task, so every head and neuron there can be
masked at almost no loss); layers 0 and 3 learn the task and are essential. A MoE-LoRA adapter
is then warmed up on the same task. ``docs/method.md``
("Determination"): under ``paper`` and ``kwon`` a layer ranks high when much of it can be masked
(the adapted model's loss is least sensitive to its pre-trained units), so the redundant layers
rank first; under ``fisher_top`` the layers the adapted model depends on most rank first.
"""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from floe.adapters.moe_lora import MoELoraConfig, apply_moe_lora
from floe.arch import decoder_layers
from floe.selection import SelectionConfig, select_layers

REDUNDANT, ESSENTIAL = {1, 2}, {0, 3}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


_PERM = torch.randperm(32, generator=torch.Generator().manual_seed(0)) + 3


def _chain_batches(n: int, batch: int = 4, length: int = 12, seed: int = 0) -> list[dict]:
    """Sequences over 32 tokens that follow a fixed permutation (x_{i+1} = perm[x_i]); the second
    half is the response (labelled)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        cols = [torch.randint(3, 35, (batch,), generator=g)]
        for _ in range(length - 1):
            cols.append(_PERM[cols[-1] - 3])
        ids = torch.stack(cols, 1)
        labels = ids.clone()
        labels[:, : length // 2] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _fit(model, params, steps: int, lr: float, seed: int) -> None:
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    for batch in _chain_batches(steps, seed=seed):
        model(**batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def planted_model():
    """Pre-train on the permutation-chain task with the redundant layers' output weights scaled to ~0 and frozen
    (so the essential layers learn the task), then warm up a MoE-LoRA adapter on it."""
    model = tiny_model("llama", seed=3)
    _, layers = decoder_layers(model)
    frozen = []
    with torch.no_grad():
        for k in REDUNDANT:
            for linear in (layers[k].self_attn.o_proj, layers[k].mlp.down_proj):
                linear.weight.mul_(1e-3)
                frozen.append(linear.weight)
    _fit(model, [p for p in model.parameters() if all(p is not f for f in frozen)], 150, 1e-2, seed=7)
    torch.manual_seed(4)
    model = apply_moe_lora(model, MoELoraConfig(r=4, num_experts=2, lora_dropout=0.0))
    _fit(model, [p for p in model.parameters() if p.requires_grad], 30, 3e-3, seed=1)  # warm-up
    return model


@pytest.fixture(scope="module")
def model():
    return planted_model()


@pytest.mark.parametrize("rule", ["paper", "kwon"])
def test_paper_and_kwon_rank_the_redundant_layers_first(model, rule):
    cfg = SelectionConfig(top_k=2, mask_rule=rule, heldout_batches=1)
    sel = select_layers(model, None, _chain_batches(5, seed=2), cfg)
    assert set(sel.chosen) == REDUNDANT, (rule, sel.ranking, sel.scores)
    for stage in ("determination", "refinement", "tuning"):
        assert set(sel.diagnostics[stage]["ranking"][:2]) == REDUNDANT, (rule, stage)
    for k in REDUNDANT:  # masked whole, at (almost) no loss
        assert sel.heads_masked[k] == 4 and sel.neurons_masked[k] == 48


def test_fisher_top_ranks_an_essential_layer_first_and_masks_nothing_redundant(model):
    """fisher_top masks the units with the largest Fisher: here the budget is spent inside layer 0
    (the layer the task depends on most), nothing in the redundant layers is masked. Layer 3, also
    essential, gets no masked unit at gamma 0.5, so it does not rank second (measured: ranking
    [0, 1, 2, 3], layers 1-3 tied at an untuned score of 0, and tuned masks above 1 push layer 3's
    tuned score below 0)."""
    cfg = SelectionConfig(top_k=2, mask_rule="fisher_top", heldout_batches=1)
    sel = select_layers(model, None, _chain_batches(5, seed=2), cfg)
    assert sel.ranking[0] in ESSENTIAL
    for stage in ("determination", "refinement", "tuning"):
        assert sel.diagnostics[stage]["ranking"][0] in ESSENTIAL, stage
    for k in REDUNDANT:
        assert sel.heads_masked[k] == 0 and sel.neurons_masked[k] == 0


def test_masking_the_redundant_layers_costs_almost_nothing_and_the_essential_ones_a_lot(model):
    """The planted importance is real: the true masked loss says so."""
    from floe.selection import masked_losses

    batches = _chain_batches(3, seed=2)
    base = float(masked_losses(model, batches).mean())
    for layers, low in ((REDUNDANT, True), (ESSENTIAL, False)):
        head = torch.ones(4, 4)
        neuron = torch.ones(4, 48)
        for k in layers:
            head[k], neuron[k] = 0, 0
        increase = float(masked_losses(model, batches, head, neuron).mean()) - base
        assert (abs(increase) < 1e-4) if low else (increase > 0.05), (layers, increase)
