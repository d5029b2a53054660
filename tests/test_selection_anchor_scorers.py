"""Layer selectors from published anchors (LoRA-drop, ablation, Spectrum, CKA, AlphaLoRA) and the
cost-aware ranking, each against an independent computation on the tiny random models: numpy
formulas on parameters and activations read by the test itself, adapters switched off by zeroing
their B matrices in a copy of the model, and naive python loops.
"""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import tiny_model
from test_selection_model import adapted_model, make_batches

from floe.adapters.moe_lora import MoELoraLinear
from floe.arch import decoder_layers, find_child
from floe.selection import SCORERS, Selection, SelectionConfig, SelectionError, select_layers
from floe.selection.cli import SELECT_FLAGS
from floe.selection.layer_score import cost_adjusted_scores, rank_layers
from floe.selection.outputs import write_outputs
from floe.selection.spectral_scorers import alpha_expert_pattern, alpha_hill, spectrum_snr

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ANCHORS = ("lora_drop", "ablation", "ablation_greedy", "spectrum", "cka", "alpha")
TARGETS = ("gate_proj", "up_proj", "down_proj")  # MoELoraConfig's default target modules


def _select(model, batches, scorer: str, **kw) -> Selection:
    return select_layers(model, None, batches, SelectionConfig(scorer=scorer, top_k=2, **kw))


def _mean_loss(model, batches) -> float:
    with torch.no_grad():
        return float(np.mean([float(model(**b).loss) for b in batches]))


def _adapters_zeroed(model, layers) -> nn.Module:
    """A copy of ``model`` whose adapters in ``layers`` add nothing (every expert B set to 0)."""
    out = copy.deepcopy(model)
    for k, layer in enumerate(decoder_layers(out)[1]):
        if k in layers:
            for m in layer.modules():
                if isinstance(m, MoELoraLinear):
                    m.lora_B["default"].weight.data.zero_()
    return out


# ----------------------------------------------------------------------------- LoRA-drop

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_drop_equals_numpy_adapter_outputs(arch):
    model = adapted_model(arch, dtype=torch.float64)
    batches = make_batches(3)
    inputs: dict[str, list[np.ndarray]] = {}
    modules = {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, MoELoraLinear)}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.setdefault(n, []).append(a[0].numpy()))
             for n, m in modules.items()]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    prefix = decoder_layers(model)[0]
    g = np.zeros(4)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    for name, m in modules.items():
        a, b_cat = m.lora_A["default"].weight.detach().numpy(), m.lora_B["default"].weight.detach().numpy()
        router, r, s = m.lora_router["default"].weight.detach().numpy(), m.r["default"], m.scaling["default"]
        for x, batch in zip(inputs[name], batches):
            for e, t in zip(*np.nonzero(batch["attention_mask"].numpy())):  # every non-padding token
                v = x[e, t]
                logits = router @ v
                w = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
                delta = s * sum(w[i] * b_cat[:, i * r:(i + 1) * r] @ (a @ v) for i in range(len(w)))
                g[int(name[len(prefix) + 1:].split(".")[0])] += float(delta @ delta) / tokens
    sel = _select(model, batches, "lora_drop", heldout_batches=0)
    np.testing.assert_allclose(sel.scores, g / g.sum(), rtol=1e-6)
    np.testing.assert_allclose(sel.diagnostics["lora_drop"]["mean_sq_output"], g, rtol=1e-6)
    assert abs(sum(sel.scores) - 1) < 1e-6 and sel.ranking == list(np.argsort(-g, kind="stable"))
    assert sel.timings["adapter_outputs"] > 0


# ----------------------------------------------------------------------------- ablation

@pytest.mark.parametrize("heldout", [0, 1])
def test_ablation_is_the_loss_increase_with_one_layers_adapter_zeroed(heldout):
    model = adapted_model("llama", dtype=torch.float64)
    batches = make_batches(3)
    data = batches[-1:] if heldout else batches  # held-out batches when there are any
    base = _mean_loss(model, data)
    expected = [_mean_loss(_adapters_zeroed(model, {k}), data) - base for k in range(4)]
    sel = _select(model, batches, "ablation", heldout_batches=heldout)
    np.testing.assert_allclose(sel.scores, expected, rtol=1e-5, atol=1e-7)
    assert sel.diagnostics["ablation"]["data"] == ("heldout" if heldout else "selection")
    assert sel.ranking == rank_layers(torch.tensor(expected)) and sel.timings["ablation"] > 0


def test_ablation_greedy_equals_a_naive_forward_selection_loop():
    model = adapted_model("qwen2", dtype=torch.float64)
    batches = make_batches(3)
    chosen: list[int] = []
    for _ in range(2):  # k = top_k = 2 rounds over the candidates
        losses = {k: _mean_loss(_adapters_zeroed(model, set(range(4)) - {*chosen, k}), batches[-1:])
                  for k in range(4) if k not in chosen}
        chosen.append(min(losses, key=lambda k: (losses[k], k)))
    rest = sorted((k for k in losses if k not in chosen), key=lambda k: (losses[k], k))
    sel = _select(model, batches, "ablation_greedy", heldout_batches=1)
    diag = sel.diagnostics["ablation_greedy"]
    assert sel.ranking == chosen + rest and sel.chosen == chosen and diag["passes"] == 4 + 3
    np.testing.assert_allclose([float(v) for v in diag["rounds"][-1]["losses"].values()],
                               [losses[k] for k in sorted(losses)], rtol=1e-6)


