"""MoE-LoRA adapter: maths against a naive per-expert loop, injection, save/load (PEFT folders).

The reference below is HydraLoRA's formula written independently as a loop over experts:

    y = W x + b + (alpha / r) · Σ_i w_i(x) · B_i (A · dropout(x)),   w = softmax(R x)
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import peft
import pytest
import torch
import torch.nn as nn
from conftest import tiny_config, tiny_model

import floe.adapters.moe_lora.model as moe_model
from floe.adapters.moe_lora import (
    AdapterError,
    MoELoraConfig,
    MoELoraLinear,
    MoELoraView,
    adapter_config,
    adapter_state_dict,
    adapters_disabled,
    apply_moe_lora,
    load_adapter,
    moe_lora_modules,
    router_aux_loss,
    save_adapter,
)
from floe.arch import trainable_parameter_count
from floe.config import to_dict

ADAPTER_PARTS = ("lora_A", "lora_B", "lora_router")


# ----------------------------------------------------------------------------- helpers


def reference_moe_lora(x, weight, bias, A, B, R, scaling, dropped_x):
    """Naive HydraLoRA forward: one product per expert, summed in a Python loop.

    ``dropped_x`` is dropout(x) (the adapter input); the router sees the clean ``x``.
    """
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    h = dropped_x @ A.T  # (..., r)
    num_experts = B.shape[0]
    if R is None:
        gates = torch.ones(*x.shape[:-1], 1, dtype=x.dtype)
    else:
        logits = (x @ R.T).double()
        e = (logits - logits.max(-1, keepdim=True).values).exp()  # stable softmax, float64
        gates = (e / e.sum(-1, keepdim=True)).to(x.dtype)
    for i in range(num_experts):
        y = y + scaling * gates[..., i : i + 1] * (h @ B[i].T)
    return y


def experts(b_cat: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[B_1 … B_M]`` (d_out × M·r, the layer's lora_B weight) as a stack (M, d_out, r)."""
    return b_cat.reshape(b_cat.shape[0], num_experts, -1).permute(1, 0, 2)


def reference_forward(self: MoELoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Drop-in forward for MoELoraLinear that uses the naive loop (for model-level checks)."""
    if self.disable_adapters:
        return self.base_layer(x)
    v = MoELoraView(self, self.active_adapters[0])
    dropped = self.lora_dropout[v.adapter](x)  # the same RNG draw as the fused path (first random op)
    R = None if v.router is None else v.router.weight
    return reference_moe_lora(x, v.base.weight, v.base.bias, v.lora_A.weight, experts(v.lora_B, v.num_experts), R,
                              v.scaling, dropped)


def wrap(base: nn.Linear, **kw) -> tuple[MoELoraLinear, MoELoraView]:
    layer = MoELoraLinear.wrap(base, **kw)
    return layer, MoELoraView(layer, "default")


def randomise_adapter(model: nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    """Give every B (and router) non-zero random values so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in moe_lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * scale)
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * scale)
            if m.router is not None:
                m.router.weight.copy_(torch.randn(m.router.weight.shape, generator=g) * scale)


