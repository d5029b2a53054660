"""Model side of FLoE layer selection: mask hooks, Fisher/Taylor gradients, tuning stage, API, CLI.

References are independent of the code under test: a hand-written LLaMA forward with explicit
mask variables, zeroed weight columns, weight-level gradients, least squares on contributions
materialised by forward passes, and per-batch gradient loops.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from floe.adapters.moe_lora import AdapterError, MoELoraConfig, adapters_disabled, apply_moe_lora, save_adapter
from floe.arch import decoder_layers, find_child
from floe.selection import (
    MaskSet,
    Selection,
    SelectionConfig,
    SelectionError,
    mask_gradients,
    mask_hooks,
    select_layers,
    tune_masks,
    unit_geometry,
)
from floe.selection.lstsq import ridge_solve
from floe.selection.stability import plot_stability, stability_analysis, subsample_indices

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_batches(n: int = 3, batch: int = 2, seq: int = 12, seed: int = 0, vocab: int = 320) -> list[dict]:
    """Random token batches; row 1 right-padded, the first 4 tokens are 'prompt' (label -100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        am = torch.ones_like(ids)
        am[-1, seq - 3:] = 0
        labels = ids.clone()
        labels[:, :4] = -100
        labels[am == 0] = -100
        out.append({"input_ids": ids, "attention_mask": am, "labels": labels})
    return out


def adapted_model(arch: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    """A tiny model with a full-layer MoE-LoRA whose B matrices are random (so the adapter matters)."""
    model = tiny_model(arch, seed=seed, **overrides)
    torch.manual_seed(seed + 1)
    model = apply_moe_lora(model, MoELoraConfig(r=4, num_experts=2, lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed + 2)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.data.normal_(0.0, 0.2, generator=g)
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------- reference forward

def reference_llama_loss(model, batch: dict, head_mask: torch.Tensor, neuron_mask: torch.Tensor) -> torch.Tensor:
    """Hand-written LLaMA forward (RMSNorm, RoPE, GQA, causal softmax attention, SwiGLU) with the
    mask variables multiplied into each head's output and each FFN neuron explicitly."""
    cfg = model.config
    inner = model.model
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    n_batch, seq = ids.shape
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    eps = cfg.rms_norm_eps
    dt = inner.embed_tokens.weight.dtype
    inv = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(seq, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).to(dt), torch.cat([ang.sin(), ang.sin()], -1).to(dt)

    def rms(x, w):
        return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rot(t):
        return torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1)

    allowed = torch.tril(torch.ones(seq, seq, dtype=torch.bool))[None, None] & am.bool()[:, None, None, :]
    x = inner.embed_tokens.weight[ids]
    for layer_idx, layer in enumerate(inner.layers):
        att, mlp = layer.self_attn, layer.mlp
        h = rms(x, layer.input_layernorm.weight)
        q = (h @ att.q_proj.weight.T).view(n_batch, seq, heads, hd).transpose(1, 2)
        k = (h @ att.k_proj.weight.T).view(n_batch, seq, kv_heads, hd).transpose(1, 2)
        v = (h @ att.v_proj.weight.T).view(n_batch, seq, kv_heads, hd).transpose(1, 2)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
        o = (probs @ v) * head_mask[layer_idx].to(dt)[None, :, None, None]  # explicit head masks
        x = x + o.transpose(1, 2).reshape(n_batch, seq, heads * hd) @ att.o_proj.weight.T
        h = rms(x, layer.post_attention_layernorm.weight)
        a = F.silu(h @ mlp.gate_proj.weight.T) * (h @ mlp.up_proj.weight.T) * neuron_mask[layer_idx].to(dt)
        x = x + a @ mlp.down_proj.weight.T
    logits = rms(x, inner.norm.weight) @ model.lm_head.weight.T
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def test_hook_gradients_equal_explicit_masks_in_a_handwritten_llama():
    model = tiny_model("llama").double()
    batches = make_batches(3)
    geo = unit_geometry(model)
    grads = mask_gradients(model, batches)
    for b, batch in enumerate(batches):
        hm = torch.ones(geo.num_layers, geo.num_heads, dtype=torch.float64, requires_grad=True)
        nm = torch.ones(geo.num_layers, geo.num_neurons, dtype=torch.float64, requires_grad=True)
        loss = reference_llama_loss(model, batch, hm, nm)
        gh, gn = torch.autograd.grad(loss, [hm, nm])
        assert torch.allclose(grads.loss[b].double(), loss.detach(), rtol=1e-6)
        torch.testing.assert_close(grads.head[b], gh.float(), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(grads.neuron[b], gn.float(), rtol=1e-4, atol=1e-7)
    fh, fn = grads.fisher()
    torch.testing.assert_close(fh, (grads.head.double() ** 2).sum(0).float())
    ch, cn = grads.taylor()
    torch.testing.assert_close(cn, grads.neuron.abs().sum(0), rtol=1e-6, atol=0)


def test_mask_gradient_is_the_taylor_term_of_the_output_projection_weights():
    """dL/dm_h = sum over head h's o_proj columns of W * dL/dW (the Taylor cost's identity)."""
    model = tiny_model("qwen2").double()
    batch = make_batches(1)[0]
    grads = mask_gradients(model, [batch])
    _, layers = decoder_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    o_w = [layer.self_attn.o_proj.weight for layer in layers]
    d_w = [layer.mlp.down_proj.weight for layer in layers]
    for w in o_w + d_w:
        w.requires_grad_(True)
    loss = model(**batch).loss
    gw = torch.autograd.grad(loss, o_w + d_w)
    hd = unit_geometry(model).head_dim
    for i, (w, g) in enumerate(zip(o_w, gw[: len(o_w)])):
        per_head = (w * g).sum(0).reshape(-1, hd).sum(1)
        torch.testing.assert_close(grads.head[0, i], per_head.float(), rtol=1e-5, atol=1e-8)
    for i, (w, g) in enumerate(zip(d_w, gw[len(o_w):])):
        torch.testing.assert_close(grads.neuron[0, i], (w * g).sum(0).float(), rtol=1e-5, atol=1e-8)


def test_all_ones_masks_leave_the_output_unchanged_and_hooks_are_removed(arch):
    model = tiny_model(arch)
    ids = make_batches(1)[0]["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with mask_hooks(model):
            inside = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert torch.equal(before, inside) and torch.equal(before, after)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_zero_head_mask_equals_zeroing_its_o_proj_input_columns(arch):
    model = tiny_model(arch)
    geo = unit_geometry(model)
    assert geo.num_heads == model.config.num_attention_heads != model.config.num_key_value_heads  # GQA
    if arch == "gemma":
        assert geo.head_dim == 16 != model.config.hidden_size // geo.num_heads  # Gemma-style head_dim
    ids = make_batches(1)[0]["input_ids"]
    layer, head, neuron = 2, 1, 5
    hm = torch.ones(geo.num_layers, geo.num_heads)
    hm[layer, head] = 0.0
    nm = torch.ones(geo.num_layers, geo.num_neurons)
    nm[layer, neuron] = 0.0
    with torch.no_grad(), mask_hooks(model, hm, nm):
        masked = model(input_ids=ids).logits
    _, layers = decoder_layers(model)
    with torch.no_grad():
        layers[layer].self_attn.o_proj.weight[:, head * geo.head_dim:(head + 1) * geo.head_dim] = 0.0
        layers[layer].mlp.down_proj.weight[:, neuron] = 0.0
        zeroed = model(input_ids=ids).logits
    torch.testing.assert_close(masked, zeroed, rtol=1e-5, atol=1e-6)


def test_query_heads_sharing_a_kv_head_get_separate_masks():
    """GQA: query heads 0 and 1 both read kv head 0 (4 query heads, 2 kv heads). Masking one of them
    must equal the hand-written forward (k and v repeated per query head) with only that head's
    output zeroed, and the two heads must give different losses there."""
    model = tiny_model("llama").double()
    batch = make_batches(1)[0]
    geo = unit_geometry(model)
    assert (geo.num_heads, model.config.num_key_value_heads) == (4, 2)
    losses = []
    for head in (0, 1):
        hm = torch.ones(geo.num_layers, geo.num_heads, dtype=torch.float64)
        hm[1, head] = 0.0
        with torch.no_grad(), mask_hooks(model, head=hm):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                              ignore_index=-100)  # in float64 (a model's own .loss is float32)
        with torch.no_grad():
            want = reference_llama_loss(model, batch, hm, torch.ones(geo.num_layers, geo.num_neurons,
                                                                     dtype=torch.float64))
        torch.testing.assert_close(got, want, rtol=1e-8, atol=0)
        losses.append(float(want))
    assert abs(losses[0] - losses[1]) > 1e-4 * abs(losses[0])


def test_neuron_mask_scales_the_pretrained_weights_not_the_adapter():
    """Eq. 2: m ⊙ θ + φ — with MoE-LoRA on down_proj, masking neuron j equals zeroing column j of
    the frozen base weight while the adapter still sees the whole activation."""
    model = adapted_model("llama")
    ids = make_batches(1)[0]["input_ids"]
    nm = torch.ones(4, 48)
    nm[0, :10] = 0.0
    with torch.no_grad(), mask_hooks(model, neuron=nm):
        masked = model(input_ids=ids).logits
    _, layers = decoder_layers(model)
    with torch.no_grad():
        layers[0].mlp.down_proj.base.weight[:, :10] = 0.0
        zeroed = model(input_ids=ids).logits
    torch.testing.assert_close(masked, zeroed, rtol=1e-5, atol=1e-6)


def test_taylor_on_the_base_model_ignores_the_adapter():
    model = adapted_model("llama")
    batches = make_batches(2)
    with adapters_disabled(model):
        with_adapter_off = mask_gradients(model, batches)
    plain = tiny_model("llama")  # same seed: the same base weights
    reference = mask_gradients(plain, batches)
    torch.testing.assert_close(with_adapter_off.head, reference.head)
    adapted = mask_gradients(model, batches)
    assert not torch.allclose(adapted.head, reference.head)


# ----------------------------------------------------------------------------- tuning stage

def _capture_points(model, batch, head_mask, neuron_mask, layer):
    """(attention residual output, layer output) of ``layer`` on real tokens, under the given masks."""
    _, layers = decoder_layers(model)
    got = {}
    h1 = layers[layer].post_attention_layernorm.register_forward_pre_hook(lambda m, a: got.__setitem__("attn", a[0]))
    h2 = layers[layer].register_forward_hook(lambda m, a, o: got.__setitem__("out", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad(), mask_hooks(model, head_mask, neuron_mask):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        h1.remove()
        h2.remove()
    real = batch["attention_mask"].bool()
    return got["attn"][real].double(), got["out"][real].double()


def _materialised_system(model, batches, base_h, base_n, layer, kind, free):
    """A (rows × free units) and b by forward passes: column u = O(m + e_u) − O(m), b = O_teacher − O(m)."""
    pick = 0 if kind == "attention" else 1
    cols, bs = [], []
    for batch in batches:
        teacher = _capture_points(model, batch, None, None, layer)[pick]
        at_binary = _capture_points(model, batch, base_h, base_n, layer)[pick]
        batch_cols = []
        for u in free.tolist():
            h, n = base_h.clone(), base_n.clone()
            (h if kind == "attention" else n)[layer, u] += 1.0
            batch_cols.append((_capture_points(model, batch, h, n, layer)[pick] - at_binary).reshape(-1))
        cols.append(torch.stack(batch_cols, 1))
        bs.append((teacher - at_binary).reshape(-1))
    return torch.cat(cols).numpy(), torch.cat(bs).numpy()


def test_tuning_normal_equations_equal_lstsq_on_materialised_contributions():
    model = adapted_model("llama", dtype=torch.float64)
    batches = make_batches(2)
    g = torch.Generator().manual_seed(3)
    masked_h = torch.zeros(4, 4, dtype=torch.bool)
    masked_h[0, 1] = masked_h[1, 2] = masked_h[1, 3] = True
    masked_n = torch.rand(4, 48, generator=g) < 0.5
    masks = MaskSet(masked_h, masked_n)
    # no |m| cap: this test checks the solve itself (the cap's fallback has its own test)
    result = tune_masks(model, batches, masks, damping=0.0, keep_systems=True, max_abs=float("inf"))
    systems = {(s.layer, s.kind): s for s in result.systems}
    binary_h, binary_n = masks.head_mask().double(), masks.neuron_mask().double()
    for layer in (0, 1):
        # student: layers before `layer` tuned; this layer binary, then tuned heads for the FFN
        base_h, base_n = binary_h.clone(), binary_n.clone()
        base_h[:layer], base_n[:layer] = result.head[:layer].double(), result.neuron[:layer].double()
        for kind in ("attention", "ffn"):
            if kind == "ffn":
                base_h[layer] = result.head[layer].double()
            s = systems[(layer, kind)]
            a, b = _materialised_system(model, batches, base_h, base_n, layer, kind, s.free)
            np.testing.assert_allclose(s.gram.numpy(), a.T @ a, rtol=1e-4, atol=1e-8)
            np.testing.assert_allclose(s.rhs.numpy(), a.T @ b, rtol=1e-4, atol=1e-8)
            assert s.sq_norm == pytest.approx(float(b @ b), rel=1e-6, abs=1e-10)
            assert s.tokens == sum(int(x["attention_mask"].sum()) for x in batches)
            delta_ls = np.linalg.lstsq(a, b, rcond=None)[0]
            tuned = (result.head if kind == "attention" else result.neuron)[layer].double().numpy()
            np.testing.assert_allclose(tuned[s.free.numpy()], 1.0 + delta_ls, rtol=1e-3, atol=1e-4)
            assert np.all(tuned[np.setdiff1d(np.arange(tuned.size), s.free.numpy())] == 0.0)
            np.testing.assert_allclose(ridge_solve(s.gram, s.rhs, 0.0).numpy(), delta_ls, rtol=1e-3, atol=1e-4)


def _student_masks(result, masks, layer: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of the student before a sublayer's solve: earlier layers tuned, this layer binary
    (for the FFN, this layer's heads already tuned)."""
    h, n = masks.head_mask().double(), masks.neuron_mask().double()
    h[:layer], n[:layer] = result.head[:layer].double(), result.neuron[:layer].double()
    if kind == "ffn":
        h[layer] = result.head[layer].double()
    return h, n


def test_tuning_error_is_the_true_reconstruction_error_and_the_step_is_damped_least_squares():
    """error_binary / error_tuned against forward passes of the masked model (not the solver's own
    quadratic), and the tuned masks against numpy's lstsq on the damped (augmented) system."""
    model = adapted_model("qwen2", dtype=torch.float64)
    batches = make_batches(3)
    g = torch.Generator().manual_seed(5)
    masks = MaskSet(torch.rand(4, 4, generator=g) < 0.3, torch.rand(4, 48, generator=g) < 0.5)
    damping = 1e-2
    result = tune_masks(model, batches, masks, damping=damping, max_abs=float("inf"), keep_systems=True)
    diags = {(d["layer"], d["kind"]): d for d in result.diagnostics}
    assert {d["status"] for d in result.diagnostics} == {"tuned"}
    for layer in range(4):
        for kind, pick in (("attention", 0), ("ffn", 1)):
            h, n = _student_masks(result, masks, layer, kind)
            h2, n2 = h.clone(), n.clone()
            (h2 if kind == "attention" else n2)[layer] = (result.head if kind == "attention" else result.neuron)[layer]
            errors = [0.0, 0.0]
            for batch in batches:
                teacher = _capture_points(model, batch, None, None, layer)[pick]
                for i, (hm, nm) in enumerate(((h, n), (h2, n2))):
                    errors[i] += float(((teacher - _capture_points(model, batch, hm, nm, layer)[pick]) ** 2).sum())
            d = diags[(layer, kind)]
            assert d["error_binary"] == pytest.approx(errors[0], rel=1e-7)
            assert d["error_tuned"] == pytest.approx(errors[1], rel=1e-6, abs=1e-12)
            assert errors[1] < errors[0]
    systems = {(s.layer, s.kind): s for s in result.systems}
    for kind in ("attention", "ffn"):  # min ||A δ − b||² + λ s ||δ||², s = mean diag(AᵀA), by lstsq
        s = systems[(0, kind)]
        a, b = _materialised_system(model, batches, *_student_masks(result, masks, 0, kind), 0, kind, s.free)
        ridge = math.sqrt(damping * float(np.mean(np.diag(a.T @ a))))
        delta = np.linalg.lstsq(np.vstack([a, ridge * np.eye(a.shape[1])]),
                                np.concatenate([b, np.zeros(a.shape[1])]), rcond=None)[0]
        tuned = (result.head if kind == "attention" else result.neuron)[0].double().numpy()
        np.testing.assert_allclose(tuned[s.free.numpy()], 1.0 + delta, rtol=1e-6, atol=1e-8)


def test_tuning_reruns_layers_without_the_cache_and_falls_back_on_huge_masks():
    model = adapted_model("qwen2")
    batches = make_batches(3)
    g = torch.Generator().manual_seed(5)
    masks = MaskSet(torch.rand(4, 4, generator=g) < 0.3, torch.rand(4, 48, generator=g) < 0.5)
    result = tune_masks(model, batches, masks, damping=1e-2, max_abs=float("inf"))
    assert torch.all(result.head[masks.masked_head] == 0) and torch.all(result.neuron[masks.masked_neuron] == 0)
    # cache_bytes=0: the layers are re-run instead of cached
    rerun = tune_masks(model, batches, masks, damping=1e-2, cache_bytes=0, max_abs=float("inf"))
    torch.testing.assert_close(rerun.head, result.head, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rerun.neuron, result.neuron, rtol=1e-4, atol=1e-5)
    strict = tune_masks(model, batches, masks, damping=1e-3, max_abs=1.0 + 1e-9)
    fallbacks = [d for d in strict.diagnostics if d["status"] == "fallback_binary"]
    assert fallbacks and all("max |m|" in d["reason"] for d in fallbacks)
    for d in fallbacks:
        values = (strict.head if d["kind"] == "attention" else strict.neuron)[d["layer"]]
        masked = (masks.masked_head if d["kind"] == "attention" else masks.masked_neuron)[d["layer"]]
        assert torch.equal(values, (~masked).float())


# ----------------------------------------------------------------------------- scorers

# ----------------------------------------------------------------------------- API

def _comparable(sel) -> dict:
    d = sel.to_dict()
    d.pop("timings")
    d["fingerprints"].pop("versions")
    return d


def test_end_to_end_selection_is_deterministic_for_a_seed(tmp_path):
    cfg = SelectionConfig(top_k=2, seed=7, stability=True, stability_fractions=[1.0, 0.5])
    first = select_layers(adapted_model("llama"), None, make_batches(4), cfg)
    second = select_layers(adapted_model("llama"), None, make_batches(4), cfg)
    assert _comparable(first) == _comparable(second)
    assert first.chosen == first.ranking[:2] and sorted(first.ranking) == [0, 1, 2, 3]
    assert len(first.untuned_scores) == 4 and abs(sum(first.fisher_share) - 1) < 1e-5
    assert set(first.timings) >= {"taylor", "fisher", "mask_search", "refinement", "tuning", "total"}
    assert first.stability["spearman"][0] == 1.0
    path = first.to_json(tmp_path / "selection.json")
    data = json.loads(path.read_text())
    assert data["chosen"] == first.chosen and data["fingerprints"]["data"]["num_batches"] == 2  # 2 held out
    assert [p.name for p in tmp_path.iterdir()] == ["selection.json"]  # no temp file left
    assert Selection.from_json(path).to_dict() == first.to_dict()


def test_adapter_folder_and_separate_models_give_the_same_selection(tmp_path):
    adapted = adapted_model("llama")
    save_adapter(adapted, tmp_path / "adapter")
    batches = make_batches(3)
    cfg = SelectionConfig(top_k=2, tune=False)
    from_module = select_layers(tiny_model("llama"), adapted, batches, cfg)
    from_folder = select_layers(tiny_model("llama"), tmp_path / "adapter", batches, cfg)
    assert from_module.ranking == from_folder.ranking
    np.testing.assert_allclose(from_module.scores, from_folder.scores, rtol=1e-6)


def _loss_grads(model, batch: dict, params: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``∂L/∂p`` of the batch's mean response loss for each of ``params`` (plain autograd)."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        return torch.autograd.grad(model(**batch).loss, params)
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _weights(layer, *names: str) -> list[torch.Tensor]:
    """The pre-trained weights of the named projections (inside the MoE-LoRA wrappers)."""
    out = []
    for name in names:
        module = find_child(layer, name)[1]
        out.append(getattr(module, "base", module).weight)
    return out


def _hand_layer_scores(scorer: str, model, batches: list[dict]) -> torch.Tensor:
    """The ablation scorers computed by hand, independently of the selection code: per-weight autograd
    on the pre-trained projections (a mask scales its unit's input columns of o_proj/down_proj, so
    ∂L/∂m_u = Σ over those columns of W ⊙ ∂L/∂W), one example or batch at a time."""
    _, layers = decoder_layers(model)
    hd = unit_geometry(model).head_dim
    out = torch.zeros(len(layers), dtype=torch.float64)
    if scorer == "fisher":  # Σ_u Σ_e (∂L_e/∂m_u)², per example (Eq. 8)
        weights = [w for layer in layers for w in _weights(layer, "o_proj", "down_proj")]
        for batch in batches:
            for e in range(batch["input_ids"].shape[0]):
                grads = _loss_grads(model, {k: v[e:e + 1] for k, v in batch.items()}, weights)
                for k in range(len(layers)):
                    (o, d), (go, gd) = weights[2 * k: 2 * k + 2], grads[2 * k: 2 * k + 2]
                    head, neuron = (o * go).sum(0).reshape(-1, hd).sum(1), (d * gd).sum(0)
                    out[k] += float((head ** 2).sum() + (neuron ** 2).sum())
    elif scorer == "taylor":  # Σ_b Σ_θ |θ ∂L_b/∂θ| over the layer's seven projections, base model (Eq. 4)
        names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        weights = [w for layer in layers for w in _weights(layer, *names)]
        with adapters_disabled(model):
            for batch in batches:
                grads = _loss_grads(model, batch, weights)
                for i, (w, gw) in enumerate(zip(weights, grads)):
                    out[i // len(names)] += float((w * gw).abs().sum())
    else:  # adapter parameters per layer: mean_b ||g_b|| (grad_norm); Σ_entries Var_b of the B gradients
        params = [[p for n, p in layer.named_parameters() if "lora_" in n or "router" in n] for layer in layers]
        flat = [p for ps in params for p in ps]
        rows = [_loss_grads(model, batch, flat) for batch in batches]
        start = 0
        for k, ps in enumerate(params):
            per_batch = [gs[start: start + len(ps)] for gs in rows]
            if scorer == "grad_norm":
                norms = [math.sqrt(sum(float((x.double() ** 2).sum()) for x in gs)) for gs in per_batch]
                out[k] = float(np.mean(norms))
            else:
                names = [n for n, _ in layers[k].named_parameters() if "lora_" in n or "router" in n]
                b_rows = [torch.cat([x.reshape(-1) for x, n in zip(gs, names) if ".lora_B." in n]) for gs in per_batch]
                out[k] = float(torch.stack(b_rows).double().var(0, unbiased=True).sum())
            start += len(ps)
    return out


@pytest.mark.parametrize("scorer,arch", [("fisher", "llama"), ("fisher", "gemma"), ("taylor", "llama"),
                                         ("taylor", "gemma"), ("grad_norm", "llama"), ("fim_variance", "qwen2")])
def test_ablation_scorers_equal_their_hand_computed_layer_scores(scorer, arch):
    model = adapted_model(arch, dtype=torch.float64)
    batches = make_batches(3)
    sel = select_layers(model, None, batches, SelectionConfig(scorer=scorer, top_k=2, heldout_batches=0))
    expected = _hand_layer_scores(scorer, model, batches)
    assert expected.min() > 0 and len(set(expected.tolist())) == 4  # a ranking without ties
    np.testing.assert_allclose(sel.scores, expected.numpy(), rtol=1e-5)
    assert sel.ranking == torch.argsort(expected, descending=True).tolist() and sel.chosen == sel.ranking[:2]
    if scorer in ("fisher", "taylor"):
        np.testing.assert_allclose(np.add(sel.head_importance, sel.neuron_importance), expected.numpy(), rtol=1e-5)


def test_random_scorer_is_a_seeded_permutation_whatever_the_model_and_data():
    model = adapted_model("llama")
    rankings = {}
    for seed in range(16):
        sel = select_layers(model, None, make_batches(1), SelectionConfig(scorer="random", seed=seed, top_k=2))
        assert sorted(sel.ranking) == [0, 1, 2, 3] and sel.chosen == sel.ranking[:2]
        rankings[seed] = sel.ranking
    other = select_layers(adapted_model("qwen2", seed=5), None, make_batches(2, seed=9),
                          SelectionConfig(scorer="random", seed=3, top_k=2))
    assert other.ranking == rankings[3]  # the same seed ranks the same, on another model and other data
    assert len({tuple(r) for r in rankings.values()}) >= 8  # seeds give different permutations
    assert {r[0] for r in rankings.values()} == {0, 1, 2, 3}  # and every layer comes first for some seed


def test_stability_subsamples_are_seeded_and_identical_rankings_correlate_perfectly(tmp_path):
    assert subsample_indices(10, 0.3, 0) == subsample_indices(10, 0.3, 0)
    assert len(subsample_indices(10, 0.7, 1)) == 7 and subsample_indices(10, 1.0, 5) == list(range(10))
    res = stability_analysis(lambda idx: [2, 0, 1, 3], 10, [1.0, 0.7, 0.3], seed=0, top_k=2)
    assert res.spearman == [1.0, 1.0, 1.0] and res.rank_min == res.rank_max == [1, 2, 0, 3]
    flipped = stability_analysis(lambda idx: [0, 1, 2, 3] if len(idx) == 10 else [3, 2, 1, 0], 10, [1.0, 0.5])
    assert flipped.spearman[1] == pytest.approx(-1.0) and flipped.kendall[1] == pytest.approx(-1.0)
    assert plot_stability(res, tmp_path / "s.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("budget", [0.0, 1.0, 1.5, -0.1, float("nan")])
def test_budget_outside_the_open_unit_interval_is_refused(budget):
    with pytest.raises(SelectionError, match="budget must be a fraction in \\(0, 1\\)"):
        SelectionConfig(budget=budget)


@pytest.mark.parametrize("top_k", [0, 5, 1.5, 0.0])
def test_top_k_out_of_range_is_refused(top_k):
    model = adapted_model("llama")
    with pytest.raises(SelectionError, match="top_k"):
        select_layers(model, None, make_batches(1), SelectionConfig(top_k=top_k))


def test_adapter_for_another_model_is_refused(tmp_path):
    other = tiny_model("llama", hidden_size=64, intermediate_size=96)
    other = apply_moe_lora(other, MoELoraConfig(r=4, num_experts=2))
    save_adapter(other, tmp_path / "adapter")
    with pytest.raises(AdapterError, match="do not fit|does not match"):
        select_layers(tiny_model("llama"), tmp_path / "adapter", make_batches(1), SelectionConfig())
    with pytest.raises(SelectionError, match="adapter folder .* does not exist"):
        select_layers(tiny_model("llama"), tmp_path / "missing", make_batches(1), SelectionConfig())
    with pytest.raises(SelectionError, match="needs the warm-up"):
        select_layers(tiny_model("llama"), None, make_batches(1), SelectionConfig())


def test_too_few_batches_and_batches_without_targets_are_refused():
    model = adapted_model("llama")
    with pytest.raises(SelectionError, match="only 2 batches but num_batches=5"):
        select_layers(model, None, make_batches(2), SelectionConfig(num_batches=5))
    with pytest.raises(SelectionError, match="no batches"):
        select_layers(model, None, [], SelectionConfig())
    bad = make_batches(2)
    bad[1]["labels"][:] = -100
    with pytest.raises(SelectionError, match="batch 1 has no response tokens"):
        select_layers(model, None, bad, SelectionConfig())
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in make_batches(1)]
    with pytest.raises(SelectionError, match="needs 'labels'"):
        select_layers(model, None, no_labels, SelectionConfig())


def test_nan_gradients_are_reported_with_the_stage_and_batch():
    model = adapted_model("llama")
    _, layers = decoder_layers(model)
    with torch.no_grad():
        layers[3].mlp.down_proj.lora_B["default"].weight[0, 0] = float("nan")  # adapter only: the base model is fine
    with pytest.raises(SelectionError, match="Fisher \\(adapted model\\): batch 0 gave a non-finite"):
        select_layers(model, None, make_batches(2), SelectionConfig())


# ----------------------------------------------------------------------------- CLI

def test_floe_select_cli_writes_everything_or_nothing(tmp_path, capsys):
    from train_helpers import save_tiny_model_folder, write_alpaca_jsonl

    from floe.cli import main

    model_dir = save_tiny_model_folder(tmp_path / "tiny")
    data = write_alpaca_jsonl(tmp_path / "d.jsonl", 12)
    base = tiny_model("llama")
    base = apply_moe_lora(base, MoELoraConfig(r=2, num_experts=2))
    save_adapter(base, tmp_path / "adapter")
    common = ["select", "--model", str(model_dir), "--adapter", str(tmp_path / "adapter"), "--data", str(data),
              "--max-length", "64", "--batch-size", "4", "--no-progress", "--set", "data.val_fraction=0",
              "--set", "data.test_fraction=0"]
    bad = tmp_path / "bad"
    assert main(common + ["--budget", "1.5", "--output", str(bad)]) == 2
    assert "budget must be a fraction" in capsys.readouterr().err and not bad.exists()
    assert main(common + ["--top-k", "9", "--output", str(bad)]) == 2
    assert "top_k=9 is out of range" in capsys.readouterr().err and not bad.exists()
    assert main(common + ["--num-batches", "50", "--output", str(bad)]) == 2
    assert "num_batches=50" in capsys.readouterr().err and not bad.exists()

    out = tmp_path / "out"
    assert main(common + ["--budget", "0.4", "--top-k", "2", "--stability", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "chosen layers (rank order)" in printed
    sel = json.loads((out / "selection.json").read_text())
    assert sel["config"]["budget"] == 0.4 and len(sel["chosen"]) == 2 and sel["stability"] is not None
    assert sorted(p.name for p in out.iterdir()) == ["layer_importance.png", "masks.safetensors",
                                                      "selection.json", "stability.png"]


def test_sandwich_norm_layers_use_the_projection_objective():
    """Gemma 2 normalises o_proj/down_proj outputs before the residual add, so out != x + o + d;
    the tuning stage detects it and reconstructs the projection outputs instead."""
    import transformers

    cfg = transformers.Gemma2Config(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    max_position_embeddings=128, pad_token_id=0, sliding_window=8)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model = apply_moe_lora(model, MoELoraConfig(r=4, num_experts=2))
    masks = MaskSet(torch.rand(4, 4) < 0.3, torch.rand(4, 48) < 0.5)
    result = tune_masks(model, make_batches(2), masks, damping=1e-2)
    assert {d["objective"] for d in result.diagnostics} == {"projection"}
    llama = tune_masks(adapted_model("llama"), make_batches(2), masks, damping=1e-2)
    assert {d["objective"] for d in llama.diagnostics} == {"residual"}
