"""Retention (forgetting) on held-out multiple-choice tasks, and the best-checkpoint evaluation of `floe run`."""
from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_tokenizer, tiny_model
from test_data import fake_bigbench  # noqa: F401  (the fixture)
from test_pipeline import _config

from floe.adapters.moe_lora import MoELoraConfig, apply_moe_lora
from floe.config import from_dict
from floe.errors import InputError
from floe.evaluation.choice import evaluate_choice
from floe.evaluation.retention import RetentionConfig, evaluate_retention, retention_delta
from floe.pipeline import RunConfig, run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TASKS = ["sports_understanding", "date_understanding"]  # 31 and 20 examples in the fake archive


def test_retention_scores_the_first_n_of_each_task_and_macro_averages(fake_bigbench):  # noqa: F811
    from floe.data import load_records

    model, tok = tiny_model("llama", seed=5), make_tokenizer()
    got = evaluate_retention(model, tok, RetentionConfig(tasks=TASKS, max_examples=12))
    assert {t: v["examples"] for t, v in got["per_task"].items()} == {t: 12 for t in TASKS}
    # an independent path to the same numbers: each task's records scored on their own
    for task in TASKS:
        recs = load_records(f"bigbench:{task}", split="all", seed=0, max_per_task=12)
        alone = evaluate_choice(model, tok, recs, max_length=512, keep_predictions=False)
        assert got["per_task"][task]["accuracy"] == pytest.approx(alone["accuracy"])
        assert got["per_task"][task]["chance"] == pytest.approx(alone["chance"])
    assert got["accuracy"] == pytest.approx(sum(v["accuracy"] for v in got["per_task"].values()) / 2)
    # None takes every example
    every = evaluate_retention(model, tok, RetentionConfig(tasks=["date_understanding"], max_examples=None))
    assert every["examples"] == 20


def test_an_untrained_adapter_forgets_nothing_and_the_delta_is_after_minus_before(fake_bigbench):  # noqa: F811
    model, tok = tiny_model("llama", seed=5), make_tokenizer()
    cfg = RetentionConfig(tasks=TASKS, max_examples=10)
    before = evaluate_retention(model, tok, cfg)
    model = apply_moe_lora(model, MoELoraConfig(r=2, num_experts=2), seed=1)  # B = 0: the same function
    after = evaluate_retention(model, tok, cfg)
    assert retention_delta(after, before) == {"accuracy": 0.0, "per_task": {t: 0.0 for t in TASKS}}
    with torch.no_grad():  # a perturbed adapter changes the scores; the delta is their difference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    changed = evaluate_retention(model, tok, cfg)
    d = retention_delta(changed, before)
    for t in TASKS:
        assert d["per_task"][t] == pytest.approx(changed["per_task"][t]["accuracy"] - before["per_task"][t]["accuracy"])
    assert d["accuracy"] == pytest.approx(changed["accuracy"] - before["accuracy"])


def test_retention_refuses_tasks_of_the_training_data_and_bad_names():
    with pytest.raises(InputError, match="part of the training data"):
        from_dict(RunConfig, {"data": {"source": "bigbench:sports_understanding"},
                              "retention": {"tasks": ["sports_understanding"]}})
    with pytest.raises(InputError, match="part of the training data"):
        from_dict(RunConfig, {"retention": {"tasks": ["natural_instructions/subtask001_x"]}})
    with pytest.raises(InputError, match="plain names"):
        RetentionConfig(tasks=["bigbench:date_understanding"])
    with pytest.raises(InputError, match="max_examples"):
        RetentionConfig(tasks=["date_understanding"], max_examples=0)


def test_retention_needs_multiple_choice_tasks(fake_bigbench):  # noqa: F811
    model, tok = tiny_model("llama"), make_tokenizer()
    with pytest.raises(InputError, match="no multiple-choice options"):
        evaluate_retention(model, tok, RetentionConfig(tasks=["arithmetic/1_digit_addition"]))


def test_floe_run_keeps_the_best_adapter_evaluates_it_and_scores_retention(tmp_path, fake_bigbench):  # noqa: F811
    cfg = _config(tmp_path, method="moe_lora", compare=[], **{"train.max_steps": 6, "train.eval_steps": 2,
                                                              "train.keep_best": True, "train.learning_rate": 0.05,
                                                              "retention.tasks": ["date_understanding"],
                                                              "retention.max_examples": 8})
    log: list[str] = []
    summary = run(cfg, log=log.append)
    m = summary["methods"]["moe_lora"]
    curve = dict(m["eval_losses"])
    assert sorted(curve) == [0, 2, 4, 6]
    best_step = min(curve, key=curve.get)
    assert m["best"]["step"] == best_step and m["best"]["eval_loss"] == pytest.approx(curve[best_step])
    assert set(m["best"]["scores"]) == set(m["scores"])
    folder = tmp_path / "run" / "stages"
    train_dir = next(folder.glob("train-*"))
    assert json.loads((train_dir / "best.json").read_text()) == {"step": best_step, "eval_loss": m["best"]["eval_loss"]}
    r = m["retention"]
    assert r["adapter"] == "best" and r["base"]["examples"] == 8
    assert r["delta"]["accuracy"] == pytest.approx(r["after"]["accuracy"] - r["base"]["accuracy"])
    if best_step == 6:  # the best adapter is the final one: the same test scores
        assert m["best"]["scores"] == pytest.approx(m["scores"])
    # run again: nothing re-runs, the same record comes back
    log2: list[str] = []
    again = run(cfg, log=log2.append)
    assert not [ln for ln in log2 if ": running in " in ln]
    assert again["methods"]["moe_lora"]["best"] == m["best"] and again["methods"]["moe_lora"]["retention"] == r


def test_floe_eval_scores_retention_with_and_without_the_adapter(tmp_path, fake_bigbench):  # noqa: F811
    from train_helpers import save_tiny_model_folder

    from floe.adapters.moe_lora import save_adapter
    from floe.evaluation.cli import EvalJob, run_job

    model_dir = save_tiny_model_folder(tmp_path / "tiny")
    model = tiny_model("llama")
    model = apply_moe_lora(model, MoELoraConfig(r=2, num_experts=2), seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    save_adapter(model, tmp_path / "adapter")
    job = from_dict(EvalJob, {"model": {"name": str(model_dir)}, "adapter_dir": str(tmp_path / "adapter"),
                              "data": {"source": "bigbench:sports_understanding"},
                              "eval": {"metrics": "choice", "max_examples": 4, "progress": False},
                              "retention": {"tasks": ["date_understanding"], "max_examples": 10},
                              "output_dir": str(tmp_path / "eval")})
    result = run_job(job, log=lambda s: None)
    r = result["retention"]
    assert r["after"]["examples"] == r["base"]["examples"] == 10
    assert r["delta"]["accuracy"] == pytest.approx(r["after"]["accuracy"] - r["base"]["accuracy"])
    # the base side is the model without the adapter: the same as scoring the bare model
    from floe.models import load_model

    bare, tok = load_model(str(model_dir))
    assert r["base"]["accuracy"] == pytest.approx(evaluate_retention(bare, tok, job.retention)["accuracy"])
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["retention"]["delta"]["accuracy"] == pytest.approx(r["delta"]["accuracy"])
