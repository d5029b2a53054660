"""Same seed, same result; every input error one line; re-runs and resumes keep the records."""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pkgutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, tiny_model
from train_helpers import (
    KillAfter,
    Killed,
    save_tiny_model_folder,
    tokenized,
    write_alpaca_jsonl,
)
from transformers import TrainerCallback

from floe.adapters.moe_lora import MoELoraConfig, adapter_state_dict, apply_moe_lora
from floe.checkpoints import RECORD_FILE
from floe.cli import main
from floe.training import TrainConfig, train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _train_argv(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(data), "--steps", "4", "--set", "adapter.r=2",
            "--experts", "2", "--batch-size", "2", "--max-length", "64", "--output-dir", str(out),
            "--dropout", "0.1", "--set", "train.report_to=[]", "--set", "train.progress_bar=false",
            "--set", "train.save_steps=2", "--set", "train.logging_steps=1", *extra]


@pytest.fixture
def tiny_job(tmp_path):
    return save_tiny_model_folder(tmp_path / "tiny"), write_alpaca_jsonl(tmp_path / "d.jsonl", 24)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "/runs/" not in f"/{p.relative_to(folder)}"}


# ---------------------------------------------------------------- 1. reproducibility

def test_same_seed_gives_byte_identical_adapters_and_losses_and_another_seed_differs(tiny_job, tmp_path):
    model_dir, data = tiny_job
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        assert main(_train_argv(model_dir, data, tmp_path / name, "--seed", str(seed))) == 0
    adapter = lambda n: (tmp_path / n / "adapter" / "adapter_model.safetensors").read_bytes()  # noqa: E731
    metrics = {n: json.loads((tmp_path / n / "train_metrics.json").read_text()) for n in "abc"}
    assert adapter("a") == adapter("b")
    assert metrics["a"]["train_losses"] == metrics["b"]["train_losses"]
    assert metrics["a"]["final_eval_loss"] == metrics["b"]["final_eval_loss"]
    assert adapter("a") != adapter("c")


def test_adapter_init_follows_the_seed_and_leaves_the_global_generator_alone():
    models = [tiny_model("llama") for _ in range(3)]  # (tiny_model seeds the global generator itself)

    def init(m, seed):
        m = apply_moe_lora(m, MoELoraConfig(r=4, num_experts=2), seed=seed)
        return adapter_state_dict(m)

    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = init(models[0], 5), init(models[1], 5), init(models[2], 6)
    assert torch.equal(torch.rand(3), before)  # seeded init did not consume the global stream
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if ".lora_A." in k)


@pytest.mark.slow
def test_same_seed_under_torchrun_gives_identical_adapters(tiny_job, tmp_path):
    model_dir, data = tiny_job

    def run(name):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "floe.cli", *_train_argv(model_dir, data, tmp_path / name, "--seed", "11")]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=ENV, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return (tmp_path / name / "adapter" / "adapter_model.safetensors").read_bytes()

    assert run("ddp1") == run("ddp2")


# ---------------------------------------------------------------- 2. one error path

