"""Rank / expert search: reproducible TPE, resume after a kill, parallel workers, failures,
caching, outputs, bad input, and the training objective on a tiny model.

Most tests use a cheap analytic objective. The subprocess workers run this file as a script
(see ``_worker_main`` at the bottom).
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from floe.search import (
    SearchConfig, SearchError, TrialFailed, default_storage_url, format_table, open_storage, open_study, search_rank,
)
from floe.search.states import is_counted

HERE = Path(__file__).resolve()


def analytic(r: int, m: int) -> float:
    """A smooth bowl with its minimum at r = 8, M = 3 (value 1.0)."""
    return 1.0 + 0.1 * (math.log2(r) - 3.0) ** 2 + 0.05 * (m - 3) ** 2


def counting_objective(calls: list, sleep: float = 0.0):
    def objective(r, m, report):
        calls.append((r, m))
        value = analytic(r, m)
        for step in (1, 2):
            report(value + 0.5 / step, step)
        if sleep:
            time.sleep(sleep)
        return value

    return objective


FAST = dict(heartbeat_interval=1, grace_period=2, poll_interval=0.05)


def _counted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if is_counted(t)]


def _load(db: Path, name: str = "floe-search") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=default_storage_url(db.parent))


# ----------------------------------------------------------------------------- reproducibility


def _sequence(seed: int, n: int = 14) -> list[tuple[int, int, str]]:
    res = search_rank(counting_objective([]), SearchConfig(n_trials=n, seed=seed, pruner="none"))
    return [(t.r, t.num_experts, t.state) for t in res.trials]


def test_tpe_with_a_fixed_seed_proposes_the_same_trials_again():
    a, b = _sequence(7), _sequence(7)
    assert a == b
    assert _sequence(8) != a  # the seed matters (45 x 3 configurations: equal sequences are ~impossible)


def test_tpe_search_finds_the_optimum_of_a_smooth_objective():
    res = search_rank(counting_objective([]), SearchConfig(n_trials=30, seed=0, pruner="none"))
    assert res.best is not None
    # independent reference: brute force over the whole grid
    cfg = SearchConfig()
    grid_best = min(analytic(r, m) for r in cfg.ranks() for m in cfg.experts)
    assert res.best.value <= grid_best * 1.02
    assert len(res.finished) == 30
    complete = [t for t in res.trials if t.state == "COMPLETE"]
    assert res.best.value == min(t.value for t in complete) == analytic(res.best.r, res.best.num_experts)


def test_a_resumed_search_proposes_new_points_instead_of_replaying_its_seed(tmp_path):
    calls: list = []
    cfg = dict(seed=3, pruner="none", n_startup_trials=50, **FAST)  # random proposals only
    search_rank(counting_objective(calls), SearchConfig(n_trials=6, **cfg), output_dir=tmp_path)
    res = search_rank(counting_objective(calls), SearchConfig(n_trials=12, **cfg), output_dir=tmp_path)
    assert len(res.finished) == 12
    first, second = [(t.r, t.num_experts) for t in res.trials[:6]], [(t.r, t.num_experts) for t in res.trials[6:]]
    assert first != second  # a per-process seed would replay the first six proposals as cache hits


# ----------------------------------------------------------------------------- caching


def test_repeated_configurations_reuse_the_cached_result_without_retraining():
    calls: list = []
    cfg = SearchConfig(r_min=2, r_max=4, r_step=2, experts=[2], n_trials=7, seed=0, pruner="none")
    res = search_rank(counting_objective(calls), cfg)
    assert sorted(calls) == [(2, 2), (4, 2)]  # two configurations exist: each trained once
    assert len(res.finished) == 7
    by_number = {t.number: t for t in res.trials}
    hits = [t for t in res.trials if t.cache_hit]
    assert len(hits) == 5
    for t in hits:
        src = by_number[t.cached_from]
        assert not src.cache_hit and (src.r, src.num_experts) == (t.r, t.num_experts)
        assert t.value == src.value == pytest.approx(analytic(t.r, t.num_experts))
        assert t.intermediate == src.intermediate  # replayed for the pruner and TPE


def test_a_configuration_that_failed_or_was_pruned_is_not_run_again():
    calls: list = []

    def objective(r, m, report):
        calls.append((r, m))
        if r == 2:
            raise TrialFailed("diverged")
        report(10.0 if r == 4 else 1.0, 1)
        return 1.0

    cfg = SearchConfig(r_min=2, r_max=6, r_step=2, experts=[2], n_trials=12, seed=1, pruner="median",
                       pruner_startup_trials=0)
    res = search_rank(objective, cfg)
    assert sorted(set(calls)) == sorted(calls)  # nothing trained twice
    for t in res.trials:
        if t.cache_hit and t.r == 2:
            assert t.state == "FAIL" and "diverged" in t.failure and f"trial {t.cached_from}" in t.failure
    assert len(res.finished) == 12


# ----------------------------------------------------------------------------- failures


def test_failed_trials_are_recorded_with_their_reason_and_the_study_goes_on(tmp_path):
    import torch

    def objective(r, m, report):
        if r == 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if r == 6:
            raise torch.OutOfMemoryError("CUDA out of memory (torch.OutOfMemoryError)")
        if r == 8:
            return float("nan")
        if r == 10:
            report(float("inf"), 3)
        if r == 12:
            raise TrialFailed("loss diverged at step 7")
        return analytic(r, m)

    cfg = SearchConfig(r_min=2, r_max=16, r_step=2, experts=[3], n_trials=12, seed=0, pruner="none", **FAST)
    url = default_storage_url(tmp_path)
    study = open_study(open_storage(url, cfg), "failures", cfg)
    for r in cfg.ranks():  # every configuration once, in order (Optuna's enqueue_trial works with the search)
        study.enqueue_trial({"r": r, "num_experts": 3})
    res = search_rank(objective, cfg, storage=url, study_name="failures")
    assert len(res.finished) == 12
    assert [t.r for t in res.trials[:8]] == cfg.ranks()
    fails = {t.r: t.failure for t in res.trials if t.state == "FAIL" and not t.cache_hit}
    assert set(fails) == {4, 6, 8, 10, 12}
    assert fails[4].startswith("out of memory") and fails[6].startswith("out of memory")
    assert "nan" in fails[8] and "inf" in fails[10] and "step 3" in fails[10]
    assert fails[12] == "loss diverged at step 7"
    assert res.best is not None and res.best.r not in fails


def test_an_unexpected_error_stops_the_search_and_is_not_counted():
    def objective(r, m, report):
        raise KeyError("a bug, not a trial failure")

    with pytest.raises(KeyError):
        search_rank(objective, SearchConfig(n_trials=3, pruner="none"))


# ----------------------------------------------------------------------------- pruning


def test_median_pruner_stops_trials_that_report_bad_intermediate_losses():
    steps_run: dict[int, int] = {}

    def objective(r, m, report):
        n = 0
        for step in range(1, 5):
            n += 1
            steps_run[(r, m)] = n
            report(analytic(r, m) + 1.0 / step, step)
        return analytic(r, m)

    res = search_rank(objective, SearchConfig(n_trials=25, seed=0, pruner="median", pruner_startup_trials=3))
    pruned = [t for t in res.trials if t.state == "PRUNED" and not t.cache_hit]
    assert pruned, format_table(res)
    for t in pruned:  # stopped before the last step, and worse than the best at that step
        assert steps_run[(t.r, t.num_experts)] < 4
        assert t.last_value > res.best.intermediate[t.last_step]


def test_successive_halving_pruner_stops_trials_behind_their_rung_and_records_true_values():
    steps_run: dict[tuple[int, int], int] = {}

    def objective(r, m, report):
        for step in range(1, 5):
            steps_run[(r, m)] = step
            report(analytic(r, m) + 1.0 / step, step)
        return analytic(r, m)

    res = search_rank(objective, SearchConfig(n_trials=12, seed=0, pruner="halving", halving_min_resource=1))
    assert len(res.finished) == 12
    pruned = [t for t in res.trials if t.state == "PRUNED" and not t.cache_hit]
    assert pruned, format_table(res)
    for t in pruned:  # stopped where it was pruned, behind an earlier trial at that rung
        assert steps_run[(t.r, t.num_experts)] == t.last_step
        earlier = [u.intermediate[t.last_step] for u in res.trials
                   if u.number < t.number and t.last_step in u.intermediate]
        assert t.last_value == analytic(t.r, t.num_experts) + 1.0 / t.last_step
        assert earlier and t.last_value > min(earlier)
    complete = [t for t in res.trials if t.state == "COMPLETE"]
    for t in complete:  # the recorded values are what the objective computed
        assert t.value == analytic(t.r, t.num_experts)
        assert t.intermediate == {s: analytic(t.r, t.num_experts) + 1.0 / s for s in range(1, 5)}
    assert res.best == min(complete, key=lambda t: (t.value, t.number))


def test_search_modules_import_one_way():
    """No import cycle inside floe.search: the report only reads states, the study drives the rest."""
    import ast
    import graphlib

    import floe.search

    folder = Path(floe.search.__file__).parent
    graph = {}
    for f in folder.glob("*.py"):
        deps = {n.module.split(".")[2] for n in ast.walk(ast.parse(f.read_text()))
                if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("floe.search.")}
        graph[f.stem] = deps
    list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle
    assert graph["report"] <= {"config", "states"}


# ----------------------------------------------------------------------------- outputs


def test_outputs_are_search_json_plot_and_a_readable_table(tmp_path):
    res = search_rank(counting_objective([]), SearchConfig(n_trials=6, seed=2, pruner="none", **FAST),
                      output_dir=tmp_path / "out")
    data = json.loads((tmp_path / "out" / "search.json").read_text())
    assert data["best"] == {"r": res.best.r, "num_experts": res.best.num_experts, "value": res.best.value,
                            "trial": res.best.number}
    assert data["n_finished"] == data["n_trials_requested"] == 6
    assert len(data["trials"]) == 6
    for t in data["trials"]:
        assert {"number", "r", "num_experts", "value", "state", "duration_s", "failure", "cache_hit"} <= set(t)
        assert t["state"] == "COMPLETE" and t["duration_s"] >= 0
        assert t["value"] == pytest.approx(analytic(t["r"], t["num_experts"]))
    assert (tmp_path / "out" / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "out" / "search_contour.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "out" / "search.db").is_file()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left
    table = format_table(res)
    assert f"best: r = {res.best.r}, M = {res.best.num_experts}" in table
    assert len(table.splitlines()) == 6 + 5


def test_the_contour_of_r_and_m_is_written_only_once_both_vary(tmp_path):
    one_m = SearchConfig(r_min=2, r_max=8, experts=[3], n_trials=3, seed=0, pruner="none", **FAST)
    res = search_rank(counting_objective([]), one_m, output_dir=tmp_path)
    assert len({t.r for t in res.trials}) > 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["search.db", "search.json", "search.png"]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, message", [
    (dict(r_min=8, r_max=4), "inverted"),
    (dict(experts=[]), "empty"),
    (dict(r_min=2, r_max=9, r_step=2), "multiple of r_step"),
    (dict(r_step=0), "r_step must be a positive integer"),
    (dict(experts=[0, 2]), ">= 1"),
    (dict(pruner="hyperband"), "pruner must be one of"),
    (dict(n_trials=0), "n_trials"),
])
def test_bad_search_ranges_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(SearchError, match=message):
        SearchConfig(**kwargs)


@pytest.mark.parametrize("url, message", [
    ("not a url", "not a database URL"),
    ("sqlite:///{tmp}/missing/search.db", "does not exist"),
    ("sqlite:///{tmp}/garbage.db", "file is not a database"),
    ("sqlite:///:memory:", "in-memory SQLite"),
    ("postgresql://user:s3cret@127.0.0.1:1/floe", "storage 'postgresql://user:\\*\\*\\*@127.0.0.1:1/floe'"),
])
def test_a_storage_that_cannot_be_opened_is_refused_before_any_trial(tmp_path, url, message):
    (tmp_path / "garbage.db").write_text("this is not sqlite")
    calls: list = []
    with pytest.raises(SearchError, match=message) as err:
        search_rank(counting_objective(calls), SearchConfig(n_trials=2), storage=url.format(tmp=tmp_path))
    assert "s3cret" not in str(err.value)
    assert calls == []


def test_a_study_with_another_search_space_or_objective_is_refused(tmp_path):
    search_rank(counting_objective([]), SearchConfig(n_trials=2, **FAST), output_dir=tmp_path, context={"steps": 10})
    calls: list = []
    with pytest.raises(SearchError, match=r"searches r in 2..32 step 2, M in \[2, 3, 4\].*r in 2..16"):
        search_rank(counting_objective(calls), SearchConfig(n_trials=4, r_max=16, **FAST), output_dir=tmp_path,
                    context={"steps": 10})
    with pytest.raises(SearchError, match="steps: study has 10, this search 20"):
        search_rank(counting_objective(calls), SearchConfig(n_trials=4, **FAST), output_dir=tmp_path,
                    context={"steps": 20})
    assert calls == []
    # a study of another tool under the same name
    optuna.create_study(study_name="foreign", storage=default_storage_url(tmp_path)).optimize(
        lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    with pytest.raises(SearchError, match="not made by floe search"):
        search_rank(counting_objective(calls), SearchConfig(n_trials=2, **FAST), output_dir=tmp_path,
                    study_name="foreign")


# ----------------------------------------------------------------------------- real processes


def _spawn(db_dir: Path, n_trials: int, sleep: float, log: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(HERE), "--out", str(db_dir), "--trials", str(n_trials), "--sleep", str(sleep),
         "--log", str(log), *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _trained(folder: Path) -> list[tuple[int, int]]:
    """(r, M) of every objective call logged by the workers."""
    return [tuple(map(int, line.split())) for log in sorted(folder.glob("calls-*.log"))
            for line in log.read_text().splitlines()]


def _finished_in(db_dir: Path) -> int:
    try:
        return len(_counted(_load(db_dir / "search.db")))
    except Exception:  # study not created yet
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_search_resumes_from_its_sqlite_file_with_exactly_n_finished_trials(tmp_path, sig):
    n = 10
    proc = _spawn(tmp_path, n, 0.4, tmp_path / "calls-1.log", "--sigterm")
    try:
        _wait_for(lambda: _finished_in(tmp_path) >= 3, 60, "three finished trials")
        _wait_for(lambda: any(t.state == optuna.trial.TrialState.RUNNING and "r" in t.params
                              for t in _load(tmp_path / "search.db").get_trials()), 10, "a running trial")
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode != 0  # it did not finish by itself
    before = {t.number: t.value for t in _counted(_load(tmp_path / "search.db"))}
    assert 3 <= len(before) < n

    calls: list = []
    res = search_rank(counting_objective(calls), SearchConfig(n_trials=n, seed=0, pruner="none", **FAST),
                      output_dir=tmp_path)
    after = {t.number: t.value for t in res.finished}
    assert len(after) == n == len(_counted(_load(tmp_path / "search.db")))
    assert all(after[k] == v for k, v in before.items())  # no finished trial lost or changed
    assert len(calls) <= n - len(before)  # only the missing ones were run
    interrupted = [t for t in res.trials if not t.counted]
    assert len(interrupted) >= 1  # the trial the signal cut short: closed, not counted ...
    queued = {(t.r, t.num_experts) for t in interrupted}
    assert queued <= {(t.r, t.num_experts) for t in res.finished}  # ... and its configuration run again


@pytest.mark.slow
def test_two_workers_share_one_study_without_running_a_trial_twice(tmp_path):
    n = 14
    procs = [_spawn(tmp_path, n, 0.3, tmp_path / f"calls-{i}.log", "--json", str(tmp_path / f"w{i}.json"))
             for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    workers = [json.loads((tmp_path / f"w{i}.json").read_text()) for i in range(2)]
    ran = [set(w["calls"]) for w in workers]
    assert not (ran[0] & ran[1])  # no trial number ran in both workers
    assert all(ran), "both workers should have trained something"
    study = _load(tmp_path / "search.db")
    assert len(_counted(study)) == n  # exactly n, not n + (workers - 1)
    trained = _trained(tmp_path)
    assert len(trained) == len(set(trained))  # no (r, M) trained twice, across workers too
    for t in _counted(study):
        assert t.value == pytest.approx(analytic(t.params["r"], t.params["num_experts"]))


@pytest.mark.slow
def test_a_configuration_running_in_one_worker_is_awaited_not_trained_again_by_another(tmp_path):
    # One configuration only, trained slowly: the second worker starts while the first trains
    # it, and must wait for that result instead of training it too.
    procs = [_spawn(tmp_path, 4, 3.0, tmp_path / f"calls-{i}.log", "--space", "4,4,2,2") for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    trained = _trained(tmp_path)
    assert trained == [(4, 2)]
    counted = _counted(_load(tmp_path / "search.db"))
    assert len(counted) == 4
    assert {t.value for t in counted} == {analytic(4, 2)}
    assert sum(bool(t.user_attrs.get("cache_hit")) for t in counted) == 3


# ----------------------------------------------------------------------------- the training objective


def test_training_objective_trains_each_trial_with_its_rank_and_experts(tmp_path):
    from conftest import make_tokenizer, tiny_model
    from train_helpers import tokenized

    from floe.adapters.moe_lora import moe_lora_modules
    from floe.search import make_training_objective
    from floe.training import TrainConfig

    data = tokenized(16, tmp_path)
    built: list = []

    def factory():
        built.append(tiny_model("llama"))
        return built[-1]

    objective = make_training_objective(
        factory, make_tokenizer(), data, data,
        TrainConfig(max_steps=4, learning_rate=5e-3, batch_size=4, seed=3, logging_steps=4),
        layers=[1, 2], eval_points=2)
    res = search_rank(objective, SearchConfig(r_min=2, r_max=8, r_step=2, experts=[2, 3], n_trials=2, seed=5,
                                              pruner="none"))
    assert len(res.finished) == 2 and len(built) == 2
    for trial, model in zip(res.trials, built):
        assert trial.state == "COMPLETE" and math.isfinite(trial.value)
        assert list(trial.intermediate) == [2]  # the mid-run validation loss (the last one is the value)
        mods = moe_lora_modules(model)
        assert {m.r for m in mods.values()} == {trial.r}
        assert {m.num_experts for m in mods.values()} == {trial.num_experts}
        assert {int(name.split(".")[2]) for name in mods} == {1, 2}
        assert 0 < trial.value < math.log(320) + 1  # a language-model loss over a 320-token vocabulary


def test_cli_refuses_bad_ranges_before_loading_anything(tmp_path, capsys):
    from floe.cli import main as floe_main

    def main(argv):
        return floe_main(["search", *argv])

    assert main(["--r-min", "16", "--r-max", "4", "--model", "no-such-model", "--output", str(tmp_path)]) == 2
    assert "inverted" in capsys.readouterr().err
    assert main(["--steps", "10", "--eval-points", "3", "--model", "no-such-model", "--output", str(tmp_path)]) == 2
    assert "multiple of eval_points" in capsys.readouterr().err


def test_cli_search_on_a_local_model_folder_writes_results_and_resumes(tmp_path, capsys):
    from train_helpers import save_tiny_model_folder, write_alpaca_jsonl

    from floe.cli import main as floe_main

    def main(argv):
        return floe_main(["search", *argv])

    model_dir = save_tiny_model_folder(tmp_path / "tiny")
    data = write_alpaca_jsonl(tmp_path / "d.jsonl", 40)
    out = tmp_path / "search"
    argv = ["--model", str(model_dir), "--data", str(data), "--steps", "2", "--eval-points", "2",
            "--batch-size", "2", "--max-length", "64", "--r-max", "8", "--experts", "2,3", "--pruner", "none",
            "--output", str(out)]
    assert main([*argv, "--trials", "1"]) == 0
    first = json.loads((out / "search.json").read_text())
    assert first["n_finished"] == 1 and first["best"]["r"] in (2, 4, 6, 8)
    assert (out / "search.png").is_file() and (out / "search.db").is_file()
    assert "best: r = " in capsys.readouterr().out
    # the same command with more trials continues the study: only the missing trial runs
    assert main([*argv, "--trials", "2"]) == 0
    assert "already has 1 finished trials: resuming" in capsys.readouterr().out
    second = json.loads((out / "search.json").read_text())
    assert second["n_finished"] == 2
    assert second["trials"][:1] == first["trials"]
    # another number of steps is another objective: refused, nothing trained
    assert main([*argv, "--trials", "3", "--steps", "4"]) == 2
    assert "max_steps" in capsys.readouterr().err


# ----------------------------------------------------------------------------- worker script


def _worker_main(argv: list[str]) -> None:
    """A search worker with the analytic objective: ``python tests/test_search.py --out DIR ...``."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--trials", type=int, required=True)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--log", required=True)
    p.add_argument("--json")
    p.add_argument("--sigterm", action="store_true")
    p.add_argument("--space", default="2,32,2,2-3-4", help="r_min,r_max,r_step,experts (experts joined by -)")
    a = p.parse_args(argv)
    r_min, r_max, r_step, experts = a.space.split(",")
    space = dict(r_min=int(r_min), r_max=int(r_max), r_step=int(r_step), experts=[int(m) for m in experts.split("-")])
    if a.sigterm:
        from floe.search.cli import install_sigterm_handler

        install_sigterm_handler()

    def objective(r, m, report):
        with open(a.log, "a") as f:
            f.write(f"{r} {m}\n")
        time.sleep(a.sleep)
        return analytic(r, m)

    res = search_rank(objective, SearchConfig(n_trials=a.trials, seed=0, pruner="none", **space, **FAST),
                      output_dir=a.out)
    if a.json:
        Path(a.json).write_text(json.dumps({"calls": res.worker_calls}))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent.parent / "src"))
    _worker_main(sys.argv[1:])
