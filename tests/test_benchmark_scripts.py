"""The benchmark scripts of issue 13 run end to end in smoke mode and record what they print."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from floe.pipeline.experiment import t_interval

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_inference_latency_smoke_records_every_variant_and_its_ratios(tmp_path):
    out = tmp_path / "inference_latency.json"
    _script("inference_latency").main(["--smoke", "--generate", "--reps", "2", "--new-tokens", "3",
                                       "--out", str(out)], log=lambda s: None)
    saved = json.loads(out.read_text())
    rows = {(r["variant"], r["batch"]): r for r in saved["results"]}
    variants = ("base", "moe_lora_all", "moe_lora_k", "lora_merged")
    assert set(rows) == {(v, b) for v in variants for b in (1, 8)}
    metrics = ("prefill_ms", "decode_ms_per_token", "generate_ms")
    for (v, b), row in rows.items():
        for m in metrics:
            assert len(row[m]["samples"]) == 2 and all(x > 0 for x in row[m]["samples"])
            assert row[m]["median"] > 0
            if v != "base":
                want = row[m]["median"] / rows[("base", b)][m]["median"]
                assert math.isclose(row[m]["ratio_to_base"], want)
    assert all(d > 0 for d in saved["max_abs_logit_diff_vs_base"].values())
    assert saved["variants"]["moe_lora_all"]["adapter_modules"] == 4 * 3
    k_variant = saved["variants"]["moe_lora_k"]
    assert k_variant["layers"] == [2, 3] and k_variant["adapter_modules"] == 6
    assert saved["machine"]["torch_threads"] >= 1 and saved["machine"]["dtype"] == "float32"


@pytest.mark.slow
def test_pipeline_cost_smoke_records_every_stage_and_the_equal_time_run(tmp_path):
    out_dir, out = tmp_path / "runs", tmp_path / "pipeline_cost.json"
    bench = _script("pipeline_cost")
    bench.main(["--smoke", "--out-dir", str(out_dir), "--out", str(out)], log=lambda s: None)
    saved = json.loads(out.read_text())
    st = saved["stages"]
    assert set(st) == {"warmup", "select", "floe/train", "floe/eval", "moe_lora/train", "moe_lora/eval",
                       *(f"floe_equal_time/{s}" for s in ("warmup", "select", "train", "eval"))}
    for name, s in st.items():
        assert s["seconds"] > 0 and s["peak_memory_mb"] > 0, name
    assert {"taylor", "fisher", "tuning"} <= set(st["select"]["timings"]) and len(st["select"]["chosen"]) == 2
    tot, sps = saved["totals"], saved["seconds_per_step"]
    floe_total = st["warmup"]["seconds"] + st["select"]["seconds"] + st["floe/train"]["seconds"]
    assert math.isclose(tot["floe_total_seconds"], floe_total)
    assert math.isclose(tot["floe_total_over_full_layer"], floe_total / st["moe_lora/train"]["seconds"])
    peak = max(st[p]["peak_memory_mb"] for p in ("warmup", "select", "floe/train"))
    assert math.isclose(tot["floe_peak_over_full_layer"], peak / st["moe_lora/train"]["peak_memory_mb"])
    assert sps["floe"] > 0 and sps["moe_lora"] > 0
    assert math.isclose(sps["floe_over_moe_lora"], sps["floe"] / sps["moe_lora"])
    eq = saved["equal_time"]
    assert eq["steps"] == bench.equal_time_steps(4, sps["moe_lora"], sps["floe"], 10.0)
    assert eq["same_layers"] and eq["methods"]["floe_equal_time"]["steps"] == eq["steps"]
    assert math.isclose(eq["train_seconds_over_moe_lora"], eq["methods"]["floe_equal_time"]["train_seconds"]
                        / eq["methods"]["moe_lora"]["train_seconds"])
    for m in ("moe_lora", "floe", "floe_equal_time"):
        assert {"test_loss", "exact_match", "rouge_l"} <= set(eq["methods"][m]["scores"])
    assert str(tmp_path) not in json.dumps(saved)  # no machine paths in the results
    with pytest.raises(SystemExit, match="exists"):  # a second run into the same folder refuses
        bench.main(["--smoke", "--out-dir", str(out_dir), "--out", str(out)], log=lambda s: None)


def test_equal_time_steps_scales_by_the_speed_ratio_and_is_capped():
    steps = _script("pipeline_cost").equal_time_steps
    assert steps(40, 2.0, 1.0, 10.0) == 80
    assert steps(40, 1.0, 3.0, 10.0) == 13
    assert steps(40, 100.0, 1.0, 10.0) == 400 and steps(4, 0.01, 1.0, 10.0) == 1


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_every_floe_name_a_benchmark_imports_exists(script):
    """Benchmarks import library internals (often inside functions): a refactor that moves a name
    must move the benchmark's import too, or the benchmark breaks only when someone runs it."""
    import ast
    import importlib

    tree = ast.parse((BENCH / script).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "floe":
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{script}:{node.lineno}: {node.module} has no {alias.name}"


def test_rendered_results_page_holds_the_committed_cells_means_and_layers(tmp_path):
    import statistics

    render = _script("render_results")
    page = render.render(tmp_path / "results.md").read_text()
    rows = [json.loads(line) for line in (BENCH / "results" / "table2.jsonl").read_text().splitlines() if line.strip()]
    assert f"Table 2 grid {len({r['fingerprint'] for r in rows})} of " in page
    nat = [r for r in rows if r["variant"] == "floe" and r["data"] == "bigbench:natural_instructions"]
    losses = [r["metrics"]["final_eval_loss"] for r in nat]
    mean = f"{statistics.mean(losses):.4f}" + (f" ± {statistics.stdev(losses):.4f}" if len(losses) > 1 else "")
    floe_line = next(line for line in page.splitlines() if line.startswith("| floe | 8 |"))
    assert mean in floe_line
    layers_line = next(line for line in page.splitlines() if line.startswith("| natural_instructions | floe |"))
    assert ",".join(map(str, sorted(nat[0]["layers"]))) in layers_line
    assert (tmp_path / "figures" / "results_paired.png").stat().st_size > 0


def test_each_k_is_paired_with_the_same_variant_on_all_layers_by_seed():
    render = _script("render_results")

    def row(variant, k, seed, loss):
        return {"variant": variant, "k": k, "seed": seed, "data": "d",
                "metrics": {"final_eval_loss": loss, "test_loss": loss, "rouge_l": 0.2}}

    rows = [row("floe", 30, 1, 2.0), row("floe", 30, 2, 2.1), row("floe", 30, 3, 2.2),
            row("floe", 8, 1, 2.2), row("floe", 8, 2, 2.35), row("floe", 8, 3, 2.5),  # diffs 0.2, 0.25, 0.3
            row("random", 8, 1, 2.0)]  # no random at k = 30: nothing to pair
    table = render._against_all_layers(rows)
    floe8 = next(line for line in table if line.startswith("| floe | 8 |"))
    half = 4.302653 * 0.05 / math.sqrt(3)  # sd 0.05, t(0.975, 2)
    assert floe8.count(f"+0.2500 [{0.25 - half:+.4f}, {0.25 + half:+.4f}] **worse**") == 2
    assert not any(line.startswith("| random |") for line in table)


def test_the_decision_rule_picks_an_option_only_when_it_is_better_pooled_and_worse_nowhere():
    render = _script("render_results")

    def row(variant, seed, data, loss, rouge=0.2, k=8):
        return {"variant": variant, "k": k, "seed": seed, "data": data, "method": "floe",
                "metrics": {"final_eval_loss": loss, "test_loss": loss, "rouge_l": rouge}}

    rows = []
    for data in ("a", "b"):
        for seed, noise in ((1, 0.0), (2, 0.01), (3, -0.01)):
            rows += [row("floe", seed, data, 2.0),
                     row("floe_kwon", seed, data, 1.8 + noise),                      # better everywhere
                     row("floe_fisher_top", seed, data, 1.6 + noise,                 # better still on loss,
                         rouge=0.1 + noise if data == "b" else 0.2),                 # but worse ROUGE-L on b
                     row("floe_refine_none", seed, data, 2.0),                       # the same layers
                     row("floe_fisher_batch", seed, data, 1.9 + noise)]              # better
            if seed < 3:
                rows.append(row("floe_taylor_mask", seed, data, 1.5))               # one seed short
    decided = render.decide_settings(rows)
    assert decided["mask_rule"][0] == "kwon" and "worse in rouge_l on b" in decided["mask_rule"][1]
    assert decided["refine"][0] == "paper" and decided["taylor"][0] == "pending"
    assert decided["fisher"][0] == "batch"
    krows = [row("floe", s, "a", loss, k=k) for k, base in ((4, 2.5), (8, 2.2), (16, 2.0), (30, 2.0))
             for s, loss in ((1, base), (2, base + 0.02), (3, base - 0.01))]
    assert render.decide_k(krows)[0] == "16"  # 4 and 8 worse than all layers, 16 not shown worse
    assert render.decide_k([r for r in krows if r["k"] != 16])[0] == "pending"


def test_equal_time_pairs_the_grids_variant_with_its_own_40_step_cells_and_full_layers():
    render = _script("render_results")

    def row(variant, seed, loss, steps=40):
        return {"variant": variant, "seed": seed, "data": "d", "steps": steps,
                "metrics": {"final_eval_loss": loss, "test_loss": loss, "rouge_l": 0.2}}

    t2 = [row(v, s, base + 0.01 * s) for v, base in (("moe_lora", 2.0), ("floe", 2.5), ("floe_kwon", 2.3))
          for s in (1, 2, 3)]
    eq = [row("floe_kwon", s, 2.1 + 0.01 * s + 0.005 * (s == 2), steps=70) for s in (1, 2, 3)]
    text = "\n".join(render._equal_time(t2, eq, 3, variant="floe_kwon"))
    # against floe_kwon at 40 steps: diffs -0.2, -0.195, -0.2; against moe_lora: +0.1, +0.105, +0.1
    assert "| floe_kwon, 40 steps | final_eval_loss | 3 | -0.1983" in text
    assert "| moe_lora, 40 steps | final_eval_loss | 3 | +0.1017" in text
    assert "not run yet for `floe`" in "\n".join(render._equal_time(t2, eq, 3, variant="floe"))


def test_cost_results_are_averaged_only_over_runs_of_the_same_settings():
    render = _script("render_results")

    def res(seed, **extra):
        return {"settings": {"seed": seed, "overrides": {"seed": seed, "k": 8, **extra}}}

    groups = render._cost_groups([res(1), res(2), res(1, **{"select.config.mask_rule": "fisher_top",
                                                                "data.source": "bigbench:x"}), res(3)])
    assert sorted(groups) == ["", "select.config.mask_rule=fisher_top"]
    assert [r["settings"]["seed"] for r in groups[""]] == [1, 2, 3]
    assert len(groups["select.config.mask_rule=fisher_top"]) == 1


def _long_row(variant: str, seed: int, curve: dict[int, float], best: int, delta: float) -> dict:
    scores = {"test_loss": curve[best] + 0.3, "rouge_l": 0.2 + 0.01 * seed}
    return {"variant": variant, "seed": seed, "eval_losses": sorted(curve.items()),
            "metrics": {"final_eval_loss": curve[max(curve)], **scores}, "best": {"step": best, "eval_loss": curve[best],
                                                                              "scores": scores},
            "retention": {"base": {"accuracy": 0.5, "per_task": {"t": {"accuracy": 0.5, "chance": 0.25, "examples": 100}}},
                          "delta": {"accuracy": delta, "per_task": {"t": delta}}},
            "steps": max(curve), "seconds_per_step": 1.0, "train_seconds": 10.0 * seed, "peak_memory_mb": 100.0,
            "stages": {"warmup": {"seconds": 2.0, "cached": False}} if variant == "floe" else {}}


def test_long_grid_section_pairs_by_seed_at_each_step_and_at_the_best_checkpoint(tmp_path):
    long = _script("render_long")
    rows = []
    for seed in (1, 2, 3):
        rows.append(_long_row("random", seed, {40: 2.5, 100: 2.3, 500: 2.1}, 500, -0.01))
        rows.append(_long_row("floe", seed, {40: 2.6 + 0.01 * seed, 100: 2.35, 500: 2.0}, 500, -0.02 * seed))
    g = long._by_variant(rows)
    d40 = long.paired(g, "floe", "random", lambda r: long.loss_at(r, 40))
    assert d40 == pytest.approx([0.11, 0.12, 0.13])
    assert long.paired(g, "floe", "random", lambda r: long.loss_at(r, "best")) == pytest.approx([-0.1] * 3)
    assert long.loss_at(rows[0], 200) is None  # not on the curve: left out, not guessed
    text = "\n".join(long.section(rows, 18, tmp_path))
    assert "Progress: 6 of 18 cells." in text
    mean, lo, hi = t_interval([0.11, 0.12, 0.13])
    assert f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}] (n=3)" in text
    assert (tmp_path / "results_long_gap.png").is_file() and (tmp_path / "results_long_forgetting.png").is_file()
    # retention: macro delta in points, paired against random: floe −2, −4, −6 against −1 → −1, −3, −5
    m, lo, hi = t_interval([-1.0, -3.0, -5.0])
    assert f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}] (n=3)" in text


def test_anchor_scorer_rule_picks_a_scorer_only_when_it_beats_random_and_is_worse_nowhere():
    render = _script("render_results")

    def row(variant, data, seed, loss, test=2.0, rouge=0.2):
        return {"variant": variant, "data": data, "seed": seed, "k": 8,
                "metrics": {"final_eval_loss": loss, "test_loss": test, "rouge_l": rouge}}

    datas = ("bigbench:natural_instructions", "bigbench:other")
    rows = [row("random", d, s, 2.0 + 0.01 * s) for d in datas for s in (1, 2, 3)]
    assert render.decide_scorer(rows)[0] == "floe (pending)"
    better = rows + [row("scorer_cka", d, s, 1.85 + 0.012 * s) for d in datas for s in (1, 2, 3)]
    choice, why = render.decide_scorer(better)
    assert choice == "cka" and "meets the −0.10 goal" in why and "pending: lora_drop" in why
    # the same loss, but worse on test loss on one data set: stays floe
    worse = rows + [row("scorer_cka", d, s, 1.85 + 0.012 * s, test=2.1 + 0.01 * s if d == datas[1] else 2.0)
                    for d in datas for s in (1, 2, 3)]
    assert render.decide_scorer(worse)[0] == "floe"