def input_ids(vocab: int = 320, batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def is_adapter_param(name: str) -> bool:
    return any(f".{p}" in name for p in ADAPTER_PARTS)


def mlp_names(layers, targets=("gate_proj", "up_proj", "down_proj")) -> list[str]:
    return [f"model.layers.{i}.mlp.{t}" for i in layers for t in targets]


# ----------------------------------------------------------------------------- the layer's maths


@pytest.mark.parametrize("num_experts", [1, 2, 3, 5])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(3, 5), (7,), (2, 2, 3)], ids=["3d", "2d", "4d"])
def test_fused_layer_matches_per_expert_loop_in_values_and_gradients(num_experts, bias, lead):
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=bias)
    base.requires_grad_(False)
    layer, v = wrap(base, r=4, num_experts=num_experts, alpha=8.0, dropout=0.2)
    layer.train()
    with torch.no_grad():
        v.lora_B.normal_(0, 0.5)
    x = torch.randn(*lead, 24, requires_grad=True)
    grad_out = torch.randn(*lead, 40)

    torch.manual_seed(123)
    y = layer(x)
    y.backward(grad_out)

    x_ref = x.detach().clone().requires_grad_(True)
    A = v.lora_A.weight.detach().clone().requires_grad_(True)
    B = experts(v.lora_B.detach(), num_experts).clone().requires_grad_(True)
    R = None if v.router is None else v.router.weight.detach().clone().requires_grad_(True)
    torch.manual_seed(123)
    dropped = nn.functional.dropout(x_ref, 0.2, training=True)
    assert (dropped == 0).any(), "dropout must actually drop something for this test to mean anything"
    y_ref = reference_moe_lora(x_ref, base.weight, base.bias, A, B, R, 8.0 / 4, dropped)
    y_ref.backward(grad_out)

    assert not torch.allclose(y, base(x)), "non-zero B must change the output"
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v.lora_A.weight.grad, A.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(experts(v.lora_B.grad, num_experts), B.grad, atol=1e-5, rtol=1e-5)
    if num_experts == 1:
        assert v.router is None
    else:
        assert v.router.weight.shape == (num_experts, 24)
        torch.testing.assert_close(v.router.weight.grad, R.grad, atol=1e-5, rtol=1e-5)
        assert R.grad.abs().sum() > 0


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(3, 5), (7,), (2, 2, 3), (6, 1)], ids=["3d", "2d", "4d", "decode"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
def test_fused_layer_without_autograd_matches_the_loop(bias, lead, mode):
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=bias)
    layer, v = wrap(base, r=4, num_experts=3, alpha=8.0, dropout=0.2)
    layer.eval()
    layer.requires_grad_(False)
    with torch.no_grad():
        v.lora_B.normal_(0, 0.5)
    x = torch.randn(*lead, 24)
    expected = reference_moe_lora(x, base.weight, base.bias, v.lora_A.weight, experts(v.lora_B, 3),
                                  v.router.weight, 2.0, x)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, contextlib.nullcontext)
    with ctx():
        y = layer(x)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_layer_under_bf16_autocast_matches_the_float32_reference():
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=False)
    base.requires_grad_(False)
    layer, v = wrap(base, r=4, num_experts=3, alpha=8.0)
    layer.eval()
    with torch.no_grad():
        v.lora_B.normal_(0, 0.5)
    x = torch.randn(3, 5, 24)
    expected = reference_moe_lora(x, base.weight, None, v.lora_A.weight, experts(v.lora_B, 3), v.router.weight,
                                  2.0, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected.detach(), atol=0.1, rtol=0.05)
    torch.testing.assert_close(layer.delta(x) + base(x), expected, atol=1e-5, rtol=1e-5)


def test_layer_parameter_shapes_and_initialisation():
    base = nn.Linear(24, 40)
    layer, v = wrap(base, r=4, num_experts=3, alpha=8.0)
    # PEFT's LoRA layout per adapter name; B is the concatenation [B_1 … B_M] (d_out × M·r)
    assert set(layer.lora_A) == set(layer.lora_B) == set(layer.lora_router) == {"default"}
    assert v.lora_A.weight.shape == (4, 24) and layer.lora_B["default"].bias is None
    assert isinstance(v.lora_B, nn.Parameter) and v.lora_B.shape == (40, 3 * 4)
    assert v.router.weight.shape == (3, 24) and v.router.bias is None
    assert torch.count_nonzero(v.lora_B) == 0
    assert torch.count_nonzero(v.lora_A.weight) > 0 and torch.count_nonzero(v.router.weight) > 0
    x = torch.randn(2, 24)
    assert torch.equal(layer(x), base(x))


def test_fused_model_matches_per_expert_loop_in_logits_and_gradients(arch, monkeypatch):
    model = tiny_model(arch)
    model = apply_moe_lora(model, MoELoraConfig(r=4, num_experts=3, lora_alpha=8.0, lora_dropout=0.1,
                                        target_modules=("q_proj", "gate_proj", "down_proj")))
    randomise_adapter(model)
    model.train()
    ids = input_ids()

    def run():
        for p in model.parameters():
            p.grad = None
        torch.manual_seed(7)
        logits = model(input_ids=ids).logits
        logits.float().pow(2).mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fused_logits, fused_grads = run()
    monkeypatch.setattr(MoELoraLinear, "forward", reference_forward)
    ref_logits, ref_grads = run()
    torch.testing.assert_close(fused_logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert fused_grads.keys() == ref_grads.keys() and len(fused_grads) == 3 * 4 * 3
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)


# ----------------------------------------------------------------------------- injection


def test_zero_B_wrapped_model_logits_equal_base_exactly(arch):
    base = tiny_model(arch)
    ids = input_ids()
    expected = logits_of(base, ids)
    base = apply_moe_lora(base, MoELoraConfig(r=4, num_experts=3))
    wrapped = list(moe_lora_modules(base))
    assert len(wrapped) == 4 * 3
    assert not any(m.layer.training for m in moe_lora_modules(base).values()), "wrapping keeps the model's eval mode"
    assert torch.equal(logits_of(base, ids), expected)


