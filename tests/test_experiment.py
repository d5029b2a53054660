"""`floe experiment`: resumable grids, shared stages, and summary statistics checked by hand."""
from __future__ import annotations

import json
import math
import shutil

import pytest

from floe.config import from_dict
from floe.errors import InputError
from floe.pipeline.experiment import Grid, cells, finished, rerun_cell, run_grid, summarise, t_interval
from train_helpers import save_tiny_model_folder, write_alpaca_jsonl


def _row(variant, seed, loss, rouge, k=8, data="d"):
    return {"variant": variant, "seed": seed, "k": k, "data": data, "trainable_share": 0.01, "seconds_per_step": 1.0,
            "metrics": {"final_eval_loss": loss, "test_loss": loss, "rouge_l": rouge, "exact_match": 0.0}}


def test_t_interval_matches_a_hand_computation():
    diffs = [0.1, 0.3, 0.2]  # mean 0.2, sd 0.1, t(0.975, 2) = 4.302653
    mean, lo, hi = t_interval(diffs)
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert mean == pytest.approx(0.2) and lo == pytest.approx(0.2 - half, abs=1e-5) and hi == pytest.approx(0.2 + half, abs=1e-5)


def test_summary_reports_mean_std_and_paired_differences_against_random():
    rows = [_row("floe", 1, 2.0, 0.30), _row("floe", 2, 2.2, 0.32), _row("floe", 3, 2.1, 0.34),
            _row("random", 1, 2.1, 0.30), _row("random", 2, 2.4, 0.30), _row("random", 3, 2.2, 0.31)]
    text = summarise(rows)
    floe_line = next(line for line in text.splitlines() if line.startswith("| floe "))
    assert "2.1000 ± 0.1000" in floe_line  # test loss over seeds
    # paired test-loss differences -0.1, -0.2, -0.1: mean -0.1333, sd 0.0577
    half = 4.302653 * 0.057735 / math.sqrt(3)
    interval = f"{-0.13333:+.4f} [{-0.13333 - half:+.4f}, {-0.13333 + half:+.4f}] (n=3)"
    assert floe_line.count(interval) == 2  # validation loss and test loss (equal in these rows)
    random_line = next(line for line in text.splitlines() if line.startswith("| random "))
    assert random_line.rstrip(" |").endswith("- | -")


def test_a_full_layer_reference_is_paired_with_random_at_its_only_k():
    rows = [_row("random", 1, 2.1, 0.30), _row("random", 2, 2.4, 0.30),
            _row("moe_lora", 1, 2.0, 0.30, k=30), _row("moe_lora", 2, 2.0, 0.30, k=30)]
    line = next(line for line in summarise(rows).splitlines() if line.startswith("| moe_lora "))
    assert "-0.2500 [" in line and "(n=2)" in line  # differences -0.1 and -0.4
    rows += [_row("random", 1, 2.0, 0.30, k=30)]  # random at two ks: no pairing across k
    line = next(line for line in summarise(rows).splitlines() if line.startswith("| moe_lora "))
    assert "-0.2500" not in line and "+0.0000 (n=1)" in line


def test_a_cut_last_line_of_the_results_file_is_ignored(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"fingerprint": "a", "x": 1}) + "\n" + '{"fingerprint": "b", "x"')
    assert list(finished(path)) == ["a"]


def test_cells_cover_the_grid_once_and_share_one_stage_root(tmp_path):
    grid = from_dict(Grid, {"name": "g", "variants": {"floe": {"method": "floe"}, "all": {"method": "moe_lora"},
                                                       "kwon": {"method": "floe", "select.config.mask_rule": "kwon"}},
                             "k": [2, 4], "seeds": [1, 2], "data": ["x.jsonl"], "run_dir": str(tmp_path)})
    got = cells(grid)
    assert len(got) == 2 * (2 * 2 + 1)  # moe_lora has no k: one cell per seed
    assert {cfg.stage_root for _, _, cfg in got} == {str(tmp_path / "stages")}
    kwon = [cfg for _, v, cfg in got if v == "kwon"]
    assert all(cfg.select.config.mask_rule == "kwon" and cfg.compare == [] for cfg in kwon)


