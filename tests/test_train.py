"""Training: loss falls, only the adapter trains and is checkpointed (PEFT's files, by the Trainer's
own PEFT support), a killed run resumes exactly."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import peft
import pytest
import torch
from conftest import make_tokenizer, tiny_model
from train_helpers import KillAfter, Killed, tokenized

from floe.adapters.moe_lora import (
    MoELoraConfig,
    adapter_state_dict,
    apply_moe_lora,
    load_adapter,
)
from floe.training import TrainConfig, train


def _cfg(out: Path, **kw) -> TrainConfig:
    return dataclasses.replace(TrainConfig(output_dir=str(out), learning_rate=5e-3, max_steps=12, batch_size=4,
                                           logging_steps=1, save_steps=100, report_to=[], progress_bar=False, seed=3),
                               **kw)


def test_training_lowers_validation_loss_and_saves_only_the_adapter(tmp_path):
    data = tokenized(24, tmp_path)
    model = tiny_model("llama")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    model = apply_moe_lora(model, MoELoraConfig(r=4, num_experts=2, lora_dropout=0.0))
    res = train(model, make_tokenizer(), data, data, _cfg(tmp_path / "run", max_steps=25, save_steps=10))
    assert res.steps == 25
    assert res.final_eval_loss < res.initial_eval_loss - 0.5
    # frozen base weights untouched
    for k, v in model.state_dict().items():
        key = k.replace(".base_layer.", ".")
        if key in base and "lora" not in k and "router" not in k:
            assert torch.equal(v, base[key]), k
    ckpt = tmp_path / "run" / "checkpoint-20"
    files = {p.name for p in ckpt.rglob("*") if p.is_file()}
    assert {"adapter_config.json", "adapter_model.safetensors", "floe_record.json"} <= files, files
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in files), files
    from safetensors import safe_open
    with safe_open(str(ckpt / "adapter_model.safetensors"), framework="pt") as f:  # the adapter only
        assert f.keys() and all(".lora_" in k for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "train_metrics.json").is_file()




@torch.no_grad()
def _val_loss(model, data, batch_size: int = 4) -> float:
    """The Trainer's eval_loss by a naive loop: the mean over equal batches (in order) of each batch's mean token loss."""
    from floe.data import DataCollator

    model.eval()
    collate = DataCollator(make_tokenizer())
    losses = [float(model(**collate([data[j] for j in range(i, i + batch_size)])).loss)
              for i in range(0, len(data), batch_size)]
    return sum(losses) / len(losses)


def test_keep_best_saves_the_adapter_of_the_lowest_validation_loss_and_a_resume_keeps_it(tmp_path):
    data, val = tokenized(24, tmp_path), tokenized(8, tmp_path)
    tok = make_tokenizer()

    def fresh():
        m = tiny_model("llama")
        m = apply_moe_lora(m, MoELoraConfig(r=4, num_experts=2, lora_dropout=0.0), seed=2)
        return m

    # a learning rate high enough that the validation loss goes up again: best is not the last step
    cfg = _cfg(tmp_path / "run", max_steps=12, eval_steps=2, keep_best=True, learning_rate=0.08, save_steps=4)
    model = fresh()
    res = train(model, tok, data, val, cfg)
    curve = dict(res.eval_losses)
    assert sorted(curve) == [0, 2, 4, 6, 8, 10, 12]
    best = min(curve, key=curve.get)
    assert (res.best_step, res.best_eval_loss) == (best, pytest.approx(curve[best]))
    # the saved folder is that step's adapter: a fresh model with it has that validation loss
    other = fresh()
    load_adapter(other, tmp_path / "run" / "best_adapter")
    assert _val_loss(other, val) == pytest.approx(res.best_eval_loss, rel=1e-4)
    # killed after step 8, then resumed: the best of the steps before the kill still counts
    part = fresh()
    with pytest.raises(Killed):
        train(part, tok, data, val, dataclasses.replace(cfg, output_dir=str(tmp_path / "killed")),
              callbacks=[KillAfter(8)])
    again = train(fresh(), tok, data, val, dataclasses.replace(cfg, output_dir=str(tmp_path / "killed")))
    assert again.best_step == res.best_step and again.best_eval_loss == pytest.approx(res.best_eval_loss, rel=1e-5)
    assert (tmp_path / "killed" / "best_adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("how", ["apply_moe_lora", "get_peft_model"])
def test_interrupted_run_resumes_to_the_same_weights_as_an_uninterrupted_one(tmp_path, how):
    """The resume goes through transformers' own PEFT checkpointing (no FLoE override)."""
    data = tokenized(24, tmp_path)
    tok = make_tokenizer()

    def fresh():
        m = tiny_model("qwen2")
        torch.manual_seed(0)
        if how == "get_peft_model":
            return peft.get_peft_model(m, MoELoraConfig(r=4, num_experts=3, lora_dropout=0.1))
        m = apply_moe_lora(m, MoELoraConfig(r=4, num_experts=3, lora_dropout=0.1))
        return m

    ref = fresh()
    train(ref, tok, data, None, _cfg(tmp_path / "straight"))
    # "killed" after step 8 (checkpoint at 8), then started again with the same config
    part = fresh()
    with pytest.raises(Killed):
        train(part, tok, data, None, _cfg(tmp_path / "resumed", save_steps=4), callbacks=[KillAfter(8)])
    assert (tmp_path / "resumed" / "checkpoint-8" / "adapter_model.safetensors").is_file()
    again = fresh()
    res = train(again, tok, data, None, _cfg(tmp_path / "resumed", save_steps=4))
    assert res.steps == 12
    a, b = adapter_state_dict(ref), adapter_state_dict(again)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)


def test_only_adapter_parameters_receive_gradients_during_training(tmp_path):
    data = tokenized(8, tmp_path)
    model = tiny_model("gemma")
    model = apply_moe_lora(model, MoELoraConfig(r=2, num_experts=2, layers_to_transform=[1, 2]))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(("lora_" in n or "router" in n) and (".1." in n or ".2." in n) for n in names)
    train(model, make_tokenizer(), data, None, _cfg(tmp_path / "g", max_steps=2))
    assert all(p.grad is None for n, p in model.named_parameters() if n not in names)


def test_train_refuses_a_model_without_adapter(tmp_path):
    data = tokenized(4, tmp_path)
    with pytest.raises(ValueError, match="apply_moe_lora"):
        train(tiny_model(), make_tokenizer(), data, None, _cfg(tmp_path / "x"))


def test_saved_adapter_reloads_into_fresh_model_with_identical_logits(tmp_path):
    data = tokenized(8, tmp_path)
    model = tiny_model("llama")
    model = apply_moe_lora(model, MoELoraConfig(r=4, num_experts=2, layers_to_transform=[0, 3]))
    res = train(model, make_tokenizer(), data, None, _cfg(tmp_path / "r", max_steps=5))
    fresh = tiny_model("llama")
    load_adapter(fresh, res.adapter_dir)
    x = torch.randint(5, 300, (2, 9))
    model.eval()
    torch.testing.assert_close(model(x).logits, fresh(x).logits, atol=0, rtol=0)