def test_only_adapter_parameters_get_gradients_and_base_is_unchanged_by_a_step(arch):
    model = tiny_model(arch)
    cfg = MoELoraConfig(r=4, num_experts=3, layers_to_transform=[1, 2])
    apply_moe_lora(model, cfg)  # adapts the model in place, as get_peft_model does (its names stay the base's)
    wrapped = list(moe_lora_modules(model))
    randomise_adapter(model)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not is_adapter_param(n)}
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = input_ids()
    model(input_ids=ids, labels=ids).loss.backward()

    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    adapter = {n for n, _ in model.named_parameters() if is_adapter_param(n)}
    assert with_grad == adapter
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in adapter)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapter

    # Independent count: per wrapped module r·d_in (A) + M·d_out·r (B) + M·d_in (router).
    expected = 0
    for name in wrapped:
        lin = model.get_submodule(name).base
        expected += cfg.r * lin.in_features + cfg.num_experts * (lin.out_features * cfg.r + lin.in_features)
    assert trainable_parameter_count(model)[0] == expected

    adapter_before = {n: model.get_parameter(n).detach().clone() for n in adapter}
    opt.step()
    for n, before in base_before.items():
        assert torch.equal(model.get_parameter(n), before), f"frozen parameter {n} changed"
    assert all(not torch.equal(model.get_parameter(n), b) for n, b in adapter_before.items())


def test_layer_subset_wraps_exactly_the_named_layers(arch):
    model = tiny_model(arch)
    peft = apply_moe_lora(model, MoELoraConfig(r=2, num_experts=2, layers_to_transform=[3, 0],
                                                 target_modules=("up_proj", "o_proj")))
    wrapped = list(moe_lora_modules(peft))
    expected = [f"model.layers.{i}.{t}" for i in (0, 3) for t in ("self_attn.o_proj", "mlp.up_proj")]
    assert sorted(wrapped) == sorted(expected)
    assert sorted(moe_lora_modules(model)) == sorted(expected)
    for i in (1, 2):
        layer = model.model.layers[i]
        assert not any(isinstance(m, MoELoraLinear) for m in layer.modules())
    assert type(model.model.layers[0].mlp.gate_proj) is nn.Linear


def test_out_of_range_layer_is_an_error_naming_the_layer_count(arch):
    model = tiny_model(arch)
    with pytest.raises(AdapterError, match=r"\[4, 9\] out of range.*4 decoder layers \(0\.\.3\)"):
        model = apply_moe_lora(model, MoELoraConfig(layers_to_transform=[0, 4, 9]))
    assert not moe_lora_modules(model)


def test_unknown_target_is_an_error_listing_existing_modules(arch):
    model = tiny_model(arch)
    with pytest.raises(AdapterError) as err:
        model = apply_moe_lora(model, MoELoraConfig(target_modules=("gate_proj", "fc1")))
    msg = str(err.value)
    assert "'fc1'" in msg
    for existing in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert existing in msg
    assert not moe_lora_modules(model)


def test_applying_twice_is_refused():
    model = tiny_model("llama")
    peft = apply_moe_lora(model, MoELoraConfig(layers_to_transform=[0]))
    with pytest.raises(AdapterError, match="already has MoE-LoRA"):
        apply_moe_lora(model, MoELoraConfig(layers_to_transform=[1]))  # the base model, adapted in place
    with pytest.raises(AdapterError, match="takes the base model.*add_adapter"):
        apply_moe_lora(peft, MoELoraConfig(layers_to_transform=[1]))


def test_a_target_regex_is_matched_as_peft_does_and_one_matching_nothing_is_refused():
    model = apply_moe_lora(tiny_model(), MoELoraConfig(target_modules=r".*\.(q_proj|v_proj)"))
    assert sorted({n.split(".")[-1] for n in moe_lora_modules(model)}) == ["q_proj", "v_proj"]
    with pytest.raises(AdapterError, match="comma-separated string is one regex"):
        apply_moe_lora(tiny_model(), MoELoraConfig(target_modules="q_proj,v_proj"))
    with pytest.raises(AdapterError, match="is not one"):
        apply_moe_lora(tiny_model(), MoELoraConfig(target_modules="q_proj("))