def _bad_inputs(tmp: Path, model_dir: Path, data: Path) -> dict[str, list[str]]:
    (tmp / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", \n')
    (tmp / "nofield.jsonl").write_text('{"instruction": "a"}\n')
    (tmp / "empty.jsonl").write_text("")
    cut = tmp / "cut_adapter"
    m = tiny_model("llama")
    m = apply_moe_lora(m, MoELoraConfig(r=2, num_experts=2))
    from floe.adapters.moe_lora import save_adapter

    save_adapter(m, cut)
    w = cut / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    typo = tmp / "allocate.yaml"
    typo.write_text(f"model: {{name: {model_dir}}}\nallocate: {{budget_rnk: 4}}\n")

    def t(out, *extra, data_=data):
        return _train_argv(model_dir, data_, tmp / out, *extra)

    return {
        "malformed JSONL line": t("o1", data_=tmp / "bad.jsonl"),
        "missing field": t("o2", data_=tmp / "nofield.jsonl"),
        "empty data file": t("o3", data_=tmp / "empty.jsonl"),
        "missing data file": t("o4", data_=tmp / "nope.jsonl"),
        "unknown model": ["train", "--model", "no-such-model-xyz", "--data", str(data), "--output-dir", str(tmp / "o5")],
        "layer out of range": t("o6", "--layers", "99"),
        "bad dtype": t("o7", "--dtype", "int8"),
        "unknown target module": t("o8", "--targets", "foo_proj"),
        "export-peft with M > 1": t("o9", "--export-peft"),
        "max-length too small": t("o10", "--max-length", "4"),
        "unknown bigbench task": t("o11", data_="bigbench:no_such_task_xyz"),
        "empty --layers": t("o12", "--layers", ""),
        "empty range": t("o13", "--layers", "5-2"),
        "rank above min(d_in, d_out)": t("o14", "--set", "adapter.r=4096"),
        "truncated adapter (select)": ["select", "--model", str(model_dir), "--adapter", str(cut), "--data", str(data),
                                       "--max-length", "64", "--output", str(tmp / "o15")],
        "top-k not a number (select)": ["select", "--model", str(model_dir), "--adapter", str(cut), "--data", str(data),
                                        "--top-k", "abc", "--output", str(tmp / "o16")],
        "allocate batch size 0": ["allocate", "--model", str(model_dir), "--data", str(data), "--batch-size", "0",
                                  "--output", str(tmp / "o17")],
        "allocate config key with a typo": ["allocate", "--config", str(typo), "--output", str(tmp / "o18")],
        "allocate without --output": ["allocate", "--model", str(model_dir), "--data", str(data)],
    }


@pytest.mark.slow
def test_every_input_error_is_one_line_exit_2_without_traceback(tiny_job, tmp_path):
    model_dir, data = tiny_job
    cases = _bad_inputs(tmp_path, model_dir, data)

    def run(argv):
        return subprocess.run([sys.executable, "-m", "floe", *argv], check=False, capture_output=True, text=True,
                              env=ENV, timeout=300)

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(cases, pool.map(run, cases.values())))
    failures = []
    for name, proc in results.items():
        # transformers' own progress bars and warnings may precede it; FLoE prints exactly one line
        err = [line for line in proc.stderr.splitlines() if line.strip() and "it/s]" not in line
               and not line.startswith("[transformers]")]
        if proc.returncode != 2 or "Traceback" in proc.stderr or len(err) != 1 or "error:" not in err[0]:
            failures.append(f"{name}: exit {proc.returncode}, stderr:\n{proc.stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)
    # nothing half-written by the failed starts
    for i in range(1, 19):
        out = tmp_path / f"o{i}"
        assert not out.exists() or not any(out.iterdir()), out


def test_debug_flag_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(Exception, match="not found"):
        main(["train", "--debug", "--config", str(tmp_path / "nope.yaml")])
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    import floe.jobs

    def boom(job, log=print):
        raise KeyError("a bug, not an input error")

    monkeypatch.setattr(floe.jobs, "run_train", boom)
    with pytest.raises(KeyError):
        main(["train", "--output-dir", str(tmp_path / "x")])


# ---------------------------------------------------------------- 4. re-runs and resumes keep the records

def test_rerunning_a_finished_job_changes_no_file(tiny_job, tmp_path, capsys):
    model_dir, data = tiny_job
    out = tmp_path / "run"
    assert main(_train_argv(model_dir, data, out)) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main(_train_argv(model_dir, data, out)) == 0
    assert "finished" in capsys.readouterr().out
    assert _snapshot(out) == before


def test_a_run_with_other_settings_in_the_same_folder_writes_nothing(tiny_job, tmp_path, capsys):
    model_dir, data = tiny_job
    out = tmp_path / "run"
    assert main(_train_argv(model_dir, data, out)) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main(_train_argv(model_dir, data, out, "--set", "adapter.r=3")) == 2
    err = capsys.readouterr().err
    assert "adapter.r: 2 -> 3" in err and "--output-dir" in err and "--overwrite" in err
    assert _snapshot(out) == before
    assert main(_train_argv(model_dir, data, out, "--set", "adapter.r=3", "--overwrite")) == 0
    assert json.loads((out / "train_metrics.json").read_text())["run_config"]["adapter"]["r"] == 3




def _fresh_model():
    m = tiny_model("qwen2")
    m = apply_moe_lora(m, MoELoraConfig(r=4, num_experts=2, lora_dropout=0.1), seed=0)
    return m


def _cfg(out: Path, **kw) -> TrainConfig:
    return dataclasses.replace(TrainConfig(output_dir=str(out), learning_rate=5e-3, max_steps=8, batch_size=4,
                                           logging_steps=1, save_steps=2, save_total_limit=3, report_to=[],
                                           progress_bar=False, seed=3), **kw)


def test_resume_keeps_the_untrained_loss_history_and_time(tmp_path):
    data, tok = tokenized(24, tmp_path), make_tokenizer()
    straight = train(_fresh_model(), tok, data, data, _cfg(tmp_path / "straight"))
    with pytest.raises(Killed):
        train(_fresh_model(), tok, data, data, _cfg(tmp_path / "resumed"), callbacks=[KillAfter(4)])
    first_part = json.loads((tmp_path / "resumed" / "checkpoint-4" / RECORD_FILE).read_text())
    res = train(_fresh_model(), tok, data, data, _cfg(tmp_path / "resumed"))
    assert res.initial_eval_loss == straight.initial_eval_loss is not None
    assert [s for s, _ in res.train_losses] == [s for s, _ in straight.train_losses] == list(range(1, 9))
    torch.testing.assert_close([v for _, v in res.train_losses], [v for _, v in straight.train_losses])
    assert res.train_seconds > first_part["train_seconds"] > 0
    saved = json.loads((tmp_path / "resumed" / "train_metrics.json").read_text())
    assert saved["initial_eval_loss"] == straight.initial_eval_loss


def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_ends_as_an_uninterrupted_one(tmp_path, caplog):
    data, tok = tokenized(24, tmp_path), make_tokenizer()
    ref = _fresh_model()
    train(ref, tok, data, None, _cfg(tmp_path / "straight"))
    with pytest.raises(Killed):
        train(_fresh_model(), tok, data, None, _cfg(tmp_path / "resumed"), callbacks=[KillAfter(6)])
    (tmp_path / "resumed" / "checkpoint-6" / "trainer_state.json").unlink()  # a save cut short
    again = _fresh_model()
    with caplog.at_level("WARNING", logger="floe.training"):
        res = train(again, tok, data, None, _cfg(tmp_path / "resumed"))
    assert any("checkpoint-6" in r.message and "skipping" in r.message for r in caplog.records)
    assert res.steps == 8
    a, b = adapter_state_dict(ref), adapter_state_dict(again)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)