def test_settings_of_one_data_entry_reach_only_that_data_sets_cells(tmp_path):
    grid = from_dict(Grid, {"name": "g", "variants": {"r": {"method": "random"}}, "k": [2], "seeds": [1],
                            "base": {"data": {"max_per_task": 20}}, "run_dir": str(tmp_path),
                            "data": ["a.jsonl", {"source": "b.jsonl", "data.max_per_task": None}]})
    by_source = {cfg.data.source: cfg for _, _, cfg in cells(grid)}
    assert by_source["a.jsonl"].data.max_per_task == 20 and by_source["b.jsonl"].data.max_per_task is None
    assert [c for c, _, _ in cells(grid)] == ["r-k2-s1-a.jsonl", "r-k2-s1-b.jsonl"]
    bad = from_dict(Grid, {"name": "g", "data": [{"data.max_per_task": None}]})
    with pytest.raises(InputError, match="needs a source"):
        cells(bad)


@pytest.mark.slow
def test_a_tiny_grid_resumes_and_a_cell_rerun_reproduces_its_recorded_loss(tmp_path):
    from floe.pipeline.runner import run

    save_tiny_model_folder(tmp_path / "tiny")
    write_alpaca_jsonl(tmp_path / "d.jsonl", 40)
    base = {"model": {"name": str(tmp_path / "tiny")}, "data": {"max_length": 64},
            "adapter": {"r": 2, "num_experts": 2},
            "train": {"max_steps": 3, "batch_size": 4, "report_to": [], "progress_bar": False, "logging_steps": 1},
            "eval": {"max_examples": 4, "max_new_tokens": 4, "progress": False, "metrics": "loss"}}
    grid = from_dict(Grid, {"name": "tiny", "base": base, "variants": {"random": {"method": "random"},
                                                                       "last": {"method": "last"}},
                             "k": [2], "seeds": [1, 2], "data": [str(tmp_path / "d.jsonl")],
                             "results": str(tmp_path / "tiny.jsonl"), "run_dir": str(tmp_path / "runs")})
    assert run_grid(grid, log=lambda s: None) == 4
    rows = [json.loads(line) for line in (tmp_path / "tiny.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["variant"] for r in rows} == {"random", "last"}
    assert run_grid(grid, log=lambda s: None) == 0  # finished cells are skipped
    # re-run one cell from its recorded config, in a fresh folder: same validation loss
    row = rows[0]
    cfg = from_dict(type(cells(grid)[0][2]), {**row["config"], "output_dir": str(tmp_path / "again"), "stage_root": ""})
    shutil.rmtree(tmp_path / "runs")
    again = run(cfg, log=lambda s: None)
    assert again["methods"][row["method"]]["final_eval_loss"] == row["metrics"]["final_eval_loss"]
    # the same through `floe experiment --rerun CELL`, which records both losses
    out = rerun_cell(grid, row["cell"], log=lambda s: None)
    recorded = json.loads((tmp_path / "reruns.jsonl").read_text().splitlines()[-1])
    assert recorded == json.loads(json.dumps(out))
    assert out["rerun_final_eval_loss"] == row["metrics"]["final_eval_loss"] and out["difference"] == 0.0
    with pytest.raises(InputError, match="no finished cell"):
        rerun_cell(grid, "no-such-cell", log=lambda s: None)


def test_recorded_grid_cells_keep_their_fingerprints_when_config_fields_are_added():
    """Every committed results line still matches the cell its grid builds today: fields added to the run
    config since (retention, train.keep_best, ...) hold their defaults there and stay out of the fingerprint,
    so `floe experiment` does not rerun finished cells."""
    from pathlib import Path

    from floe.pipeline.experiment import cell_fingerprint, cells, finished, load_grid

    root = Path(__file__).resolve().parents[1]
    for name in ("table2", "table3", "equal_time", "long"):
        grid = load_grid(root / "benchmarks" / "grids" / f"{name}.yaml")
        recorded = {r["cell"]: r["fingerprint"] for r in finished(root / grid.results_path).values()}
        built = {cell: cell_fingerprint(cfg) for cell, _, cfg in cells(grid)}
        assert recorded, name
        for cell, fp in recorded.items():
            assert built.get(cell) == fp, f"{name}: {cell}"


def test_a_field_added_later_changes_the_fingerprint_only_when_it_is_set():
    from floe.pipeline import RunConfig
    from floe.pipeline.experiment import cell_fingerprint

    base = from_dict(RunConfig, {"method": "random"})
    assert cell_fingerprint(from_dict(RunConfig, {"method": "random", "train": {"keep_best": False}})) == \
        cell_fingerprint(base)
    assert cell_fingerprint(from_dict(RunConfig, {"method": "random", "train": {"keep_best": True}})) != \
        cell_fingerprint(base)
    assert cell_fingerprint(from_dict(RunConfig, {"method": "random", "retention": {"tasks": ["navigate"]}})) != \
        cell_fingerprint(base)
