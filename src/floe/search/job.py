"""``floe search`` as a Python entry point: ``run_search_job(SearchJob(...))``.

Loads the model and data once, then runs (one worker of) the rank / expert search with the
training objective. Everything that can be checked without the model -- ranges, the trial
schedule, the storage, an existing study -- is checked before anything is loaded, and the model,
layers, adapter and data before anything is written.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from floe.adapters.moe_lora import MoELoraConfig
from floe.adapters.moe_lora.config import fingerprint_form
from floe.config import to_dict
from floe.search.config import SearchConfig, SearchError
from floe.search.report import CONTOUR_NAME, JSON_NAME, PLOT_NAME, SearchResult, format_table, format_trial
from floe.search.storage import DEFAULT_STUDY_NAME, default_storage_url, peek_study, redact_url
from floe.search.study import search_rank
from floe.specs import DataSpec, ModelSpec
from floe.training import TrainConfig


@dataclass
class SearchJob:
    """``floe search``: Bayesian optimisation of the LoRA rank r and expert count M (paper §3.4)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    """The base model."""
    data: DataSpec = field(default_factory=DataSpec)
    """Training and validation data (the paper searches on its 50 % warm-up sample: data.fraction 0.5)."""
    adapter: MoELoraConfig = field(default_factory=MoELoraConfig)
    """lora_alpha, lora_dropout, target modules and layers_to_transform of the adapter; r and num_experts are searched."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100, report_to=[], progress_bar=False))
    """Optimiser settings of one trial; train.max_steps is the length of a trial."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """Search space, number of trials, sampler, pruner."""
    eval_points: int = 4
    """Validation losses per trial, evenly spaced (the pruner sees all, the last is the trial's value)."""
    output_dir: str = "runs/search"
    """Folder for search.json, search.png, search_contour.png and (by default) the study database search.db."""
    storage: str | None = None
    """Optuna storage URL shared by all workers (default: sqlite:///<output_dir>/search.db)."""
    study_name: str = DEFAULT_STUDY_NAME
    """Name of the study inside the storage; workers with the same storage and name cooperate."""


def search_context(job: SearchJob) -> dict[str, Any]:
    """What a trial's loss depends on besides (r, M); a study only accepts workers that agree."""
    t = job.train
    adapter = {k: v for k, v in fingerprint_form(to_dict(job.adapter)).items()
               if k not in ("r", "num_experts", "base_model_name_or_path", "extra")}
    return {
        "model": job.model.name, "dtype": job.model.dtype, "data": to_dict(job.data), "adapter": adapter,
        "train": {"max_steps": t.max_steps, "learning_rate": t.learning_rate, "batch_size": t.batch_size,
                  "gradient_accumulation_steps": t.gradient_accumulation_steps, "warmup_ratio": t.warmup_ratio,
                  "lr_scheduler": t.lr_scheduler, "weight_decay": t.weight_decay, "seed": t.seed, "bf16": t.bf16},
        "eval_points": job.eval_points,
    }


def check_job(job: SearchJob) -> tuple[str, int]:
    """Validate everything that needs no model, creating nothing: returns the storage URL and the
    number of trials the study has already finished (0: no study yet). Raises SearchError."""
    from floe.search.objective import eval_schedule

    if job.train.max_steps is None or job.train.max_steps < 1:
        raise SearchError(f"train.max_steps (--steps) must be a positive number of steps per trial, got {job.train.max_steps}")
    eval_schedule(job.train.max_steps, job.eval_points)
    out = Path(job.output_dir)
    if out.exists() and not out.is_dir():
        raise SearchError(f"output_dir {out} exists and is not a folder: choose another --output")
    url = job.storage or default_storage_url(out)
    return url, peek_study(url, job.study_name, job.search, search_context(job))


def _check_layers(job: SearchJob, n_layers: int) -> None:
    layers = job.adapter.layers_to_transform
    if layers is None:
        return
    bad = [i for i in layers if not 0 <= int(i) < n_layers]
    if not layers or bad:
        what = "no layer" if not layers else f"layer(s) {bad} out of range"
        raise SearchError(f"adapter.layers_to_transform (--layers) names {what}: {job.model.name} has {n_layers} decoder "
                          f"layers (0..{n_layers - 1}). Fix: give 'all' or indices like '0,3,5-7' within that range")


def _check_adapter(model: Any, adapter: MoELoraConfig, search: SearchConfig) -> None:
    """Attach the largest adapter of the search space to a copy of the model: bad target modules
    or a rank beyond a target's size fail here, before the study exists, not in trial 0."""
    import torch

    from floe.adapters.moe_lora import apply_moe_lora

    probe = copy.deepcopy(model)
    try:
        with torch.random.fork_rng(devices=[]):  # the probe's random init leaves no trace
            apply_moe_lora(probe, dataclasses.replace(adapter, r=search.r_max, num_experts=max(search.experts)))
    finally:
        del probe


def run_search_job(job: SearchJob, log: Callable[[str], None] = print) -> SearchResult:
    """Check the job, load model and data, run the search, write and print the results.

    Everything is checked -- settings, an existing study, the model, the layers, the adapter,
    the data -- before anything is written: a failed start leaves no study, folder or file behind.
    """
    from floe.arch import decoder_layers
    from floe.models import load_model
    from floe.search.objective import make_training_objective
    from floe.specs import load_splits

    url, done = check_job(job)
    if done:
        log(f"[floe] study {job.study_name!r} already has {done} finished trials: resuming")
    t0 = time.perf_counter()
    model, tokenizer = load_model(job.model.name, dtype=job.model.dtype)
    log(f"[floe] model {job.model.name}: loaded in {time.perf_counter() - t0:.1f}s")
    _check_layers(job, len(decoder_layers(model)[1]))
    adapter = dataclasses.replace(job.adapter, base_model_name_or_path=job.model.name)
    _check_adapter(model, adapter, job.search)
    t0 = time.perf_counter()
    train_ds, eval_ds = load_splits(job.data, tokenizer)
    log(f"[floe] data {job.data.source}: {len(train_ds)} train / {len(eval_ds)} validation examples "
        f"({time.perf_counter() - t0:.1f}s)")
    if len(train_ds) == 0 or len(eval_ds) == 0:
        raise SearchError(f"data {job.data.source} gives {len(train_ds)} training and {len(eval_ds)} validation "
                          "examples; a search needs both: use more data, or raise data.val_fraction / "
                          "--max-eval-examples")
    objective = make_training_objective(lambda: copy.deepcopy(model), tokenizer, train_ds, eval_ds, job.train,
                                        layers=job.adapter.layers_to_transform, adapter=adapter, eval_points=job.eval_points)
    s = job.search
    if s.pruner == "halving" and s.halving_min_resource is None:  # first rung at the first evaluation
        s = dataclasses.replace(s, halving_min_resource=job.train.max_steps // job.eval_points)
    log(f"[floe] search r in {s.ranks()[0]}..{s.ranks()[-1]} step {s.r_step}, M in {s.experts} "
        f"({s.space_size()} configurations), {s.n_trials} trials, {s.sampler} sampler, {s.pruner} pruner, "
        f"{job.train.max_steps} steps per trial; study {job.study_name!r} in {redact_url(url)}")
    if job.storage is None:
        Path(job.output_dir).mkdir(parents=True, exist_ok=True)  # the first thing written
    result = search_rank(objective, s, storage=url, study_name=job.study_name, output_dir=job.output_dir,
                         context=search_context(job), log=log,
                         on_trial=lambda t: log("[floe] trial " + format_trial(t).strip()))
    log(format_table(result))
    written = [Path(job.output_dir) / n for n in (JSON_NAME, PLOT_NAME, CONTOUR_NAME)]
    log("[floe] wrote " + ", ".join(str(p) for p in written if p.is_file()))
    return result