def test_a_checkpoint_without_its_record_is_incomplete(tmp_path):
    from floe.checkpoints import complete_checkpoints

    data, tok = tokenized(8, tmp_path), make_tokenizer()
    train(_fresh_model(), tok, data, None, _cfg(tmp_path / "r", max_steps=4))
    assert [p.name for p in complete_checkpoints(tmp_path / "r")] == ["checkpoint-4", "checkpoint-2"]
    (tmp_path / "r" / "checkpoint-4" / RECORD_FILE).unlink()
    opt = tmp_path / "r" / "checkpoint-2" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    assert complete_checkpoints(tmp_path / "r") == []


def test_a_checkpoint_with_a_cut_adapter_file_is_incomplete(tmp_path):
    """Checkpoints are PEFT's (written by the Trainer): a cut adapter_model.safetensors is damage."""
    from floe.checkpoints import complete_checkpoints

    data, tok = tokenized(8, tmp_path), make_tokenizer()
    train(_fresh_model(), tok, data, None, _cfg(tmp_path / "r", max_steps=4))
    w = tmp_path / "r" / "checkpoint-4" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    (tmp_path / "r" / "checkpoint-2" / "adapter_config.json").unlink()
    assert complete_checkpoints(tmp_path / "r") == []


# ---------------------------------------------------------------- 7. small gaps

