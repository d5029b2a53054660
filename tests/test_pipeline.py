"""`floe run`: stages cached by fingerprint, baselines train what they should, LISA redraws, reports."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, tiny_model
from train_helpers import save_tiny_model_folder, tokenized, write_alpaca_jsonl

from floe.adapters.moe_lora import MoELoraConfig, apply_moe_lora
from floe.config import from_dict
from floe.errors import InputError
from floe.pipeline import RunConfig, run
from floe.pipeline import layers as L

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _config(tmp: Path, **over) -> RunConfig:
    model_dir = tmp / "tiny"
    if not model_dir.exists():
        save_tiny_model_folder(model_dir)
        write_alpaca_jsonl(tmp / "d.jsonl", 48)
    tree = {"method": "floe", "k": 2, "compare": ["moe_lora", "lisa"], "seed": 3,
            "model": {"name": str(model_dir)}, "data": {"source": str(tmp / "d.jsonl"), "max_length": 64},
            "adapter": {"r": 2, "num_experts": 2},
            "train": {"max_steps": 4, "batch_size": 4, "report_to": [], "progress_bar": False, "save_steps": 2,
                      "logging_steps": 1, "learning_rate": 5e-3},
            "warmup_run": {"max_steps": 3}, "select": {"batch_size": 4, "max_examples": 12, "config": {"heldout_batches": 1}},
            "lisa_interval": 2, "eval": {"max_examples": 4, "max_new_tokens": 4, "progress": False},
            "output_dir": str(tmp / "run")}
    for key, value in over.items():
        node = tree
        *path, leaf = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = value
    return from_dict(RunConfig, tree)


def _ran(lines: list[str]) -> list[str]:
    """The stages that ran (not skipped) according to the log."""
    return [ln.split("]")[1].split(":")[0].strip() for ln in lines if ": running in " in ln]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    log: list[str] = []
    summary = run(_config(tmp), log=log.append)
    return tmp, summary, log


def test_pipeline_runs_end_to_end_and_records_every_stage(finished_run):
    tmp, summary, log = finished_run
    assert _ran(log) == ["warmup", "select", "floe/train", "floe/eval", "moe_lora/train", "moe_lora/eval",
                         "lisa/train", "lisa/eval"]
    saved = json.loads((tmp / "run" / "run.json").read_text())
    assert set(saved["methods"]) == {"floe", "moe_lora", "lisa"}
    floe = saved["methods"]["floe"]
    assert len(floe["layers"]) == 2
    assert floe["layers"] == saved["stages"]["select"]["result"]["chosen"]
    assert saved["methods"]["moe_lora"]["layers"] is None
    for m in saved["methods"].values():
        assert {"test_loss", "exact_match", "rouge_l"} <= set(m["scores"])
        assert m["steps"] == 4 and m["eval_losses"][0][0] == 0
    assert all(s["peak_memory_mb"] > 0 and s["seconds"] > 0 for s in saved["stages"].values())


def test_a_run_loads_the_model_once_per_stage_that_runs_it(tmp_path, monkeypatch):
    # the layer count comes from the model's config; each stage that trains or selects loads the weights
    # once, and each evaluation reuses the model its training stage left in this process
    import floe.models

    loads: list[str] = []
    real = floe.models.load_model

    def counting(*args, **kwargs):
        loads.append(str(args[0] if args else kwargs.get("name_or_path")))
        return real(*args, **kwargs)

    monkeypatch.setattr(floe.models, "load_model", counting)
    log: list[str] = []
    run(_config(tmp_path, compare=["moe_lora"]), log=log.append)
    assert _ran(log) == ["warmup", "select", "floe/train", "floe/eval", "moe_lora/train", "moe_lora/eval"]
    assert len(loads) == 4  # warmup, select, floe/train, moe_lora/train


def test_the_old_warmup_section_name_is_read_with_a_deprecation_warning(tmp_path):
    with pytest.warns(FutureWarning, match="'warmup' is deprecated: rename it to 'warmup_run'"):
        cfg = from_dict(RunConfig, {"warmup": {"max_steps": 7}})
    assert cfg.warmup_run.max_steps == 7
    with pytest.raises(InputError, match="both 'warmup' and 'warmup_run' are set"):
        from_dict(RunConfig, {"warmup": {"max_steps": 7}, "warmup_run": {"max_steps": 7}})


def test_the_same_config_again_runs_no_stage(finished_run):
    tmp, summary, _ = finished_run
    log: list[str] = []
    again = run(_config(tmp), log=log.append)
    assert _ran(log) == []
    assert again["methods"] == summary["methods"]


def test_changing_one_field_reruns_exactly_the_stages_downstream(finished_run):
    tmp, _, _ = finished_run
    log: list[str] = []
    shared = {"output_dir": str(tmp / "other"), "stage_root": str(tmp / "run" / "stages"), "compare": []}
    run(_config(tmp, **{"eval.max_new_tokens": 5, **shared}), log=log.append)
    assert _ran(log) == ["floe/eval"]
    log.clear()
    other = run(_config(tmp, **{"select.config.budget": 0.4, **shared}), log=log.append)
    # the warm-up is reused; the training (and its evaluation) re-run exactly when the chosen layer set changed
    same = sorted(other["methods"]["floe"]["layers"]) == sorted(finished_run[1]["methods"]["floe"]["layers"])
    assert _ran(log) == ["select"] + ([] if same else ["floe/train", "floe/eval"])


def test_a_run_killed_in_a_stage_resumes_without_redoing_finished_ones(tmp_path, monkeypatch):
    import floe.evaluation

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(floe.evaluation, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        run(_config(tmp_path, compare=[]), log=lambda s: None)
    monkeypatch.undo()
    log: list[str] = []
    run(_config(tmp_path, compare=[]), log=log.append)
    assert _ran(log) == ["floe/eval"]


def test_bad_config_fails_before_any_stage(tmp_path):
    with pytest.raises(InputError, match=r"unknown 'flo'.*did you mean 'floe'"):
        _config(tmp_path, method="flo")
    with pytest.raises(InputError, match="compare: unknown method 'lora2'"):
        _config(tmp_path, compare=["lora2"])
    with pytest.raises(InputError, match=r"k=9 is out of range"):
        run(_config(tmp_path, k=9), log=lambda s: None)
    with pytest.raises(InputError, match="no such file"):
        run(_config(tmp_path, **{"data.source": str(tmp_path / "missing.jsonl")}), log=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_position_and_random_baselines_choose_the_layers_they_name():
    assert L.first_layers(30, 4) == [0, 1, 2, 3]
    assert L.last_layers(30, 4) == [26, 27, 28, 29]
    assert L.spread_layers(30, 4) == [0, 10, 19, 29]
    assert L.spread_layers(30, 30) == list(range(30))
    a, b = L.random_layers(30, 8, seed=1), L.random_layers(30, 8, seed=2)
    assert len(set(a)) == 8 and a == sorted(a) and a == L.random_layers(30, 8, seed=1) and a != b


def test_a_selection_that_is_a_position_baseline_is_named_as_one():
    assert L.position_match([26, 28, 29, 24, 23, 27, 22, 25], 30) == "last"  # rank order, the grid's choice
    assert L.position_match([2, 0, 1], 30) == "first"
    assert L.position_match([29, 0, 19, 10], 30) == "spread"
    assert L.position_match([21, 23, 24, 25, 26, 27, 28, 29], 30) is None
    assert L.position_match(list(range(30)), 30) is None  # every layer: no choice was made
    assert "`last` position baseline" in L.position_note([27, 28, 29], 30)
    assert L.position_note([0, 5], 30) is None


def test_a_layer_list_in_any_order_or_naming_every_layer_keys_the_same_training(finished_run):
    from floe.adapters.moe_lora import MoELoraConfig, adapter_state_dict
    from floe.pipeline.baselines import attach_peft

    settings = MoELoraConfig(r=2, num_experts=2)
    listed, unlisted = tiny_model(), tiny_model()
    listed = apply_moe_lora(listed, MoELoraConfig(r=2, num_experts=2, layers_to_transform=[3, 1, 0, 2]), seed=5)
    unlisted = apply_moe_lora(unlisted, MoELoraConfig(r=2, num_experts=2), seed=5)
    a, b = adapter_state_dict(listed), adapter_state_dict(unlisted)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    ranked, ordered = tiny_model(), tiny_model()  # a subset in rank order or sorted: the same adapter
    ranked = apply_moe_lora(ranked, MoELoraConfig(r=2, num_experts=2, layers_to_transform=[2, 0]), seed=5)
    ordered = apply_moe_lora(ordered, MoELoraConfig(r=2, num_experts=2, layers_to_transform=[0, 2]), seed=5)
    a, b = adapter_state_dict(ranked), adapter_state_dict(ordered)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    listed, unlisted = tiny_model(), tiny_model()
    attach_peft(listed, "lora", settings, [0, 1, 2, 3], 4, seed=5)
    attach_peft(unlisted, "lora", settings, None, 4, seed=5)
    a, b = ({n: p for n, p in m.named_parameters() if p.requires_grad} for m in (listed, unlisted))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert L.train_key([3, 1, 0, 2], 4) is None and L.train_key([2, 0], 4) == [0, 2] and L.train_key(None, 4) is None
    # so random (or FLoE) on all 4 layers reuses the full-layer MoE-LoRA training and evaluation
    tmp, summary, _ = finished_run
    log: list[str] = []
    again = run(_config(tmp, method="random", k=4, compare=[], output_dir=str(tmp / "all4"),
                        stage_root=str(tmp / "run" / "stages")), log=log.append)
    assert _ran(log) == []
    assert again["methods"]["random"]["scores"] == summary["methods"]["moe_lora"]["scores"]


def test_floe_select_table_names_a_choice_that_is_a_position_baseline():
    from floe.selection import Selection
    from floe.selection.cli import format_table

    sel = Selection(scorer="random", num_layers=4, scores=[0.1, 0.2, 0.4, 0.3], ranking=[2, 3, 1, 0], chosen=[2, 3])
    assert "exactly the last 2 of 4" in format_table(sel)
    sel.chosen = [2, 1]
    assert "position baseline" not in format_table(sel)


@pytest.mark.parametrize("layers", [None, [0, 3], [1]])
def test_moe_lora_baselines_train_exactly_their_adapter_parameters(layers):
    model = tiny_model("llama")  # hidden 32, intermediate 48, 4 layers
    r, m = 2, 3
    model = apply_moe_lora(model, MoELoraConfig(r=r, num_experts=m, layers_to_transform=layers))
    per_module = {"gate_proj": (32, 48), "up_proj": (32, 48), "down_proj": (48, 32)}
    by_hand = sum(r * d_in + m * d_out * r + m * d_in for d_in, d_out in per_module.values())
    n_layers = 4 if layers is None else len(layers)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n_layers * by_hand


def test_lisa_trains_only_the_drawn_layers_and_redraws_them(tmp_path):
    from floe.pipeline.lisa import LisaCallback, adapter_params_by_layer
    from floe.training import TrainConfig, train

    model = tiny_model("llama")
    model = apply_moe_lora(model, MoELoraConfig(r=2, num_experts=2, lora_dropout=0.0), seed=0)
    params = adapter_params_by_layer(model)
    snapshots = []

    class Watch(LisaCallback):
        def on_step_begin(self, args, state, control, **kw):
            super().on_step_begin(args, state, control, **kw)
            snapshots.append(([[p.detach().clone() for p in params[i]] for i in range(4)], list(self.active)))

    cb = Watch(model, k=1, interval=2, seed=5)
    train(model, make_tokenizer(), tokenized(16, tmp_path), None,
          TrainConfig(output_dir=str(tmp_path / "lisa"), max_steps=8, batch_size=4, learning_rate=1e-2,
                      report_to=[], progress_bar=False, save_steps=100, warmup_ratio=0.0), callbacks=[cb])
    assert len(snapshots) == 8
    # steps i and i+1: only the layer active during step i moved
    for (before, active), (after, _) in zip(snapshots, snapshots[1:]):
        moved = [i for i in range(4) if any(not torch.equal(a, b) for a, b in zip(before[i], after[i]))]
        assert set(moved) <= set(active), (moved, active)
    draws = [layers for _, layers in cb.history]
    assert [s for s, _ in cb.history] == [0, 2, 4, 6]
    assert draws == [L.lisa_draw(4, 1, 5, d) for d in range(4)] and len({tuple(d) for d in draws}) > 1
    assert all(p.requires_grad for ps in params.values() for p in ps)  # all trainable again after training


def test_report_compares_runs_in_markdown_and_self_contained_html(finished_run, tmp_path):
    from floe.pipeline.report import write_report

    tmp, _, _ = finished_run
    paths = write_report([str(tmp / "run")], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    page = (tmp_path / "report" / "report.html").read_text()
    for method in ("floe", "moe_lora", "lisa"):
        assert f"| {method} |" in md and f"<td>{method}</td>" in page
    assert page.count("data:image/png;base64,") >= 2  # loss curves + the FLoE layer heatmap
    assert "src='loss_curves.png'" not in page and any(p.name == "loss_curves.png" for p in paths)


def test_report_pools_seeds_into_mean_and_std():
    from floe.pipeline.report import _mean_std

    assert _mean_std([1.0, 2.0, 3.0]) == "2.0000 ± 1.0000"
    assert _mean_std([0.5]) == "0.5000" and _mean_std([]) == "-"


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_baselines_train_exactly_their_parameters(method, tmp_path):
    from floe.adapters.moe_lora import MoELoraConfig
    from floe.pipeline.baselines import attach_peft
    from floe.training import TrainConfig, train

    model = tiny_model("llama")  # hidden 32, intermediate 48
    model = attach_peft(model, method, MoELoraConfig(r=2, num_experts=1), None, total_steps=2, seed=0)
    per_module = {"gate_proj": (32, 48), "up_proj": (32, 48), "down_proj": (48, 32)}
    by_hand = sum(2 * (d_in + d_out) + (d_out if method == "dora" else 0) for d_in, d_out in per_module.values())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 * by_hand
    res = train(model, make_tokenizer(), tokenized(8, tmp_path), None,
                TrainConfig(output_dir=str(tmp_path / method), max_steps=2, batch_size=4, report_to=[],
                            progress_bar=False, learning_rate=1e-2))
    assert res.trainable_params == 4 * by_hand and (tmp_path / method / "adapter" / "adapter_model.safetensors").is_file()


def test_peft_baselines_run_in_the_pipeline_and_evaluate_from_a_cached_stage(finished_run):
    tmp, _, _ = finished_run
    shared = {"output_dir": str(tmp / "peft"), "stage_root": str(tmp / "run" / "stages"), "compare": ["adalora"]}
    first = run(_config(tmp, method="lora", **shared), log=lambda s: None)
    log: list[str] = []
    import shutil

    eval_dirs = [v["dir"] for k, v in first["stages"].items() if k.endswith("/eval")]
    for d in eval_dirs:
        shutil.rmtree(d)  # evaluation again, from the adapters the train stages saved
    again = run(_config(tmp, method="lora", **shared), log=log.append)
    assert _ran(log) == ["lora/eval", "adalora/eval"]
    for m in ("lora", "adalora"):
        assert again["methods"][m]["scores"]["test_loss"] == pytest.approx(first["methods"][m]["scores"]["test_loss"], abs=1e-5)