def test_an_adapter_folder_saved_with_the_old_alias_keys_still_loads(tmp_path):
    """FLoE 0.1.0 wrote alpha/dropout/layers beside PEFT's lora_alpha/lora_dropout/layers_to_transform."""
    model = apply_moe_lora(tiny_model(), MoELoraConfig(r=2, num_experts=2, lora_alpha=6.0, layers_to_transform=[1]))
    randomise_adapter(model)
    ids = input_ids()
    expected = logits_of(model, ids)
    save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / moe_model.ADAPTER_CONFIG_NAME
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "alpha": 6.0, "dropout": 0.05, "layers": [1]}))
    loaded = load_adapter(tiny_model(), tmp_path / "a")
    assert adapter_config(loaded).lora_alpha == 6.0 and adapter_config(loaded).layers_to_transform == [1]
    assert torch.equal(logits_of(loaded, ids), expected)


@pytest.mark.parametrize("bad, field", [(dict(r=0), "r must"), (dict(num_experts=0), "num_experts"),
                                        (dict(lora_dropout=1.0), "lora_dropout"), (dict(lora_alpha=0), "lora_alpha"),
                                        (dict(target_modules=()), "target_modules"),
                                        (dict(layers_to_transform=[-1]), "layers_to_transform")])
def test_invalid_config_is_rejected_with_the_field_named(bad, field):
    with pytest.raises(ValueError, match=field):
        MoELoraConfig(**bad)


def test_adapters_disabled_gives_base_logits_and_restores_the_adapter(arch):
    model = tiny_model(arch)
    ids = input_ids()
    base_logits = logits_of(model, ids)
    model = apply_moe_lora(model, MoELoraConfig(r=4, num_experts=2))
    randomise_adapter(model)
    adapted = logits_of(model, ids)
    assert not torch.allclose(adapted, base_logits)
    with adapters_disabled(model):
        assert torch.equal(logits_of(model, ids), base_logits)
    assert torch.equal(logits_of(model, ids), adapted)


# ----------------------------------------------------------------------------- router loss


def _router_stack(num_experts: int) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    base.requires_grad_(False)
    layer = MoELoraLinear.wrap(base, r=2, num_experts=num_experts, alpha=2.0)
    layer.keep_router_probs = True
    return nn.Sequential(layer)


def test_router_aux_loss_is_one_for_uniform_and_larger_for_collapsed_router():
    M = 4
    model = _router_stack(M)
    x = torch.rand(50, 6) + 0.1  # positive inputs so a single router row dominates every token
    with torch.no_grad():
        model[0].lora_router['default'].weight.zero_()
    model(x)
    uniform = router_aux_loss(model)
    torch.testing.assert_close(uniform, torch.tensor(1.0))
    assert router_aux_loss(model) is None, "recorded probabilities are consumed by the loss"

    with torch.no_grad():
        model[0].lora_router['default'].weight.zero_()
        model[0].lora_router['default'].weight[2] = 10.0
    model(x)
    collapsed = router_aux_loss(model)
    assert collapsed > 1.5
    torch.testing.assert_close(collapsed, torch.tensor(float(M)), atol=1e-3, rtol=0)


def test_router_aux_loss_matches_switch_formula_and_reaches_the_router():
    model = _router_stack(3)
    x = torch.randn(40, 6)
    model(x)
    loss = router_aux_loss(model)
    probs = torch.softmax(x @ model[0].lora_router['default'].weight.detach().T, -1)
    frac = torch.stack([(probs.argmax(-1) == i).float().mean() for i in range(3)])
    torch.testing.assert_close(loss.detach(), 3 * (frac * probs.mean(0)).sum())
    loss.backward()
    assert model[0].lora_router['default'].weight.grad is not None and model[0].lora_router['default'].weight.grad.abs().sum() > 0


