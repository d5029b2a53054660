"""Eq. 4 Taylor cost (``taylor: weights``) and per-example Fisher (``fisher: example``).

References: explicit per-weight autograd gradients summed unit by unit in Python loops; a loop
that runs every example alone through the model and differentiates its own loss.
"""
from __future__ import annotations

import pytest
import torch
from test_selection_model import adapted_model, make_batches

from floe.adapters.moe_lora import adapters_disabled
from floe.arch import decoder_layers, geometry
from floe.selection import MaskHooks, mask_gradients, weight_taylor
from floe.selection.determination import determine, repair_budget
from floe.selection.layer_score import layer_scores, rank_layers
from floe.selection.refinement import refine_paper

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _base(module):
    return getattr(module, "base", module)


def _eq4_reference(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ |θ ∂L/∂θ| per unit from autograd gradients of every weight, summed unit by unit."""
    cfg = geometry(model.config)
    heads, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    group = heads // kv
    _, layers = decoder_layers(model)
    mods = [dict(q=_base(l.self_attn.q_proj), k=_base(l.self_attn.k_proj), v=_base(l.self_attn.v_proj),
                 o=_base(l.self_attn.o_proj), gate=_base(l.mlp.gate_proj), up=_base(l.mlp.up_proj),
                 down=_base(l.mlp.down_proj)) for l in layers]
    params = [p for m in mods for lin in m.values() for p in lin.parameters()]
    before = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}, use_cache=False).loss
    grads = dict(zip(map(id, params), torch.autograd.grad(loss, params)))
    for p, b in zip(model.parameters(), before):
        p.requires_grad_(b)

    def t(p):
        return (p.detach().double() * grads[id(p)].double()).abs()

    n_neurons = mods[0]["gate"].weight.shape[0]
    ch = torch.zeros(len(mods), heads, dtype=torch.float64)
    cn = torch.zeros(len(mods), n_neurons, dtype=torch.float64)
    for layer, m in enumerate(mods):
        for j in range(n_neurons):
            total = t(m["gate"].weight)[j].sum() + t(m["up"].weight)[j].sum() + t(m["down"].weight)[:, j].sum()
            for lin in (m["gate"], m["up"]):
                if lin.bias is not None:
                    total += t(lin.bias)[j]
            cn[layer, j] = total
        for h in range(heads):
            rows, kv_rows = slice(h * d, (h + 1) * d), slice((h // group) * d, (h // group + 1) * d)
            total = t(m["q"].weight)[rows].sum() + t(m["o"].weight)[:, rows].sum()
            total += (t(m["k"].weight)[kv_rows].sum() + t(m["v"].weight)[kv_rows].sum()) / group
            if m["q"].bias is not None:
                total += t(m["q"].bias)[rows].sum()
                total += (t(m["k"].bias)[kv_rows].sum() + t(m["v"].bias)[kv_rows].sum()) / group
            ch[layer, h] = total
    return ch, cn


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases
def test_eq4_cost_equals_explicit_per_weight_autograd(arch):
    model = adapted_model(arch).double()
    batches = make_batches(2, batch=3)
    with adapters_disabled(model):
        got = weight_taylor(model, batches)
        refs = [_eq4_reference(model, b) for b in batches]
    for b, (ref_h, ref_n) in enumerate(refs):
        torch.testing.assert_close(got.head[b].double(), ref_h, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(got.neuron[b].double(), ref_n, rtol=1e-5, atol=1e-9)
    ch, cn = got.taylor()
    torch.testing.assert_close(ch.double(), sum(r[0] for r in refs), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(cn.double(), sum(r[1] for r in refs), rtol=1e-5, atol=1e-9)
    # the adapter is off: the cost is the base model's, whatever the adapter holds
    assert not any(p.grad is not None for p in model.parameters())


def test_eq4_cost_holds_at_most_one_weight_gradient_at_a_time():
    model = adapted_model("llama")
    for p in model.parameters():
        p.requires_grad_(True)  # a hook needs it; weight_taylor freezes what it does not score
    model.get_base_model().model.layers[1].mlp.up_proj.weight.requires_grad_(False)
    before = [p.requires_grad for p in model.parameters()]
    peak = [0]

    def count(_p):
        peak[0] = max(peak[0], sum(q.grad is not None for q in model.parameters()))

    # registered first, so it runs before weight_taylor's own hook frees the gradient
    handles = [p.register_post_accumulate_grad_hook(count) for p in model.parameters() if p.requires_grad]
    try:
        with adapters_disabled(model):
            weight_taylor(model, make_batches(2))
    finally:
        for h in handles:
            h.remove()
    assert peak[0] == 1
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == before  # restored


def _examples(batches):
    return [{k: v[i:i + 1] for k, v in b.items()} for b in batches for i in range(b["input_ids"].shape[0])]


def _rebatch(examples, size):
    return [{k: torch.cat([e[k] for e in examples[i:i + size]]) for k in examples[0]}
            for i in range(0, len(examples), size)]


def _single_example_gradients(model, examples):
    """Each example alone through the model, its own mean loss differentiated w.r.t. the masks."""
    rows_h, rows_n = [], []
    with MaskHooks(model, requires_grad=True) as hooks:
        for e in examples:
            loss = model(**e, use_cache=False).loss
            gh, gn = torch.autograd.grad(loss, [hooks.head, hooks.neuron])
            rows_h.append(gh)
            rows_n.append(gn)
    return torch.stack(rows_h), torch.stack(rows_n)


def test_per_example_fisher_equals_a_loop_over_single_examples_for_batch_sizes_1_2_4():
    model = adapted_model("llama").double()
    for p in model.parameters():
        p.requires_grad_(False)
    examples = _examples(make_batches(2, batch=4, seed=3))  # 8 examples, some padded
    ref_h, ref_n = _single_example_gradients(model, examples)
    ref_fh, ref_fn = (ref_h.double() ** 2).sum(0), (ref_n.double() ** 2).sum(0)
    for size in (1, 2, 4):
        got = mask_gradients(model, _rebatch(examples, size), per_example=True)
        assert got.unit == "example" and got.head.shape[0] == len(examples)
        torch.testing.assert_close(got.head.double(), ref_h.double(), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got.neuron.double(), ref_n.double(), rtol=1e-4, atol=1e-7)
        fh, fn = got.fisher()
        torch.testing.assert_close(fh.double(), ref_fh, rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(fn.double(), ref_fn, rtol=1e-4, atol=1e-10)
        # the per-example rows also give back the batch gradients exactly
        batch = mask_gradients(model, _rebatch(examples, size))
        torch.testing.assert_close(got.per_batch().head.double(), batch.head.double(), rtol=1e-4, atol=1e-8)


def _ranking(fisher_grads, ch, cn) -> list[int]:
    fh, fn = fisher_grads.fisher()
    masks = repair_budget(determine(fh, fn, ch, cn, 0.5), fh, fn, ch, cn, 0.5)
    masks, _ = refine_paper(masks, fh, fn, ch, cn, 0.5)
    return rank_layers(layer_scores(masks, None, None, float(ch.mean()), float(cn.mean())))


def test_example_fisher_ranking_does_not_depend_on_the_batch_size_and_batch_fisher_does():
    """Same Taylor costs, Fisher from batches of 1, 2 and 4: per-example Fisher gives the same masked
    set and ranking; the batch-mean Fisher (the option) changes with the batch size."""
    model = adapted_model("llama")
    examples = _examples(make_batches(3, batch=4, seed=5))
    with adapters_disabled(model):
        ch, cn = weight_taylor(model, _rebatch(examples, 4)).taylor()
    example_fisher, batch_fisher = [], []
    for size in (1, 2, 4):
        batches = _rebatch(examples, size)
        example_fisher.append(mask_gradients(model, batches, per_example=True))
        batch_fisher.append(mask_gradients(model, batches))
    rankings = [_ranking(g, ch, cn) for g in example_fisher]
    assert rankings[0] == rankings[1] == rankings[2]
    for g in example_fisher[1:]:
        torch.testing.assert_close(g.fisher()[1], example_fisher[0].fisher()[1], rtol=1e-4, atol=1e-12)
    f1, f4 = batch_fisher[0].fisher()[1], batch_fisher[2].fisher()[1]
    assert not torch.allclose(f1, f4, rtol=1e-2)  # squared batch means: depends on the batch size


def test_per_example_rows_subset_by_batch():
    model = adapted_model("llama")
    batches = make_batches(3, batch=2)
    grads = mask_gradients(model, batches, per_example=True)
    sub = grads.subset([2, 0])
    torch.testing.assert_close(sub.head, torch.cat([grads.head[4:6], grads.head[0:2]]))
    assert sub.batch_of.tolist() == [0, 0, 1, 1] and sub.num_batches == 2
