"""A resumed search is visible and tidy: it says which dead worker's trial it waits for and how
long, and trial working folders live under the output folder and go when a trial ends or is
abandoned."""
from __future__ import annotations

import re
import signal
from pathlib import Path

import optuna
import pytest

from floe.search import SearchConfig, TrialFailed, search_rank

from test_search import FAST, _finished_in, _load, _spawn, _wait_for, analytic


def test_each_trial_runs_in_a_folder_under_the_output_folder_removed_when_it_ends(tmp_path):
    seen: list[tuple[Path, bool]] = []

    def objective(r, m, report):
        workdir = Path(report.workdir)
        (workdir / "checkpoint.bin").write_bytes(b"x")
        seen.append((workdir, workdir.is_dir()))
        assert report.trial_number == len(seen) - 1
        if len(seen) == 2:
            raise TrialFailed("diverged")  # a failed trial's folder goes too
        return analytic(r, m)

    res = search_rank(objective, SearchConfig(n_trials=3, seed=0, pruner="none", **FAST), output_dir=tmp_path)
    assert len(res.finished) == 3
    assert [d for d, existed in seen] == [tmp_path / "trials" / f"trial-{n}" for n in range(3)]
    assert all(existed for _, existed in seen)
    assert not (tmp_path / "trials").exists()  # every trial folder removed, then the empty parent
    names = {p.name for p in tmp_path.iterdir()}
    assert {"search.db", "search.json", "search.png"} <= names <= {"search.db", "search.json", "search.png",
                                                                  "search_contour.png"}


def test_the_training_objective_uses_the_trial_folder_the_search_gives(tmp_path, monkeypatch):
    from conftest import make_tokenizer, tiny_model
    from train_helpers import tokenized

    from floe.search import make_training_objective, objective as objective_module
    from floe.training import TrainConfig

    real_mkdtemp = objective_module.tempfile.mkdtemp

    def no_system_temp(*args, **kwargs):
        folder = kwargs.get("dir") or (args[2] if len(args) > 2 else None)
        if folder is None or tmp_path not in Path(folder).parents:
            raise AssertionError(f"a folder was made outside the search's output folder: {folder}")
        return real_mkdtemp(*args, **kwargs)

    monkeypatch.setattr(objective_module.tempfile, "mkdtemp", no_system_temp)
    data = tokenized(16, tmp_path)
    objective = make_training_objective(lambda: tiny_model("llama"), make_tokenizer(), data, data,
                                        TrainConfig(max_steps=2, batch_size=4, learning_rate=1e-3),
                                        layers=[1], eval_points=1)
    used: list[Path] = []

    def spy(r, m, report):
        used.append(Path(report.workdir))
        return objective(r, m, report)

    out = tmp_path / "search"
    res = search_rank(spy, SearchConfig(n_trials=1, r_max=4, experts=[2], pruner="none", **FAST), output_dir=out)
    assert res.best is not None and used == [out / "trials" / "trial-0"]
    assert not (out / "trials").exists()


@pytest.mark.slow
def test_a_resumed_search_says_what_it_waits_for_and_removes_the_dead_trials_folder(tmp_path):
    n = 4
    proc = _spawn(tmp_path, n, 3.0, tmp_path / "calls-1.log")
    try:
        _wait_for(lambda: _finished_in(tmp_path) >= n - 1, 120, f"{n - 1} finished trials")
        _wait_for(lambda: any(t.state == optuna.trial.TrialState.RUNNING and "r" in t.params
                              for t in _load(tmp_path / "search.db").get_trials()), 30, "a running trial")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    dead = next(t for t in _load(tmp_path / "search.db").get_trials() if t.state == optuna.trial.TrialState.RUNNING)
    assert (tmp_path / "trials" / f"trial-{dead.number}").is_dir()  # the killed worker left its folder

    lines: list[str] = []
    res = search_rank(lambda r, m, report: analytic(r, m), SearchConfig(n_trials=n, seed=0, pruner="none", **FAST),
                      output_dir=tmp_path, log=lines.append)
    assert len(res.finished) == n
    waits = [ln for ln in lines if ln.startswith("[floe] waiting for")]
    assert waits, lines
    assert re.search(rf"waiting for trial {dead.number} \(r={dead.params['r']}, M={dead.params['num_experts']}\), "
                     r"last heartbeat \d+s ago: .*declared abandoned after 2s without a heartbeat "
                     r"\(at most \d+s more\)", waits[0]), waits[0]
    assert any(f"trial(s) [{dead.number}] declared abandoned" in ln for ln in lines), lines
    assert not (tmp_path / "trials").exists()  # the dead trial's folder was removed