def test_warmup_that_rounds_to_zero_steps_does_not_waste_the_first_step(tmp_path):
    data, tok = tokenized(8, tmp_path), make_tokenizer()
    lrs = []

    class _LR(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kw):
            lrs.append(optimizer.param_groups[0]["lr"])

    train(_fresh_model(), tok, data, None, _cfg(tmp_path / "w", max_steps=4, warmup_ratio=0.03), callbacks=[_LR()])
    assert lrs[0] > 0
    # a warm-up of >= 1 step is kept
    lrs.clear()
    train(_fresh_model(), tok, data, None, _cfg(tmp_path / "w2", max_steps=10, warmup_ratio=0.2), callbacks=[_LR()])
    assert lrs[1] > lrs[0] and max(lrs) == pytest.approx(5e-3)


def test_summary_of_a_single_logged_loss_has_no_fake_range():
    from floe.jobs import summarise
    from floe.training import TrainResult

    r = TrainResult(steps=1, train_losses=[(1, 2.5)], eval_losses=[], initial_eval_loss=None, final_eval_loss=None,
                    seconds_per_step=None, train_seconds=0.1, peak_memory_mb=1, peak_memory_kind="rss",
                    trainable_params=1, total_params=2, adapter_dir=None)
    text = summarise(r)
    assert "->" not in text.split("training loss")[1].splitlines()[0]


def test_rank_above_a_target_dimension_is_refused():
    from floe.adapters.moe_lora import AdapterError

    with pytest.raises(AdapterError, match=r"r=64 exceeds min\(d_in, d_out\).*r <= 32"):
        apply_moe_lora(tiny_model("llama"), MoELoraConfig(r=64, num_experts=2))


@pytest.mark.parametrize("text", ["", "5-2", "1,,2", "a", "-1"])
def test_layers_flag_rejects_empty_and_malformed_text(text):
    import argparse

    from floe.flags import parse_layers

    with pytest.raises(argparse.ArgumentTypeError, match="0,3,5-7"):
        parse_layers(text)


# ---------------------------------------------------------------- 10. floe.train works more than once

def test_floe_train_can_be_called_twice_and_exports_survive_submodule_imports(tmp_path):
    import floe

    data, tok = tokenized(8, tmp_path), make_tokenizer()
    for i in range(2):
        m = _fresh_model()
        res = floe.train(m, tok, data, None, _cfg(tmp_path / f"t{i}", max_steps=2))
        assert res.steps == 2
    before = {name: getattr(floe, name) for name in floe.__all__}
    for info in pkgutil.walk_packages(floe.__path__, "floe."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    for name in floe.__all__:
        assert getattr(floe, name) is before[name], name
        assert not isinstance(getattr(floe, name), type(floe)) or name == "__version__", name



def test_skipped_examples_are_reported_once_across_the_splits(tmp_path, caplog):
    from floe.data import load_data

    rows = [json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(rows[:5] + ['{"instruction": "x"'] + rows[5:]) + "\n")
    with caplog.at_level("WARNING", logger="floe.data"):
        for split in ("train", "validation"):
            load_data(str(tmp_path / "d.jsonl"), make_tokenizer(), split=split, max_length=64, on_error="skip")
    assert sum("skipped 1" in r.getMessage() for r in caplog.records) == 1
