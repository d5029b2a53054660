"""Command line and YAML config: help, did-you-mean errors, flag overrides, `floe allocate --config`,
`python -m floe`, one import direction, an end-to-end `floe train`."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import floe
from floe.cli import build_parser, main
from floe.config import ConfigError, from_dict
from floe.flags import job_from_args
from floe.jobs import TrainJob
from floe.train_cli import TRAIN_FLAGS
from train_helpers import save_tiny_model_folder, write_alpaca_jsonl


def _job(argv):
    return job_from_args(TrainJob, build_parser().parse_args(["train", *argv]), TRAIN_FLAGS)


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
    cfg.write_text("adapter:\n  r: 16\n  layers_to_transform: [1, 2]\ntrain:\n  max_steps: 7\n")
    job = _job(["--config", str(cfg), "--r", "4", "--layers", "0,3-5", "--set", "train.warmup_ratio=0.1"])
    assert job.adapter.r == 4 and job.adapter.layers_to_transform == [0, 3, 4, 5]
    assert job.train.max_steps == 7 and job.train.warmup_ratio == 0.1
    assert _job(["--config", str(cfg), "--layers", "all"]).adapter.layers_to_transform is None


def test_the_adapter_section_takes_peft_names_and_reads_the_old_ones_with_a_warning(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("adapter:\n  alpha: 16\n  dropout: 0.1\n  layers: [1, 2]\n")
    with pytest.warns(FutureWarning) as caught:
        job = _job(["--config", str(cfg), "--layers", "0,3"])  # the flag (new name) wins over the file's old key
    assert sorted(str(w.message) for w in caught if issubclass(w.category, FutureWarning)) == [
        f"config key 'adapter.{old}' is deprecated: rename it to 'adapter.{new}'"
        for old, new in (("alpha", "lora_alpha"), ("dropout", "lora_dropout"), ("layers", "layers_to_transform"))]
    assert (job.adapter.lora_alpha, job.adapter.lora_dropout, job.adapter.layers_to_transform) == (16.0, 0.1, [0, 3])
    cfg.write_text("adapter:\n  alpha: 16\n  lora_alpha: 8\n")
    with pytest.raises(ConfigError, match="both 'adapter.alpha' and 'adapter.lora_alpha' are set"):
        _job(["--config", str(cfg)])


def test_any_peft_lora_field_can_be_set_and_changes_the_adapter_and_its_record(tmp_path):
    from conftest import tiny_model

    from floe.adapters.moe_lora import apply_moe_lora, moe_lora_modules
    from floe.config import to_dict
    from floe.pipeline import RunConfig
    from floe.pipeline.experiment import cell_fingerprint

    cfg = tmp_path / "c.yaml"
    cfg.write_text("adapter:\n  r: 4\n  use_rslora: true\n")
    job = _job(["--config", str(cfg)])
    assert to_dict(job.adapter)["use_rslora"] is True and "use_rslora" not in to_dict(_job([]).adapter)
    layer = next(iter(moe_lora_modules(apply_moe_lora(tiny_model(), job.adapter)).values()))
    assert layer.scaling == pytest.approx(32.0 / 2.0)  # lora_alpha / sqrt(r), not / r
    plain, rslora = RunConfig(), from_dict(RunConfig, {"adapter": {"use_rslora": True}})
    assert cell_fingerprint(plain) != cell_fingerprint(rslora)


def test_print_config_lists_the_adapter_under_peft_names(capsys):
    assert main(["train", "--print-config"]) == 0
    out = capsys.readouterr().out
    section = out[out.index("adapter:"):out.index("train:")]
    for name in ("r", "num_experts", "lora_alpha", "lora_dropout", "target_modules", "layers_to_transform"):
        assert f"\n  {name}: " in section, name
    assert "  alpha:" not in section and "use_dora" not in section  # PEFT's other fields stay out unless set


def test_missing_config_file_is_a_clean_error(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml not found" in capsys.readouterr().err


@pytest.mark.slow
def test_floe_train_end_to_end_on_a_local_model_folder(tmp_path):
    model_dir = save_tiny_model_folder(tmp_path / "tiny")
    data = write_alpaca_jsonl(tmp_path / "d.jsonl", 20)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "floe.cli", "train", "--model", str(model_dir), "--data", str(data),
         "--steps", "3", "--r", "2", "--experts", "1", "--layers", "1,2", "--batch-size", "2",
         "--max-length", "64", "--output-dir", str(out), "--export-peft", "--set", "train.report_to=[]"],
        check=False, capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation loss" in proc.stdout and "peak memory" in proc.stdout
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["steps"] == 3
    cfg = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [1, 2]


def test_no_module_imports_back_from_the_entry_point():
    """floe.cli registers the sub-commands; only the ``python -m`` entry points may import it."""
    src = Path(floe.__file__).parent
    offenders = []
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if "floe.cli" in names and path.name != "__main__.py":
                offenders.append(f"{path.relative_to(src)}:{node.lineno}")
    assert not offenders, offenders


@pytest.mark.slow
def test_python_dash_m_floe_is_the_floe_command():
    proc = subprocess.run([sys.executable, "-m", "floe", "train", "--print-config"], check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("model:\n  name: smollm2-135m") and "\ntrain:\n" in proc.stdout


# ----------------------------------------------------------------------------- floe allocate --config

def _allocate_job(argv):
    from floe.allocate.cli import job_from

    return job_from(build_parser().parse_args(["allocate", *argv]))


def test_allocate_reads_a_train_config_flags_and_set_like_the_other_commands(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("model: {name: tiny, dtype: bfloat16}\ndata: {source: d.jsonl, max_length: 96, on_error: skip}\n"
                   "adapter: {r: 4}\ntrain: {max_steps: 3}\n"
                   "allocate: {budget_rank: 4, num_passes: 3, output: out, target_modules: [down_proj]}\n")
    job = _allocate_job(["--config", str(cfg)])
    assert (job.model.name, job.model.dtype, job.data.source, job.data.max_length) == ("tiny", "bfloat16", "d.jsonl", 96)
    a = job.allocate
    assert (a.budget_rank, a.num_passes, a.output, a.target_modules, a.batch_size) == (4, 3, "out", ("down_proj",), 4)
    # a flag wins over the file, even when it gives the default value; --set wins over both
    job = _allocate_job(["--config", str(cfg), "--budget-rank", "8", "--model", "other", "-o", "o2",
                         "--set", "allocate.min_rank=2", "--set", "data.max_length=64"])
    assert (job.allocate.budget_rank, job.model.name, job.allocate.output) == (8, "other", "o2")
    assert (job.allocate.min_rank, job.data.max_length) == (2, 64)
    assert job.allocate.allocate_config().budget_rank == 8 and not hasattr(job.allocate.allocate_config(), "output")
    # without a file: the flag defaults of before
    job = _allocate_job([])
    assert (job.model.name, job.data.source, job.data.max_length) == ("smollm2-135m", "bigbench:natural_instructions", 512)
    assert (job.allocate.budget_rank, job.allocate.seed, job.allocate.no_plot) == (8, 0, False)


def test_allocate_config_keeps_its_older_spellings_and_refuses_typos(tmp_path):
    cfg = tmp_path / "old.yaml"
    cfg.write_text("model: {name: ignored}\n"
                   "allocate: {model: tiny, dtype: float16, data: d.jsonl, max_length: 80, budget-rank: 2}\n")
    job = _allocate_job(["--config", str(cfg)])
    assert (job.model.name, job.model.dtype, job.data.source, job.data.max_length) == ("tiny", "float16", "d.jsonl", 80)
    assert job.allocate.budget_rank == 2
    cfg.write_text("allocate: {budget_rnk: 4}\n")
    with pytest.raises(ConfigError, match="did you mean 'budget_rank'"):
        _allocate_job(["--config", str(cfg)])
    cfg.write_text("allocate: {method: svd}\n")
    with pytest.raises(Exception, match="method must be fim"):
        _allocate_job(["--config", str(cfg)])


def test_allocate_print_config_and_errors_go_through_the_one_handler(tmp_path, capsys):
    assert main(["allocate", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "allocate:\n  budget_rank: 8  # Average rank" in out and "  output: null  #" in out
    assert main(["allocate", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml not found" in capsys.readouterr().err
    assert main(["allocate", "--model", "tiny"]) == 2  # no output folder: refused before the model is loaded
    assert capsys.readouterr().err.startswith("floe allocate: error: --output is required")


def test_print_config_shows_the_job_as_the_file_flags_and_set_resolve_it(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train: {max_steps: 11}\nselect: {config: {top_k: 5}}\n")
    assert main(["run", str(cfg), "--print-config", "--set", "select.config.mask_rule=kwon"]) == 0
    out = capsys.readouterr().out
    assert "\n  max_steps: 11  # Stop after" in out and "    top_k: 5  #" in out and "    mask_rule: kwon  #" in out
    assert main(["train", "--print-config", "--steps", "7", "--r", "4"]) == 0
    out = capsys.readouterr().out
    assert "  max_steps: 7  #" in out and "  r: 4  #" in out
    assert main(["run", "--print-config"]) == 0  # no file: the defaults
    assert "  max_steps: -1  # Stop after" in capsys.readouterr().out
    assert main(["run", str(cfg), "--print-config", "--set", "select.k=3"]) == 2  # a bad key is an error here too
    assert "unknown config key 'select.k'" in capsys.readouterr().err