def test_router_probabilities_are_recorded_only_when_the_aux_loss_is_on():
    ids = input_ids()
    off = tiny_model("llama")
    off = apply_moe_lora(off, MoELoraConfig(num_experts=2))
    off(input_ids=ids)
    assert router_aux_loss(off) is None
    on = tiny_model("llama")
    on = apply_moe_lora(on, MoELoraConfig(num_experts=2, router_aux_loss_coef=0.01, layers_to_transform=[0, 2]))
    on(input_ids=ids)
    loss = router_aux_loss(on)
    assert loss.ndim == 0 and loss >= 1.0 - 1e-6


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip_into_a_fresh_model_gives_identical_logits(arch, tmp_path):
    model = tiny_model(arch)
    cfg = MoELoraConfig(r=4, num_experts=3, lora_alpha=12.0, layers_to_transform=[0, 3], target_modules=("v_proj", "down_proj"))
    model = apply_moe_lora(model, cfg)
    randomise_adapter(model)
    ids = input_ids()
    expected = logits_of(model, ids)
    out = tmp_path / "adapter"
    save_adapter(model, out)
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]  # PEFT's folder
    saved_cfg = json.loads((out / moe_model.ADAPTER_CONFIG_NAME).read_text())
    assert saved_cfg["peft_type"] == "FLOE_MOE_LORA"
    assert saved_cfg["r"] == 4 and saved_cfg["num_experts"] == 3 and saved_cfg["layers_to_transform"] == [0, 3]

    fresh = tiny_model(arch)  # same seed: same base weights, adapter not yet applied
    loaded = load_adapter(fresh, out)
    assert isinstance(loaded, peft.PeftModel) and loaded.get_base_model() is fresh
    section = MoELoraConfig.SECTION_FIELDS  # the hyperparameters (PEFT adds inference_mode, auto_mapping on load)
    assert {k: to_dict(adapter_config(loaded))[k] for k in section} == {k: to_dict(cfg)[k] for k in section}
    assert sorted(moe_lora_modules(fresh)) == sorted(moe_lora_modules(model))
    assert torch.equal(logits_of(fresh, ids), expected)
    assert not any(p.requires_grad for p in fresh.parameters()), "loaded adapter is frozen by default"

    again = tiny_model(arch)
    load_adapter(again, out, trainable=True)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == set(adapter_state_dict(again))


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    model = tiny_model("llama")
    model = apply_moe_lora(model, MoELoraConfig(r=2, num_experts=2, layers_to_transform=[1]))
    randomise_adapter(model, seed=1)
    out = tmp_path / "adapter"
    save_adapter(model, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    randomise_adapter(model, seed=2)
    real_save_file = peft.peft_model.safe_save_file  # what PeftModel.save_pretrained writes the weights with

    def failing_save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)  # a half-finished folder exists...
        Path(filename).write_bytes(b"truncated")
        raise OSError("disk full (simulated)")  # ...and then the write fails

    monkeypatch.setattr(peft.peft_model, "safe_save_file", failing_save_file)
    with pytest.raises(OSError, match="simulated"):
        save_adapter(model, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "the old adapter must be intact"
    assert sorted(os.listdir(tmp_path)) == ["adapter"], "no temporary folders may be left behind"

    with pytest.raises(OSError, match="simulated"):
        save_adapter(model, tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["adapter"], "a failed first save leaves nothing"

    monkeypatch.setattr(peft.peft_model, "safe_save_file", real_save_file)
    save_adapter(model, out)  # overwriting works and leaves no stale copies
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} != before


def test_load_into_different_size_model_is_an_error_and_leaves_the_model_untouched(arch, tmp_path):
    model = tiny_model(arch)
    model = apply_moe_lora(model, MoELoraConfig(r=4, num_experts=2))
    save_adapter(model, tmp_path / "all")
    bigger = tiny_model(arch, hidden_size=64, intermediate_size=96)
    ids = input_ids()
    bigger_logits = logits_of(bigger, ids)
    with pytest.raises(AdapterError, match=r"shapes that do not fit this model.*saved \(4, 32\) vs model \(4, 64\)"):
        load_adapter(bigger, tmp_path / "all")
    assert not moe_lora_modules(bigger), "a failed load must not leave the model wrapped"
    assert all(p.requires_grad for p in bigger.parameters()), "requires_grad flags are restored"
    assert torch.equal(logits_of(bigger, ids), bigger_logits)
    assert apply_moe_lora(bigger, MoELoraConfig(layers_to_transform=[0])), "the model can still be adapted afterwards"

    shallower = tiny_model(arch, num_hidden_layers=2)
    with pytest.raises(AdapterError, match=r"does not match.*unexpected \['base_model\.model\.model\.layers\.2\."):
        load_adapter(shallower, tmp_path / "all")  # saved for all 4 layers; this model has 2
    assert not moe_lora_modules(shallower)
    model2 = tiny_model(arch)
    model2 = apply_moe_lora(model2, MoELoraConfig(r=4, num_experts=2, layers_to_transform=[0, 3]))
    save_adapter(model2, tmp_path / "some")
    with pytest.raises(AdapterError, match=r"layer indices \[3\] out of range.*2 decoder layers"):
        load_adapter(shallower, tmp_path / "some")
    assert not moe_lora_modules(shallower)


def test_load_into_model_with_a_different_layer_set_is_an_error(tmp_path):
    model = tiny_model("llama")
    model = apply_moe_lora(model, MoELoraConfig(layers_to_transform=[2, 3]))
    save_adapter(model, tmp_path / "a")
    other = tiny_model("llama")
    other = apply_moe_lora(other, MoELoraConfig(layers_to_transform=[0, 1]))
    with pytest.raises(AdapterError, match=r"does not match the model's MoE-LoRA layers.*model\.layers\.0\.mlp.*"
                                           r"unexpected \['base_model\.model\.model\.layers\.2.*another model or layer set"):
        load_adapter(other, tmp_path / "a")


def test_load_into_model_with_different_scaling_is_an_error(tmp_path):
    model = tiny_model("llama")
    model = apply_moe_lora(model, MoELoraConfig(r=4, lora_alpha=8.0, layers_to_transform=[0]))
    save_adapter(model, tmp_path / "a")
    other = tiny_model("llama")
    other = apply_moe_lora(other, MoELoraConfig(r=4, lora_alpha=32.0, layers_to_transform=[0]))
    with pytest.raises(AdapterError, match="alpha"):
        load_adapter(other, tmp_path / "a")


def test_loading_a_folder_that_is_not_an_adapter_is_an_error(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(AdapterError, match="not an adapter folder: adapter_config.json not found"):
        load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    with pytest.raises(AdapterError, match="adapter_model.safetensors not found"):
        load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(AdapterError, match="IA3"):
        load_adapter(model, tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / moe_model.ADAPTER_CONFIG_NAME).write_text('{"r": 4, "colour": "red"}')
    with pytest.raises(AdapterError, match="colour"):
        load_adapter(model, bad)
    assert not moe_lora_modules(model)


# ----------------------------------------------------------------------------- M = 1 is plain PEFT LoRA


def test_one_expert_adapter_is_a_plain_peft_lora_adapter(arch, tmp_path):
    targets = ("q_proj", "v_proj", "down_proj")
    model = tiny_model(arch)
    model = apply_moe_lora(model, MoELoraConfig(r=4, num_experts=1, lora_alpha=12.0, lora_dropout=0.1, layers_to_transform=[1, 3],
                                                  target_modules=targets))
    wrapped = list(moe_lora_modules(model))
    randomise_adapter(model)
    model.eval()
    ids = input_ids()
    ours = logits_of(model, ids)
    save_adapter(model, tmp_path / "peft")

    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["layers_to_transform"] == [1, 3]
    assert cfg["lora_alpha"] == 12.0 and cfg["r"] == 4 and "num_experts" not in cfg
    # PEFT's own LoraConfig and LoRA layers load it (no FLoE class involved) with the same output
    loaded_cfg = peft.PeftConfig.from_pretrained(str(tmp_path / "peft"))
    assert type(loaded_cfg) is peft.LoraConfig

    base = tiny_model(arch)
    assert not torch.equal(logits_of(base, ids), ours)
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft"))
    peft_model.eval()
    from peft.tuners.lora import Linear as PeftLoraLinear

    peft_wrapped = [n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                    if isinstance(m, PeftLoraLinear)]
    assert sorted(peft_wrapped) == sorted(wrapped)
    torch.testing.assert_close(logits_of(peft_model, ids), ours, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- Mistral


def test_mistral_model_is_wrapped_matches_reference_and_round_trips(tmp_path, monkeypatch):
    assert tiny_config("mistral").model_type == "mistral"
    model = tiny_model("mistral")
    ids = input_ids()
    base_logits = logits_of(model, ids)
    model = apply_moe_lora(model, MoELoraConfig(r=4, num_experts=3, layers_to_transform=[0, 2]))
    wrapped = list(moe_lora_modules(model))
    assert sorted(wrapped) == sorted(mlp_names([0, 2]))
    assert torch.equal(logits_of(model, ids), base_logits)
    randomise_adapter(model)
    fused = logits_of(model, ids)
    save_adapter(model, tmp_path / "a")
    fresh = tiny_model("mistral")
    load_adapter(fresh, tmp_path / "a")
    assert torch.equal(logits_of(fresh, ids), fused)
    monkeypatch.setattr(MoELoraLinear, "forward", reference_forward)
    torch.testing.assert_close(logits_of(model, ids), fused, atol=1e-5, rtol=1e-5)
