"""``floe eval``: evaluate a base model, or a base model with a MoE-LoRA adapter, and write ``eval.json``.

    floe eval --model smollm2-135m [--adapter runs/x/adapter] --data bigbench:natural_instructions \\
        --split test --metrics loss,generate --max-examples 120 --max-new-tokens 32 --output runs/eval
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from floe.flags import COMMON_FLAGS, FlagTable, add_job_command, job_from_args
from floe.specs import DataSpec, ModelSpec

from .api import EvalConfig
from .retention import RetentionConfig

# Evaluation keeps every example it can: long prompts are cut from the left (never the response),
# and only examples whose response alone is too long are skipped (and counted). A config file or
# --set that gives these keys wins.
EVAL_DATA_DEFAULTS = {"on_error": "skip", "truncate_prompt": True}


def _eval_data() -> DataSpec:
    return DataSpec(**EVAL_DATA_DEFAULTS)


@dataclass
class EvalJob:
    """``floe eval``: loss, generation and multiple-choice metrics of a model (with an optional adapter)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    """The base model."""
    adapter_dir: str = ""
    """MoE-LoRA adapter folder written by floe train (<output_dir>/adapter); empty = the base model alone."""
    data: DataSpec = field(default_factory=_eval_data)
    """Data source and split settings (use the training run's seed and fractions; max_*_examples are not used;
    on_error defaults to skip and truncate_prompt to true here)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Metrics, split, example cap, decoding length, shots, batch size."""
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    """Multiple-choice tasks outside the training data, scored with the adapter and without it (the base model)."""
    output_dir: str = "runs/eval"
    """Folder that receives eval.json."""


EVAL_FLAGS: FlagTable = {
    **COMMON_FLAGS,
    "--adapter": ("adapter_dir", dict(help="MoE-LoRA adapter folder (<output_dir>/adapter of floe train); omit for the base model")),
    "--split": ("eval.split", dict(help="train | validation | test (default test)")),
    "--metrics": ("eval.metrics", dict(help="auto (default) or a comma-separated subset of loss,generate,choice")),
    "--max-examples": ("eval.max_examples", dict(type=int, help="cap on evaluated examples, equal share per task")),
    "--max-per-task": ("data.max_per_task", dict(type=int, help="cap per task of the split (default 60)")),
    "--max-new-tokens": ("eval.max_new_tokens", dict(type=int, help="longest greedy answer in tokens (default 64)")),
    "--batch-size": ("eval.batch_size", dict(type=int, help="sequences per forward / generation batch (default 8)")),
    "--shots": ("eval.num_shots", dict(type=int, help="k-shot: solved train-split examples of the task prepended (default 0)")),
    "--seed": ("data.seed", dict(type=int, help="seed of the train/validation/test split (use the training run's)")),
    "--harness-tasks": ("eval.harness_tasks", dict(type=lambda s: [t.strip() for t in s.split(",") if t.strip()],
                                                   help="lm-evaluation-harness tasks, comma-separated (needs pip install lm-eval)")),
    "--harness-limit": ("eval.harness_limit", dict(type=int, help="examples per harness task")),
    "--retention": ("retention.tasks", dict(type=lambda s: [t.strip() for t in s.split(",") if t.strip()],
                                            help="BIG-bench multiple-choice tasks, comma-separated, scored with and "
                                                 "without the adapter (forgetting; docs/evaluation.md)")),
    "--output": ("output_dir", dict(help="folder for eval.json (default runs/eval)")),
}


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``floe eval`` on the ``floe`` command's sub-parsers."""
    p = add_job_command(
        subparsers, "eval", EVAL_FLAGS, run_eval,
        help="evaluate a model or adapter: loss, exact match / ROUGE-L, multiple choice",
        description="Held-out loss and perplexity (response tokens, as training), greedy generation scored by exact "
                    "match and ROUGE-L, multiple-choice accuracy by summed option log-likelihood with its chance "
                    "level, per task and macro-averaged; optional lm-evaluation-harness tasks. Writes eval.json.")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-predictions", action="store_true", help="leave the per-example answers out of eval.json")
    return p


def job_from(args: argparse.Namespace) -> EvalJob:
    # a floe train config file works as is: its adapter and train sections are not ours
    job = job_from_args(EvalJob, args, EVAL_FLAGS, other_commands_sections=("adapter", "train", "export_peft"))
    if getattr(args, "no_progress", False):
        job.eval.progress = False
    if getattr(args, "no_predictions", False):
        job.eval.save_predictions = False
    job.eval.check()
    return job


def run_job(job: EvalJob, log=print) -> dict[str, Any]:
    """Load the model (and adapter), evaluate, write ``<output_dir>/eval.json`` atomically; return the result."""
    import time

    from floe.adapters.moe_lora import load_adapter
    from floe.config import to_dict
    from floe.io import atomic_write_text
    from floe.models import load_model

    from .api import evaluate, format_summary

    t0 = time.perf_counter()
    if job.adapter_dir and not Path(job.adapter_dir).is_dir():
        from .api import EvalInputError

        raise EvalInputError(f"--adapter {job.adapter_dir}: no such folder. Fix: pass the adapter folder written by "
                             f"floe train (<output_dir>/adapter), or omit --adapter for the base model.")
    model, tokenizer = load_model(job.model.name, dtype=job.model.dtype, device="auto")
    if job.adapter_dir:
        model = load_adapter(model, job.adapter_dir)
    log(f"[floe] model {job.model.name}" + (f" + adapter {job.adapter_dir}" if job.adapter_dir else "")
        + f": loaded in {time.perf_counter() - t0:.1f}s")
    result = evaluate(model, tokenizer, job.data.source, job.eval, data=job.data)
    if job.retention.enabled:
        result["retention"] = _retention(model, tokenizer, job, log)
    result["job"] = to_dict(job)
    out = Path(job.output_dir) / "eval.json"
    atomic_write_text(out, json.dumps(result, indent=1, ensure_ascii=False, allow_nan=True) + "\n")
    log(format_summary(result))
    log(f"[floe] wrote {out}")
    return result


def _retention(model, tokenizer, job: EvalJob, log) -> dict[str, Any]:
    """Retention accuracy with the adapter and, under ``adapters_disabled``, of the base model, and their difference."""
    from floe.adapters.moe_lora import adapters_disabled

    from .retention import check_outside_training, evaluate_retention, retention_delta

    check_outside_training(job.retention, job.data.source)
    progress = job.eval.progress
    if not job.adapter_dir:
        base = evaluate_retention(model, tokenizer, job.retention, progress)
        log(f"[floe] retention (base model): accuracy {100 * base['accuracy']:.1f}% "
            f"(chance {100 * base['chance']:.1f}%)")
        return {"base": base}
    after = evaluate_retention(model, tokenizer, job.retention, progress)
    with adapters_disabled(model):
        base = evaluate_retention(model, tokenizer, job.retention, progress)
    delta = retention_delta(after, base)
    log(f"[floe] retention: accuracy {100 * after['accuracy']:.1f}% with the adapter, {100 * base['accuracy']:.1f}% "
        f"without (change {100 * delta['accuracy']:+.1f} points; chance {100 * base['chance']:.1f}%)")
    return {"after": after, "base": base, "delta": delta}


def run_eval(args: argparse.Namespace) -> int:
    """Entry point of ``floe eval`` (returns the exit status)."""
    if getattr(args, "print_config", False):
        from floe.config import describe

        print("\n".join(describe(job_from(args))))  # as resolved: file, flags, --set, floe eval's data defaults
        return 0
    run_job(job_from(args))  # input errors (InputError) are reported by floe.cli.main, the one handler
    return 0
