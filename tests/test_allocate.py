"""FIM-LoRA rank allocator: exact budget, gradient scores, PEFT round trip, CLI."""
from __future__ import annotations

import argparse
import itertools
import json
import random
import warnings

import numpy as np
import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer
from peft.utils.other import get_pattern_key

from conftest import tiny_model
from floe.allocate import (AllocateConfig, BudgetError, allocate, allocate_ranks, pattern_keys, save_allocation,
                           water_fill)

MLP = ("gate_proj", "up_proj", "down_proj")
ATTN_MLP = ("q_proj", "k_proj", "v_proj", "o_proj") + MLP

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def make_batches(n: int = 8, seed: int = 0, batch: int = 2, length: int = 12) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 320, (batch, length), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100  # a masked "prompt"
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def lora_ranks(peft_model) -> dict[str, int]:
    return {n: int(m.r["default"]) for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


# ----------------------------------------------------------------------------- rounding (pure)

def _random_case(rng: random.Random):
    n = rng.randint(1, 12)
    kind = rng.choice(["lognormal", "uniform", "zeros", "ties", "tiny", "huge"])
    if kind == "lognormal":
        scores = [rng.lognormvariate(0, 2) for _ in range(n)]
    elif kind == "uniform":
        scores = [rng.random() for _ in range(n)]
    elif kind == "zeros":
        scores = [rng.choice([0.0, rng.random()]) for _ in range(n)]
    elif kind == "ties":
        scores = [float(rng.randint(1, 3)) for _ in range(n)]
    elif kind == "tiny":
        scores = [rng.random() * 1e-12 for _ in range(n)]
    else:
        scores = [rng.random() * 1e12 for _ in range(n)]
    lo = [rng.randint(0, 3) for _ in range(n)]
    hi = [a + rng.randint(0, 6) for a in lo]
    total = rng.randint(sum(lo), sum(hi))
    return scores, total, lo, hi


def test_largest_remainder_keeps_budget_exactly_within_bounds_on_random_cases():
    rng = random.Random(1234)
    for _ in range(600):
        scores, total, lo, hi = _random_case(rng)
        ranks = allocate(scores, total, lo, hi)
        assert sum(ranks) == total, (scores, total, lo, hi, ranks)
        assert all(a <= r <= b for r, a, b in zip(ranks, lo, hi)), (scores, total, lo, hi, ranks)
        assert all(isinstance(r, int) for r in ranks)


def _reference_shares(scores, total, lo, hi) -> np.ndarray:
    """Naive water-filling: bisection on lam in float64 (zero scores get an infinitesimal equal weight)."""
    s = np.asarray(scores, float)
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    if (s > 0).any() and np.clip(np.where(s > 0, np.inf, 0.0), lo, hi).sum() < total:
        s = np.where(s > 0, 1e300, 1.0)  # positives saturate first, zeros share the rest equally
    elif not (s > 0).any():
        s = np.ones_like(s)
    a, b = 0.0, 1.0
    while np.clip(b * s, lo, hi).sum() < total:
        b *= 2
    for _ in range(300):
        m = (a + b) / 2
        a, b = (m, b) if np.clip(m * s, lo, hi).sum() < total else (a, m)
    return np.clip(b * s, lo, hi)


def _reference_ranks(x: np.ndarray, total: int, lo, hi) -> tuple[list[list[int]], float]:
    """Brute force: every integer vector in the bounds summing to total, nearest to x in L2 (Hamilton's optimum)."""
    best, best_d = [], np.inf
    for r in itertools.product(*[range(a, b + 1) for a, b in zip(lo, hi)]):
        if sum(r) != total:
            continue
        d = float(((np.asarray(r) - x) ** 2).sum())
        if d < best_d - 1e-9:
            best, best_d = [list(r)], d
        elif d <= best_d + 1e-9:
            best.append(list(r))
    return best, best_d


def test_allocation_equals_naive_bruteforce_reference():
    rng = random.Random(7)
    checked = 0
    for _ in range(300):
        n = rng.randint(1, 5)
        scores = [rng.choice([0.0, rng.lognormvariate(0, 1.5)]) if rng.random() < 0.2 else rng.lognormvariate(0, 1.5)
                  for _ in range(n)]
        lo = [rng.randint(1, 2) for _ in range(n)]
        hi = [a + rng.randint(0, 5) for a in lo]
        total = rng.randint(sum(lo), sum(hi))
        ours = allocate(scores, total, lo, hi)
        x = _reference_shares(scores, total, lo, hi)
        np.testing.assert_allclose([float(v) for v in water_fill(scores, total, lo, hi)], x, rtol=1e-9, atol=1e-9)
        candidates, _ = _reference_ranks(x, total, lo, hi)
        assert ours in candidates, (scores, total, lo, hi, x, ours, candidates)
        checked += len(candidates) == 1
    assert checked > 250  # most cases have a unique optimum, so the comparison is strict


def test_ranks_are_exactly_proportional_when_no_bound_binds():
    assert allocate([1.0, 2.0, 5.0], 16, 1, 16) == [2, 4, 10]
    assert allocate([3.0, 3.0, 3.0, 3.0], 32, 1, 32) == [8, 8, 8, 8]
    # ties in the remainder go to the larger score, then to the lower index
    assert allocate([1.0, 1.0, 1.0], 10, 1, 10) == [4, 3, 3]
    assert allocate([1.0, 1.0, 2.0], 10, 1, 10) == [3, 2, 5]
    assert allocate([2.0, 4.0, 2.0, 4.0], 9, 1, 9) == [2, 3, 1, 3]


def test_water_filling_lifts_minimums_and_holds_caps():
    # proportional shares of 24 would be (0.24, 0.24, 23.5): the small ones are lifted to 1,
    # the big one capped at 12 and the rest shared by the other two
    assert allocate([1.0, 1.0, 98.0], 24, 1, 12) == [6, 6, 12]
    assert allocate([0.0, 0.0, 5.0], 9, 1, 5) == [2, 2, 5]  # zero scores share what the cap leaves
    assert allocate([0.0, 0.0, 0.0], 9, 1, 9) == [3, 3, 3]


@pytest.mark.parametrize("scores,total,lo,hi,needle", [
    ([1.0, 2.0], 1, 1, 4, "below 2, the sum of the minimum ranks"),
    ([1.0, 2.0], 9, 1, 4, "above 8, the sum of the rank caps"),
    ([1.0, 2.0], 4, [3, 1], [2, 4], "minimum rank 3 above its cap 2"),
])
def test_impossible_budgets_raise_budget_error(scores, total, lo, hi, needle):
    with pytest.raises(BudgetError, match=needle):
        allocate(scores, total, lo, hi)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_invalid_scores_raise(bad):
    with pytest.raises(ValueError, match="scores must be finite and >= 0"):
        allocate([1.0, bad], 4, 1, 4)


def test_pattern_keys_match_only_their_module_under_peft_matching():
    names = ["model.layers.1.mlp.down_proj", "model.layers.11.mlp.down_proj", "model.layers.1.mlp.up_proj",
             "x.model.layers.1.mlp.down_proj", "model.layers.1xmlp.down_proj", "lm_head"]
    keys = pattern_keys(names)
    assert keys["model.layers.11.mlp.down_proj"] == "model.layers.11.mlp.down_proj"  # plain when unambiguous
    for name in names:  # PEFT's own resolver picks each module's own key
        assert get_pattern_key(list(keys.values()), name) == keys[name], name


# ----------------------------------------------------------------------------- scoring on tiny models

def test_config_rejects_impossible_budgets_clearly():
    with pytest.raises(BudgetError, match="min_rank 3 is above budget_rank 2"):
        AllocateConfig(budget_rank=2, min_rank=3)
    with pytest.raises(BudgetError, match="max_rank 1 is below min_rank 2"):
        AllocateConfig(budget_rank=4, min_rank=2, max_rank=1)
    with pytest.raises(BudgetError, match="budget_rank must be a positive integer"):
        AllocateConfig(budget_rank=0)
    with pytest.raises(BudgetError, match="score must be one of"):
        AllocateConfig(score="fisher")


def test_budget_outside_bounds_raises_with_context_and_model_intact():
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(BudgetError, match=r"below 12, the sum of the minimum ranks.*12 matrices"):
        allocate_ranks(model, make_batches(), AllocateConfig(budget_rank=4, total_rank=11))
    with pytest.raises(BudgetError, match=r"above 24, the sum of the rank caps"):
        allocate_ranks(model, make_batches(), AllocateConfig(budget_rank=4, max_rank=2, min_rank=1))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def _naive_scores(model, batches, targets, rank, seed, kind, reduction):
    """Independent reference: PEFT LoRA, per-pass B gradients stacked, numpy statistics."""
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                                    target_modules=list(targets)))
    pm.eval()
    names = [n for n, m in pm.base_model.model.named_modules() if isinstance(m, LoraLayer)]
    layers = dict(pm.base_model.model.named_modules())
    grads = {n: [] for n in names}
    for b in batches:
        pm.zero_grad()
        pm(**b).loss.backward()
        for n in names:
            grads[n].append(layers[n].lora_B["default"].weight.grad.double().numpy().copy())
    pm.unload()
    out = []
    for n in names:
        g = np.stack(grads[n])
        stat = g.var(axis=0) if kind == "variance" else (g ** 2).mean(axis=0)
        out.append(stat.mean() if reduction == "mean" else stat.sum())
    return names, out