# ----------------------------------------------------------------------------- Spectrum, AlphaLoRA

def _numpy_snr(w: np.ndarray) -> float:
    s = np.linalg.svd(w, compute_uv=False)
    bound = (np.quantile(s, 0.75) - np.quantile(s, 0.25)) / 1.349 * (1 + math.sqrt(min(w.shape) / max(w.shape)))
    return float(s[s > bound].sum() / s[s <= bound].sum())


def _loop_alpha(w: np.ndarray) -> float:
    """Hill estimator over the top half of the eigenvalues of the smaller Gram matrix (= σ², no zeros)."""
    lam = sorted(np.linalg.eigvalsh(w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T))
    n = len(lam)
    k = n // 2
    return 1 + k / sum(math.log(lam[n - i] / lam[n - k - 1]) for i in range(1, k + 1))


def _base_weights(model) -> list[list[np.ndarray]]:
    return [[find_child(layer, t)[1].weight.detach().numpy() for t in TARGETS] for layer in decoder_layers(model)[1]]


@pytest.mark.parametrize("scorer,arch", [("spectrum", "llama"), ("spectrum", "gemma"), ("alpha", "llama"),
                                         ("alpha", "qwen2")])
def test_spectral_scores_equal_numpy_on_the_base_weights(scorer, arch):
    fn = _numpy_snr if scorer == "spectrum" else _loop_alpha
    expected = [np.mean([fn(w) for w in layer]) for layer in _base_weights(tiny_model(arch).double())]
    sel = _select(adapted_model(arch, dtype=torch.float64), make_batches(1), scorer)
    np.testing.assert_allclose(sel.scores, expected, rtol=1e-5)
    assert sel.ranking == rank_layers(torch.tensor(expected)) and scorer in sel.timings
    assert len(sel.diagnostics[scorer]["per_matrix"][0]) == 3  # every target module of the layer


def test_spectrum_and_alpha_see_a_planted_signal():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(200, 100, generator=g, dtype=torch.float64)
    u, v = torch.randn(200, 3, generator=g, dtype=torch.float64), torch.randn(3, 100, generator=g, dtype=torch.float64)
    planted = noise + 3 * u @ v
    pure = spectrum_snr(noise)
    assert spectrum_snr(planted)["snr"] > pure["snr"] and spectrum_snr(planted)["signal_values"] >= 3
    assert pure["snr_over_max"] == pytest.approx(pure["snr"] / float(torch.linalg.svdvals(noise)[0]))
    assert alpha_hill(planted) < alpha_hill(noise)  # the planted rank-3 signal makes the tail heavier
    with pytest.raises(SelectionError, match="Hill estimator needs"):
        alpha_hill(noise, k=100)


def test_alpha_expert_pattern_is_proportional_to_alpha_to_the_beta():
    assert alpha_expert_pattern([1.0, 1.0, 2.0], 6, beta=1.0) == {0: 2, 1: 1, 2: 3}  # 1.5, 1.5, 3: remainders
    assert alpha_expert_pattern([1.0, 1.0, 2.0], 8, beta=1.0) == {0: 2, 1: 2, 2: 4}
    pattern = alpha_expert_pattern([2.1, 3.5, 2.8, 5.0, 2.2], 20)
    assert sum(pattern.values()) == 20 and min(pattern.values()) >= 1
    assert pattern[3] == max(pattern.values()) and pattern[0] <= pattern[2] <= pattern[1]
    assert alpha_expert_pattern([1.0, 100.0], 2) == {0: 1, 1: 1}  # at least one expert each
    with pytest.raises(ValueError, match="total_experts"):
        alpha_expert_pattern([1.0, 2.0, 3.0], 2)


# ----------------------------------------------------------------------------- CKA

def _numpy_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA in sample space: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = XXᵀ, H = I − 11ᵀ/n."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float(np.sum(k * l_) / math.sqrt(np.sum(k * k) * np.sum(l_ * l_)))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cka_equals_sample_space_cka_of_the_base_models_hidden_states(arch):
    base = tiny_model(arch).double()
    base.model.norm = nn.Identity()  # so that the last hidden state is the last layer's output
    batches = make_batches(3)
    with torch.no_grad():
        hidden = [base(**b, output_hidden_states=True).hidden_states for b in batches]
    keep = [b["attention_mask"].bool() for b in batches]
    expected = [1 - _numpy_cka(np.concatenate([h[k][m].numpy() for h, m in zip(hidden, keep)]),
                               np.concatenate([h[k + 1][m].numpy() for h, m in zip(hidden, keep)]))
                for k in range(4)]
    sel = _select(adapted_model(arch, dtype=torch.float64), batches, "cka", heldout_batches=0)
    np.testing.assert_allclose(sel.scores, expected, rtol=1e-5)
    assert sel.timings["hidden_states"] > 0


