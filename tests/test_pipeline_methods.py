"""`floe run` methods beyond MoE-LoRA: prompt tuning, P-tuning, FIM-LoRA, full fine-tuning, the search stage."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, tiny_model
from test_pipeline import _config, _ran

from floe.config import from_dict
from floe.pipeline import RunConfig, run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HIDDEN = 32  # tiny_model's hidden size


def _prompt_model(method: str, n: int = 5):
    from floe.adapters.moe_lora import MoELoraConfig
    from floe.pipeline.baselines import attach_peft

    model = tiny_model("llama")
    return model, attach_peft(model, method, MoELoraConfig(), None, total_steps=2, seed=0, virtual_tokens=n)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_prompt_methods_train_exactly_their_parameters(method):
    from floe.pipeline.baselines import trainable_counts

    model, pm = _prompt_model(method, n=5)
    by_hand = 5 * HIDDEN  # the virtual-token embeddings
    if method == "p_tuning":  # PEFT's MLP encoder: three hidden x hidden linear layers with biases
        by_hand += 3 * (HIDDEN * HIDDEN + HIDDEN)
    trainable, total = trainable_counts(pm)
    assert trainable == by_hand
    assert total == by_hand + sum(p.numel() for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())  # the base model stays frozen


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_virtual_tokens_evaluation_scores_what_peft_computes(method):
    from floe.evaluation.generation import greedy_generate
    from floe.evaluation.logprobs import sequence_logprobs
    from floe.pipeline.baselines import VirtualTokens

    _, pm = _prompt_model(method)
    torch.nn.init.normal_(pm.prompt_encoder["default"].embedding.weight)  # not the vocabulary's rows
    tok = make_tokenizer()
    ids = [5, 9, 11, 13, 17, 19]
    labels = [-100, -100, -100, 13, 17, 19]
    (logprob, count), = sequence_logprobs(VirtualTokens(pm), tok, [{"input_ids": ids, "labels": labels}])
    with torch.no_grad():  # PEFT's own loss: it prepends -100 for the virtual tokens and shifts itself
        loss = pm(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, 6, dtype=torch.long),
                  labels=torch.tensor([labels])).loss
    assert count == 3
    assert logprob == pytest.approx(-3 * loss.item(), rel=1e-5)
    with torch.no_grad():
        nxt = VirtualTokens(pm)(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item()
    out = greedy_generate(VirtualTokens(pm), tok, [ids], max_new_tokens=1, stop_ids=[])
    assert out == [[nxt]]


def test_prompt_methods_run_in_the_pipeline_and_evaluate_from_a_cached_stage(tmp_path):
    import shutil

    cfg = lambda: _config(tmp_path, method="prompt_tuning", compare=["p_tuning"], virtual_tokens=4)
    first = run(cfg(), log=lambda s: None)
    for m in ("prompt_tuning", "p_tuning"):
        assert first["methods"][m]["trainable_params"] == 4 * HIDDEN + (3 * (HIDDEN * HIDDEN + HIDDEN) if m == "p_tuning" else 0)
        losses = [v for _, v in first["methods"][m]["eval_losses"]]
        assert losses[-1] < losses[0]  # the virtual tokens learned something
    for key, stage in first["stages"].items():
        if key.endswith("/eval"):
            shutil.rmtree(stage["dir"])
    log: list[str] = []
    again = run(cfg(), log=log.append)
    assert _ran(log) == ["prompt_tuning/eval", "p_tuning/eval"]
    for m in ("prompt_tuning", "p_tuning"):
        assert again["methods"][m]["scores"]["test_loss"] == pytest.approx(first["methods"][m]["scores"]["test_loss"], abs=1e-5)


def test_fim_lora_trains_the_allocated_ranks(tmp_path):
    summary = run(_config(tmp_path, method="fim_lora", compare=[], fim_passes=2), log=lambda s: None)
    alloc_dir = Path(summary["stages"]["fim_lora/allocate"]["dir"]) / "allocation"
    allocation = json.loads((alloc_dir / "allocation.json").read_text())
    by_hand = sum(m["rank"] * (m["d_in"] + m["d_out"]) for m in allocation["matrices"])
    assert allocation["allocated_rank"] == allocation["total_rank"] == 2 * allocation["num_matrices"]  # average r = 2
    assert len({m["rank"] for m in allocation["matrices"]}) > 1  # not a uniform rank
    assert summary["methods"]["fim_lora"]["trainable_params"] == by_hand
    train_dir = Path(summary["stages"]["fim_lora/train"]["dir"])
    saved = json.loads((train_dir / "adapter" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == allocation["rank_pattern"]


def test_search_stage_sets_the_rank_and_experts_of_the_final_training(tmp_path):
    over = {"method": "moe_lora", "compare": [], "search.enabled": True, "search.n_trials": 3, "search.steps": 2,
            "search.eval_points": 1, "search.r_min": 2, "search.r_max": 6, "search.r_step": 2,
            "search.experts": [1, 2]}
    summary = run(_config(tmp_path, **over), log=lambda s: None)
    found = summary["stages"]["search"]["result"]
    assert found["trials"] == 3 and found["r"] in (2, 4, 6) and found["num_experts"] in (1, 2)
    train_dir = Path(summary["stages"]["moe_lora/train"]["dir"])
    saved = json.loads((train_dir / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["num_experts"]) == (found["r"], found["num_experts"])
    log: list[str] = []
    run(_config(tmp_path, **over), log=log.append)
    assert _ran(log) == []


def test_a_bad_search_range_fails_before_any_stage(tmp_path):
    from floe.errors import InputError

    with pytest.raises(InputError, match="eval_points|multiple"):
        _config(tmp_path, **{"search.enabled": True, "search.steps": 5, "search.eval_points": 2})
    assert not (tmp_path / "run").exists()


@pytest.mark.filterwarnings("ignore:config key:FutureWarning")  # the recorded config holds the keys' old names
def test_fields_added_later_leave_recorded_cell_fingerprints_alone():
    from floe.pipeline.experiment import cell_fingerprint

    path = Path(__file__).parents[1] / "benchmarks" / "results" / "table2.jsonl"
    row = json.loads(path.read_text().splitlines()[0])
    cfg = from_dict(RunConfig, row["config"])
    assert cell_fingerprint(cfg) == row["fingerprint"]
    cfg.virtual_tokens = 7
    assert cell_fingerprint(cfg) != row["fingerprint"]


def test_full_fine_tuning_trains_every_weight_and_evaluates_from_a_cached_stage(tmp_path):
    import shutil

    first = run(_config(tmp_path, method="full", compare=[], **{"train.max_steps": 2, "train.save_steps": 1}),
                log=lambda s: None)
    m = first["methods"]["full"]
    assert m["trainable_params"] == m["total_params"] == sum(p.numel() for p in tiny_model("llama").parameters())
    shutil.rmtree(first["stages"]["full/eval"]["dir"])
    log: list[str] = []
    again = run(_config(tmp_path, method="full", compare=[], **{"train.max_steps": 2, "train.save_steps": 1}),
                log=log.append)
    assert _ran(log) == ["full/eval"]
    assert again["methods"]["full"]["scores"]["test_loss"] == pytest.approx(m["scores"]["test_loss"], abs=1e-5)




def test_full_fine_tuning_killed_mid_run_resumes_to_the_uninterrupted_weights(tmp_path):
    from train_helpers import KillAfter, Killed, tokenized

    from floe.training import TrainConfig, train

    data = tokenized(16, tmp_path)

    def cfg(name):
        return TrainConfig(output_dir=str(tmp_path / name), max_steps=4, batch_size=4, save_steps=2, report_to=[],
                           progress_bar=False, learning_rate=1e-3, seed=5)

    def model():
        m = tiny_model("llama")
        for p in m.parameters():
            p.requires_grad_(True)
        return m

    whole = model()
    train(whole, make_tokenizer(), data, None, cfg("whole"), full=True)
    with pytest.raises(Killed):
        train(model(), make_tokenizer(), data, None, cfg("cut"), [KillAfter(2)], full=True)
    assert (tmp_path / "cut" / "checkpoint-2" / "model.safetensors").is_file()
    resumed = model()
    res = train(resumed, make_tokenizer(), data, None, cfg("cut"), full=True)
    assert res.steps == 4 and (tmp_path / "cut" / "model" / "model.safetensors").is_file()
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(ValueError, match="adapter attached"):
        from floe.adapters.moe_lora import MoELoraConfig, apply_moe_lora

        m = tiny_model("llama")
        m = apply_moe_lora(m, MoELoraConfig(r=2, num_experts=2))
        train(m, make_tokenizer(), data, None, cfg("bad"), full=True)


def test_the_warmup_is_keyed_on_the_searched_rank_and_experts_it_trains_with(tmp_path):
    """Bug: the warm-up trained with the searched (r, M) but was cached under the config's, so a run with the
    search off and then on reused a warm-up trained with other r and M."""
    import json

    common = {"method": "floe", "compare": [], "stage_root": str(tmp_path / "stages")}
    off = run(_config(tmp_path, **common), log=lambda s: None)
    over = {**common, "search.enabled": True, "search.n_trials": 1, "search.steps": 2, "search.eval_points": 1,
            "search.r_min": 4, "search.r_max": 4, "search.r_step": 2, "search.experts": [1], "output_dir": str(tmp_path / "on")}
    log: list[str] = []
    on = run(_config(tmp_path, **over), log=log.append)
    assert [ln for ln in log if "warmup: running in" in ln], "the warm-up with the searched r and M was not trained"
    w_off, w_on = off["stages"]["warmup"]["dir"], on["stages"]["warmup"]["dir"]
    assert w_off != w_on
    trained = json.loads((Path(w_on) / "adapter" / "adapter_config.json").read_text())
    assert (trained["r"], trained.get("num_experts", 1)) == (4, 1)  # M = 1 is saved as plain PEFT LoRA
    assert json.loads((Path(w_off) / "adapter" / "adapter_config.json").read_text())["r"] == 2
