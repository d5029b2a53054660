"""A failed `floe search` start leaves nothing in the way: every input is checked before the
study (or its folder) exists, and a study with no finished trial is re-bound to a corrected
objective instead of refusing it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from floe.search import SearchConfig, SearchError, default_storage_url, open_storage, open_study, search_rank

from test_search import FAST, counting_objective

ROOT = Path(__file__).resolve().parent.parent


def _floe(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "floe.cli", *args], check=False, capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from train_helpers import save_tiny_model_folder, write_alpaca_jsonl

    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_model_folder(root / "model"), write_alpaca_jsonl(root / "data.jsonl", 40)


def _args(model: Path, data: str, out: Path, *extra: str) -> list[str]:
    return ["search", "--model", str(model), "--data", data, "--steps", "2", "--eval-points", "2",
            "--batch-size", "2", "--max-length", "64", "--r-max", "4", "--experts", "2", "--pruner", "none",
            "--trials", "2", "--output", str(out), *extra]


@pytest.mark.slow
def test_a_search_started_with_a_bad_data_path_then_the_corrected_one_finishes_its_trials(tmp_path, tiny):
    model, data = tiny
    out = tmp_path / "search"
    bad = _floe(*_args(model, str(tmp_path / "dta.jsonl"), out))
    assert bad.returncode == 2, bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("floe search: error:") and "dta.jsonl" in lines[0], bad.stderr
    assert not out.exists()  # no folder, no search.db, no study bound to the typo

    good = _floe(*_args(model, str(data), out))
    assert good.returncode == 0, good.stderr
    result = json.loads((out / "search.json").read_text())
    assert result["n_finished"] == 2
    assert not (out / "trials").exists()  # trial working folders are gone


@pytest.mark.parametrize("extra, message", [
    (("--layers", "7"), "out of range"),  # the tiny model has 4 decoder layers
    (("--targets", "q_prj"), "q_prj"),
])
def test_bad_layers_or_targets_are_refused_before_anything_is_written(tmp_path, tiny, capsys, extra, message):
    from floe.cli import main as floe_main

    def main(argv):
        return floe_main(["search", *argv])

    model, data = tiny
    out = tmp_path / "search"
    assert main(_args(model, str(data), out, *extra)[1:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_empty_data_is_refused_before_anything_is_written(tmp_path, tiny, capsys):
    from floe.cli import main as floe_main

    def main(argv):
        return floe_main(["search", *argv])

    model, _ = tiny
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "search"
    assert main(_args(model, str(empty), out)[1:]) == 2
    assert "empty" in capsys.readouterr().err.lower()
    assert not out.exists()


def test_a_mismatched_existing_study_is_refused_before_the_model_is_loaded(tmp_path, tiny, capsys):
    from floe.cli import main as floe_main

    def main(argv):
        return floe_main(["search", *argv])

    model, data = tiny
    out = tmp_path / "search"
    assert main(_args(model, str(data), out)[1:]) == 0
    before = (out / "search.db").read_bytes()
    capsys.readouterr()
    # another --steps is another objective, and the study has finished trials: refused, nothing changed
    assert main(_args(model, str(data), out, "--steps", "4", "--model", str(tmp_path / "not-loaded"))[1:]) == 2
    err = capsys.readouterr().err
    assert "another objective" in err and "train.max_steps: study has 2, this search 4" in err
    assert "does not exist" not in err  # refused on the study, before the (missing) model was looked at
    assert (out / "search.db").read_bytes() == before


# ----------------------------------------------------------------------------- re-binding a study


def _bind(tmp_path: Path, context: dict, config: SearchConfig) -> optuna.Study:
    url = default_storage_url(tmp_path)
    return open_study(open_storage(url, config), "floe-search", config, context)


def test_a_study_without_finished_trials_is_rebound_to_the_corrected_objective(tmp_path):
    cfg = SearchConfig(n_trials=3, **FAST)
    study = _bind(tmp_path, {"data": "typo.jsonl"}, cfg)
    stale = study.ask()  # a trial an earlier (failed) start left behind, closed without a result
    study.tell(stale, state=optuna.trial.TrialState.FAIL)
    lines: list[str] = []
    res = search_rank(counting_objective([]), cfg, output_dir=tmp_path, context={"data": "data.jsonl"},
                      log=lines.append)
    assert len(res.finished) == 3
    rebound = [ln for ln in lines if "re-bound" in ln]
    assert len(rebound) == 1 and "typo.jsonl" in rebound[0] and "data.jsonl" in rebound[0]
    assert _bind(tmp_path, {"data": "data.jsonl"}, cfg).user_attrs["floe_search_context"] == {"data": "data.jsonl"}


def test_a_study_with_a_finished_or_running_trial_is_not_rebound(tmp_path):
    cfg = SearchConfig(n_trials=2, **FAST)
    search_rank(counting_objective([]), SearchConfig(n_trials=1, **FAST), output_dir=tmp_path,
                context={"data": "a"})
    with pytest.raises(SearchError, match="another objective"):
        search_rank(counting_objective([]), cfg, output_dir=tmp_path, context={"data": "b"})

    other = tmp_path / "other"
    other.mkdir()
    study = _bind(other, {"data": "a"}, cfg)
    running = study.ask()  # alive: it has its parameters
    running.suggest_int("r", 2, 32, step=2)
    with pytest.raises(SearchError, match="another objective"):
        search_rank(counting_objective([]), cfg, output_dir=other, context={"data": "b"})


def test_a_killed_first_start_whose_trial_lost_its_heartbeat_is_rebound(tmp_path):
    """The first start was killed inside trial 0 (no trial finished): once that trial's heartbeat
    is older than the grace period, a corrected search re-binds the study instead of refusing it."""
    import time

    cfg = SearchConfig(n_trials=2, **FAST)
    study = _bind(tmp_path, {"lr": 1.0}, cfg)
    dead = study.ask()
    dead.suggest_int("r", 2, 32, step=2)
    study._storage.record_heartbeat(dead._trial_id)  # what the killed worker's heartbeat thread left
    with pytest.raises(SearchError, match="another objective"):  # within the grace period: maybe alive
        search_rank(counting_objective([]), cfg, output_dir=tmp_path, context={"lr": 0.1})
    time.sleep(FAST["grace_period"] + 1.5)
    lines: list[str] = []
    res = search_rank(counting_objective([]), cfg, output_dir=tmp_path, context={"lr": 0.1}, log=lines.append)
    assert len(res.finished) == 2 and any("re-bound" in ln and "lr: study has 1.0" in ln for ln in lines), lines