# ----------------------------------------------------------------------------- every anchor, end to end

@pytest.mark.parametrize("scorer", ANCHORS)
def test_every_anchor_scorer_selects_and_reranks_on_stability_subsets(scorer, tmp_path):
    sel = _select(adapted_model("llama"), make_batches(5), scorer, heldout_batches=1, stability=True,
                  stability_fractions=[1.0, 0.5])
    assert sorted(sel.ranking) == [0, 1, 2, 3] and sel.chosen == sel.ranking[:2] and sel.scorer == scorer
    assert sel.stability["num_batches"] == [4, 2] and len(sel.stability["rankings"][1]) == 4
    path = write_outputs(sel, tmp_path)[0]
    assert Selection.from_json(path).ranking == sel.ranking and json.loads(path.read_text())["scorer"] == scorer
    if scorer in ("spectrum", "alpha", "ablation", "ablation_greedy"):  # weights only, or held-out data
        assert sel.stability["rankings"][1] == sel.ranking


def test_the_scorer_names_are_validated_and_listed_in_the_cli_help():
    assert set(ANCHORS) <= set(SCORERS)
    help_text = SELECT_FLAGS["--scorer"][1]["help"]
    assert all(name in help_text for name in SCORERS)
    with pytest.raises(SelectionError, match="lora_drop"):
        SelectionConfig(scorer="no_such_scorer")
    with pytest.raises(SelectionError, match="adapter's output is zero"):  # an untrained adapter (B = 0)
        _select(_adapters_zeroed(adapted_model("llama"), set(range(4))), make_batches(1), "lora_drop")


# ----------------------------------------------------------------------------- cost-aware ranking

def test_cost_adjusted_scores_equal_the_formula_and_keep_the_ranking_at_weight_zero():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.randint(0, 5, (7,), generator=g).float()  # with ties
        assert rank_layers(cost_adjusted_scores(scores, 0.0)) == rank_layers(scores)
        assert rank_layers(cost_adjusted_scores(scores, 50.0)) == [6, 5, 4, 3, 2, 1, 0]  # top layers first
    scores = torch.tensor([0.3, 0.1, 0.2, 0.2])
    ranks = [3, 0, 1.5, 1.5]  # 0-based, ties share their mean
    expected = [ranks[k] / 3 - 0.4 * (4 - k) / 4 for k in range(4)]
    np.testing.assert_allclose(cost_adjusted_scores(scores, 0.4).numpy(), expected)
    for bad in (-0.1, float("nan"), True, "1"):
        with pytest.raises(SelectionError, match="cost_weight"):
            SelectionConfig(cost_weight=bad)


def test_cost_weight_reranks_but_keeps_the_raw_scores():
    model, batches = adapted_model("llama"), make_batches(2)
    plain = _select(model, batches, "alpha")
    costly = _select(model, batches, "alpha", cost_weight=10.0)
    assert costly.scores == plain.scores and "cost_aware" not in plain.diagnostics
    assert costly.ranking == [3, 2, 1, 0] and costly.chosen == [3, 2]
    diag = costly.diagnostics["cost_aware"]
    assert diag["ranking_by_score"] == plain.ranking
    np.testing.assert_allclose(diag["adjusted_scores"],
                               cost_adjusted_scores(torch.tensor(plain.scores), 10.0).numpy())


def test_cost_weight_at_its_default_leaves_grid_cell_fingerprints_alone():
    from floe.config import from_dict
    from floe.pipeline import RunConfig
    from floe.pipeline.experiment import cell_fingerprint

    base = from_dict(RunConfig, {"method": "floe"})
    zero = from_dict(RunConfig, {"method": "floe", "select": {"config": {"cost_weight": 0.0}}})
    assert cell_fingerprint(zero) == cell_fingerprint(base)
    assert cell_fingerprint(from_dict(RunConfig, {"method": "floe", "select": {"config": {"cost_weight": 0.5}}})) \
        != cell_fingerprint(base)


# ----------------------------------------------------------------------------- floe run

def test_floe_run_selects_with_an_anchor_scorer_and_caches_the_stage(tmp_path):
    from test_pipeline import _config, _ran

    from floe.pipeline import run

    shared = {"compare": [], "stage_root": str(tmp_path / "stages")}
    for scorer in ("lora_drop", "spectrum"):
        log: list[str] = []
        summary = run(_config(tmp_path, **{"select.config.scorer": scorer, **shared}), log=log.append)
        assert "select" in _ran(log) and ("warmup" in _ran(log)) == (scorer == "lora_drop")  # warm-up reused
        select = next((tmp_path / "stages").glob("select-*/selection.json"), None)
        assert select is not None and summary["stages"]["select"]["result"]["timings"]
        log.clear()
        run(_config(tmp_path, **{"select.config.scorer": scorer, **shared}), log=log.append)
        assert _ran(log) == []  # every stage cached
    chosen = {json.loads(p.read_text())["scorer"] for p in (tmp_path / "stages").glob("select-*/selection.json")}
    assert chosen == {"lora_drop", "spectrum"}