@pytest.mark.parametrize("kind,reduction", [("variance", "mean"), ("mean_square", "sum")])
def test_scores_equal_numpy_statistics_of_lora_b_gradients(kind, reduction):
    batches = make_batches(6)
    alloc = allocate_ranks(tiny_model("qwen2"), batches, AllocateConfig(
        budget_rank=4, num_passes=6, score=kind, reduction=reduction, target_modules=ATTN_MLP, seed=3))
    names, ref = _naive_scores(tiny_model("qwen2"), batches, ATTN_MLP, 4, 3, kind, reduction)
    assert alloc.names == names and len(names) == 4 * 7
    np.testing.assert_allclose(alloc.scores, ref, rtol=2e-4)
    assert min(alloc.scores) > 0


def test_rescaling_that_preserves_the_function_moves_rank_to_the_larger_gradient_variance():
    """Scale layer 2's up_proj by c and its down_proj by 1/c: the model computes the same
    function, down_proj's input (hence its LoRA-B gradient) grows by c and up_proj's output
    gradient shrinks by 1/c, so their variances scale by c^2 and 1/c^2 exactly."""
    c = 4.0
    batches = make_batches(8)
    base, scaled = tiny_model("llama"), tiny_model("llama")
    with torch.no_grad():
        mlp = scaled.model.layers[2].mlp
        mlp.up_proj.weight.mul_(c)
        mlp.down_proj.weight.div_(c)
        torch.testing.assert_close(scaled(**batches[0]).logits, base(**batches[0]).logits, rtol=1e-4, atol=1e-5)
    cfg = AllocateConfig(budget_rank=4)
    a, b = allocate_ranks(base, batches, cfg), allocate_ranks(scaled, batches, cfg)
    ratio = dict(zip(a.names, np.asarray(b.scores) / np.asarray(a.scores)))
    down, up = "model.layers.2.mlp.down_proj", "model.layers.2.mlp.up_proj"
    assert ratio.pop(down) == pytest.approx(c ** 2, rel=1e-3)
    assert ratio.pop(up) == pytest.approx(c ** -2, rel=1e-3)
    assert all(v == pytest.approx(1.0, rel=1e-3) for v in ratio.values())
    rb = b.rank_by_name
    assert rb[down] > a.rank_by_name[down] and rb[down] == max(b.ranks)
    assert rb[up] < a.rank_by_name[up] and rb[up] == min(b.ranks)
    assert sum(a.ranks) == sum(b.ranks) == 12 * 4


