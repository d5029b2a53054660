"""Every YAML file the documentation points to (configs/, benchmarks/grids/) parses and validates
through the job builder of each command that reads it, and the job holds every value the file gives.

Run configs go through ``floe run --print-config --config FILE``, train configs through ``floe train``
and the other commands a train config serves (README, "Command line"), grids through
``floe.pipeline.experiment.load_grid`` and ``cells``. Nothing here loads a model or data.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from floe.cli import build_parser, main
from floe.config import to_dict

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted([*(ROOT / "configs").glob("*.yaml"), *(ROOT / "benchmarks" / "grids").glob("*.yaml")])
# The commands a train config serves, with the arguments each needs besides --config (as in the README).
TRAIN_CONFIG_COMMANDS = {"train": [], "select": ["--adapter", "runs/warmup/adapter"], "eval": [], "search": [],
                         "allocate": ["--output", "runs/allocate"]}


def _tree(path: Path) -> dict[str, Any]:
    tree = yaml.safe_load(path.read_text())
    assert isinstance(tree, dict), f"{path}: the top level must be a mapping"
    return tree


def kind(path: Path) -> str:
    """``grid``, ``train`` (every top-level key is a ``floe train`` job key) or ``run``."""
    from floe.jobs import TrainJob

    tree = _tree(path)
    if {"variants", "base_config"} & set(tree):
        return "grid"
    return "train" if set(tree) <= {f.name for f in dataclasses.fields(TrainJob)} else "run"


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key → value of every leaf of a nested mapping (lists and empty sections are leaves)."""
    if isinstance(tree, dict) and (tree or not prefix):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def assert_holds(job: Any, given: dict[str, Any], where: str) -> None:
    """Every leaf of ``given`` has that value in ``job`` (nothing dropped or renamed on the way)."""
    built = leaves(to_dict(job))
    wrong = {k: (v, built.get(k, "(missing)")) for k, v in leaves(given).items() if built.get(k, "(missing)") != v}
    assert not wrong, f"{where}: given -> built {wrong}"


def test_the_files_are_found_and_each_kind_is_checked():
    assert {kind(p) for p in FILES} == {"grid", "train", "run"}, [_name(p) for p in FILES]


@pytest.mark.parametrize("path", [p for p in FILES if kind(p) == "run"], ids=_name)
def test_run_config_builds_the_floe_run_job_it_describes(path, capsys):
    from floe.flags import job_from_args
    from floe.pipeline.cli import RUN_FLAGS
    from floe.pipeline.config import RunConfig

    assert main(["run", "--print-config", "--config", str(path)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().err == ""
    job = job_from_args(RunConfig, build_parser().parse_args(["run", "--config", str(path)]), RUN_FLAGS)
    assert_holds(job, _tree(path), _name(path))


@pytest.mark.parametrize("path", [p for p in FILES if kind(p) == "train"], ids=_name)
def test_train_config_builds_the_floe_train_job_it_describes(path):
    from floe.train_cli import job_from

    job = job_from(build_parser().parse_args(["train", "--config", str(path)]))
    assert_holds(job, _tree(path), _name(path))


@pytest.mark.parametrize("command", sorted(TRAIN_CONFIG_COMMANDS))
@pytest.mark.parametrize("path", [p for p in FILES if kind(p) == "train"], ids=_name)
def test_train_config_serves_every_command_that_reads_one(path, command, capsys):
    assert main([command, "--print-config", "--config", str(path), *TRAIN_CONFIG_COMMANDS[command]]) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr()
    assert out.err == "" and "model:" in out.out


@pytest.mark.parametrize("path", [p for p in FILES if kind(p) == "grid"], ids=_name)
def test_grid_loads_and_every_cell_is_a_valid_run_config_with_its_settings(path, monkeypatch):
    from floe.pipeline.config import RunConfig
    from floe.pipeline.experiment import cells, load_grid

    monkeypatch.chdir(ROOT)  # a grid names its base_config relative to the repository
    grid = load_grid(path)
    built = cells(grid)
    assert built, f"{_name(path)}: no cells"
    assert len({cell for cell, _, _ in built}) == len(built)
    assert {variant for _, variant, _ in built} == set(grid.variants)
    base = leaves(_tree(ROOT / grid.base_config)) if grid.base_config else {}
    per_data = {e["source"]: leaves({k: v for k, v in e.items() if k != "source"})
                for e in grid.data if isinstance(e, dict)}  # settings of one data set only
    for cell, variant, cfg in built:
        assert isinstance(cfg, RunConfig) and cfg.compare == [], cell
        given = {**base, **leaves(grid.base), **per_data.get(cfg.data.source, {}), **leaves(grid.variants[variant])}
        assert_holds(cfg, given, f"{_name(path)} cell {cell}")
