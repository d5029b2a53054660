"""Command line and YAML config: help, did-you-mean errors, flag overrides, an end-to-end `floe train`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from floe.cli import build_parser, job_from_args, main
from floe.config import ConfigError, from_dict
from floe.jobs import TrainJob
from train_helpers import save_tiny_model_folder, write_alpaca_jsonl


def _job(argv):
    args = build_parser().parse_args(["train", *argv])
    from floe.cli import TRAIN_FLAGS

    return job_from_args(TrainJob, args, TRAIN_FLAGS)


def test_every_subcommand_has_complete_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "train" in sub.choices
    for name, p in sub.choices.items():
        text = p.format_help()
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"floe {name} {action.option_strings} has no help text"
        assert len(text) > 200, name


def test_unknown_config_key_suggests_the_right_one(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("adapter:\n  rank: 8\n")
    with pytest.raises(ConfigError, match=r"adapter\.rank.*did you mean 'r'"):
        _job(["--config", str(cfg)])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*did you mean 'train'"):
        from_dict(TrainJob, {"trian": {}})


def test_wrong_type_names_the_field(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  max_steps: lots\n")
    with pytest.raises(ConfigError, match=r"train\.max_steps: expected an integer, got 'lots'"):
        _job(["--config", str(cfg)])
    with pytest.raises(ConfigError, match=r"adapter.*num_experts must be a positive integer"):
        _job(["--experts", "0"])


def test_flags_override_yaml_and_layers_parse(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("adapter:\n  r: 16\n  layers: [1, 2]\ntrain:\n  max_steps: 7\n")
    job = _job(["--config", str(cfg), "--r", "4", "--layers", "0,3-5", "--set", "train.warmup_ratio=0.1"])
    assert job.adapter.r == 4 and job.adapter.layers == [0, 3, 4, 5]
    assert job.train.max_steps == 7 and job.train.warmup_ratio == 0.1
    assert _job(["--config", str(cfg), "--layers", "all"]).adapter.layers is None


def test_missing_config_file_is_a_clean_error(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml not found" in capsys.readouterr().err


def test_floe_train_end_to_end_on_a_local_model_folder(tmp_path):
    model_dir = save_tiny_model_folder(tmp_path / "tiny")
    data = write_alpaca_jsonl(tmp_path / "d.jsonl", 20)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "floe.cli", "train", "--model", str(model_dir), "--data", str(data),
         "--steps", "3", "--r", "2", "--experts", "1", "--layers", "1,2", "--batch-size", "2",
         "--max-length", "64", "--output-dir", str(out), "--export-peft", "--set", "train.report_to=[]"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation loss" in proc.stdout and "peak memory" in proc.stdout
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["steps"] == 3
    cfg = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [1, 2]