def test_same_model_data_and_seed_give_identical_scores_and_ranks():
    model, batches = tiny_model("llama"), make_batches()
    a, b = allocate_ranks(model, batches, AllocateConfig()), allocate_ranks(model, batches, AllocateConfig())
    assert a.scores == b.scores and a.ranks == b.ranks
    c = allocate_ranks(model, batches, AllocateConfig(seed=1))  # another LoRA-A draw changes the scores
    assert c.scores != a.scores


def test_allocation_leaves_the_callers_model_as_it_was(arch):
    model = tiny_model(arch)
    model.model.embed_tokens.weight.requires_grad_(False)  # an unusual flag that must survive
    model.train()
    types = {n: type(m) for n, m in model.named_modules()}
    params = {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}
    batches = make_batches(3)
    allocate_ranks(model, batches, AllocateConfig(budget_rank=2, num_passes=3, target_modules=ATTN_MLP))
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert model.training and not hasattr(model, "peft_config")
    for n, p in model.named_parameters():
        assert p.requires_grad == params[n][0] and torch.equal(p, params[n][1]), n
        assert p.grad is None, n


def test_too_few_batches_and_unknown_targets_raise_clearly():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="gave only 3 batches but num_passes=8"):
        allocate_ranks(model, make_batches(3), AllocateConfig())
    with pytest.raises(ValueError, match=r"match no linear layer.*'down_proj'"):
        allocate_ranks(model, make_batches(), AllocateConfig(target_modules=("c_fc",)))
    bad = make_batches(8)
    bad[1]["labels"][:] = -100
    with pytest.raises(ValueError, match="calibration batch 1: every label is -100"):
        allocate_ranks(model, bad, AllocateConfig())
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------- PEFT round trip

def test_emitted_config_gives_peft_exactly_the_allocated_ranks(arch):
    alloc = allocate_ranks(tiny_model(arch), make_batches(), AllocateConfig(budget_rank=4, target_modules=ATTN_MLP))
    assert len(set(alloc.ranks)) > 1  # a non-trivial pattern
    assert sum(alloc.ranks) == alloc.total_rank == 4 * 7 * 4
    assert all(r <= c for r, c in zip(alloc.ranks, alloc.caps))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # PEFT warns about rank_pattern keys that match nothing
        pm = peft.get_peft_model(tiny_model(arch), alloc.lora_config())
    assert lora_ranks(pm) == alloc.rank_by_name
    for name, module in pm.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            r = alloc.rank_by_name[name]
            assert module.lora_A["default"].weight.shape == (r, module.in_features)
            assert module.lora_B["default"].weight.shape == (module.out_features, r)


def test_saved_adapter_loads_with_from_pretrained_and_trains(tmp_path):
    model = tiny_model("llama")
    alloc = allocate_ranks(model, make_batches(), AllocateConfig(budget_rank=4))
    out = save_allocation(alloc, tmp_path / "alloc", model=model, save_adapter=True)
    assert {"adapter_config.json", "adapter_model.safetensors", "allocation.json", "rank_map.png"} <= \
        {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    saved = json.loads((out / "allocation.json").read_text())
    assert sum(m["rank"] for m in saved["matrices"]) == saved["total_rank"] == 48
    assert json.loads((out / "adapter_config.json").read_text())["rank_pattern"] == alloc.rank_pattern

    pm = peft.PeftModel.from_pretrained(tiny_model("llama"), str(out), is_trainable=True)
    assert lora_ranks(pm) == alloc.rank_by_name
    batch = make_batches(1, seed=5)[0]
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    losses = []
    for _ in range(8):
        loss = pm(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_failed_save_leaves_no_output(tmp_path, monkeypatch):
    import floe.allocate.plots as plots

    alloc = allocate_ranks(tiny_model("llama"), make_batches(), AllocateConfig(budget_rank=2))

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(plots, "plot_rank_map", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_allocation(alloc, tmp_path / "alloc")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- CLI

def _parser():
    from floe.allocate.cli import add_allocate_parser

    parser = argparse.ArgumentParser(prog="floe")
    add_allocate_parser(parser.add_subparsers(dest="command"))
    return parser


def test_cli_writes_config_and_rank_map_with_stubbed_loaders(tmp_path, monkeypatch, tokenizer, capsys):
    data_mod = pytest.importorskip("floe.data")
    if not hasattr(data_mod, "load_data"):
        pytest.skip("floe.data.load_data not available yet")
    import floe.models

    monkeypatch.setattr(floe.models, "load_model", lambda name, dtype="float32", device=None: (tiny_model("llama"), tokenizer))
    rows = [{"input_ids": b["input_ids"][0].tolist(), "labels": b["labels"][0].tolist()} for b in make_batches(16)]
    monkeypatch.setattr(data_mod, "load_data", lambda source, tok, split="train", max_examples=None, **kw: rows[:max_examples])
    args = _parser().parse_args(["allocate", "--method", "fim", "--budget-rank", "4", "--model", "tiny", "--data", "x",
                                 "--batch-size", "2", "--output", str(tmp_path / "o"), "--target-modules", "up_proj,down_proj"])
    assert args.func(args) == 0
    cfg = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert sum(cfg["rank_pattern"].values()) == 8 * 4 and len(cfg["rank_pattern"]) == 8
    assert (tmp_path / "o" / "rank_map.png").stat().st_size > 1000
    assert "total rank 32 (= 32)" in capsys.readouterr().out

    args = _parser().parse_args(["allocate", "--budget-rank", "2", "--min-rank", "3", "--output", str(tmp_path / "bad")])
    from floe.errors import InputError

    with pytest.raises(InputError, match="min_rank 3 is above budget_rank 2"):
        args.func(args)
    assert not (tmp_path / "bad").exists()

    # the same through a YAML config: flags override the file; a floe train config's model/data are read
    (tmp_path / "a.yaml").write_text(
        "model: {name: tiny}\ndata: {source: x}\ntrain: {max_steps: 3}\n"
        f"allocate: {{budget_rank: 4, batch_size: 2, target_modules: [down_proj], output: {tmp_path / 'c'}}}\n")
    args = _parser().parse_args(["allocate", "--config", str(tmp_path / "a.yaml"), "--budget-rank", "2"])
    assert args.func(args) == 0
    cfg = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert len(cfg["rank_pattern"]) == 4 and sum(cfg["rank_pattern"].values()) == 4 * 2
    (tmp_path / "b.yaml").write_text("allocate: {budget_rnk: 4}\n")
    args = _parser().parse_args(["allocate", "--config", str(tmp_path / "b.yaml")])
    with pytest.raises(InputError, match="did you mean 'budget_rank'"):
        args.func(args)
