"""``floe.evaluate``: loss, generation and multiple-choice metrics of a (possibly adapted) model, per task."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from floe.config import to_dict
from floe.data import Record, load_records, tokenize_records
from floe.errors import InputError

from .choice import evaluate_choice, has_options
from .generation import evaluate_generation
from .loss import evaluate_loss
from .prompts import shot_pools

METRICS = ("loss", "generate", "choice")


class EvalInputError(InputError):
    """A bad evaluation setting or data that cannot be evaluated as asked."""


@dataclass
class EvalConfig:
    """What ``floe eval`` / :func:`floe.evaluate` measures and how."""

    metrics: str = "auto"
    """Comma-separated subset of loss, generate, choice; 'auto' = loss and generate, plus choice when examples have options."""
    split: str = "test"
    """Split of the data source to evaluate on (train, validation, test); same seeded split as training."""
    max_examples: int | None = None
    """Cap on evaluated examples: shared equally among the tasks of a source; the first N of a list of records (None = all)."""
    max_new_tokens: int = 64
    """Most tokens greedy decoding generates per example (it also stops at EOS)."""
    batch_size: int = 8
    """Sequences per forward pass (loss, options) or per generation batch."""
    num_shots: int = 0
    """Solved examples of the same task (train split) prepended as chat turns for generate and choice (0 = zero-shot)."""
    shot_seed: int = 0
    """Seed of the draw of the k-shot demonstrations."""
    template: str = "auto"
    """Prompt format: auto (the tokenizer's chat template when it has one), chat or plain, as in training."""
    save_predictions: bool = True
    """Keep every generated answer and option log-likelihood in the result (eval.json)."""
    progress: bool = True
    """Show tqdm progress bars."""
    harness_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness task names to run on the model as well (needs `pip install lm-eval`)."""
    harness_num_fewshot: int | None = None
    """Shots for the harness tasks (None = each task's default)."""
    harness_limit: int | None = None
    """Examples per harness task (None = all)."""

    def metric_list(self, records: Sequence[Record] | None = None) -> list[str]:
        """The metrics to compute ('auto' resolved against the records)."""
        text = self.metrics.strip().lower()
        if text == "auto":
            chosen = ["loss", "generate"]
            if records is not None and any(has_options(r) for r in records):
                chosen.append("choice")
            return chosen
        chosen = [m.strip() for m in text.split(",") if m.strip()]
        bad = [m for m in chosen if m not in METRICS]
        if bad or not chosen:
            raise EvalInputError(f"metrics: unknown {', '.join(map(repr, bad)) or 'empty list'}; "
                                 f"choose from auto or a comma-separated subset of {', '.join(METRICS)}.")
        return chosen

    def check(self) -> None:
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise EvalInputError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.num_shots < 0:
            raise EvalInputError(f"num_shots must be 0 or more, got {self.num_shots}.")
        if self.max_examples is not None and self.max_examples < 1:
            raise EvalInputError(f"max_examples must be positive or None, got {self.max_examples}.")
        self.metric_list()


def _split_records(source: str, data, split: str, max_examples: int | None = None) -> list[Record]:
    """One split of ``source``, made as training makes it from the data spec ``data``."""
    from floe.specs import split_options

    return load_records(source, split=split, max_examples=max_examples, **split_options(data))


def _progress(enabled: bool, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="seq", disable=not enabled, leave=False)


def evaluate(model, tokenizer, tasks: str | Sequence[Record], config: EvalConfig | None = None, *,
             data=None, shots: Sequence[Record] | None = None) -> dict[str, Any]:
    """Evaluate ``model`` (as it is in memory: MoE-LoRA adapters on, unless inside
    :func:`floe.adapters_disabled`) on ``tasks`` and return a JSON-able dict.

    ``tasks``: a data source (``bigbench:natural_instructions``, ``bigbench:<task>[,<task>]``, a
    file ...; the ``config.split`` split, made exactly as training makes it from ``data``, a
    :class:`floe.specs.DataSpec` whose seed/fractions/max_length should be the training run's) or a
    list of :class:`floe.data.Record`. ``shots``: demonstration records for ``num_shots`` > 0
    (default: the train split of the source).

    Metrics (``config.metrics``): ``loss`` (response-token cross-entropy and perplexity, see
    :func:`floe.evaluation.loss.evaluate_loss`), ``generate`` (greedy decoding, exact match and
    ROUGE-L, see :mod:`floe.evaluation.metrics`), ``choice`` (multiple-choice accuracy by summed
    option log-likelihood, with the chance level), each per task and macro-averaged over tasks;
    plus ``harness`` when ``config.harness_tasks`` is set.
    """
    from floe.specs import DataSpec

    config = config or EvalConfig()
    config.check()
    data = data or DataSpec()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    source = tasks if isinstance(tasks, str) else None
    if source is not None:
        t0 = time.perf_counter()
        records = _split_records(source, data, config.split, config.max_examples)
        timings["load_data"] = time.perf_counter() - t0
    else:
        records = list(tasks)
        if config.max_examples is not None:
            records = records[:config.max_examples]
        if not records:
            raise EvalInputError("evaluate: the list of records is empty. Fix: pass a data source or some records.")
    metrics = config.metric_list(records)
    result: dict[str, Any] = {"source": source, "split": config.split if source else None,
                              "examples": len(records), "tasks": len({r.meta.get("task", "") for r in records}),
                              "metrics": metrics, "config": to_dict(config), "data": to_dict(data)}
    pools = None
    if config.num_shots > 0 and ("generate" in metrics or "choice" in metrics):
        if shots is None:
            if source is None:
                raise EvalInputError(f"num_shots={config.num_shots} needs demonstration records. Fix: pass "
                                     f"shots=<train records>, a data source instead of records, or num_shots=0.")
            shots = _split_records(source, data, "train")
        pools = shot_pools(shots)
    was_training = model.training
    model.eval()
    try:
        if "loss" in metrics:
            t0 = time.perf_counter()
            ds = tokenize_records(records, tokenizer, max_length=data.max_length, template=config.template,
                                  truncate_prompt=data.truncate_prompt, on_error=data.on_error)
            with _progress(config.progress, len(ds), "eval loss") as bar:
                result["loss"] = evaluate_loss(model, tokenizer, ds, config.batch_size, bar.update)
            result["loss"]["skipped"] = ds.info.get("skipped", 0)
            timings["loss"] = time.perf_counter() - t0
        common = dict(shots=pools, num_shots=config.num_shots, shot_seed=config.shot_seed,
                      batch_size=config.batch_size, max_length=data.max_length, template=config.template,
                      keep_predictions=config.save_predictions)
        if "generate" in metrics:
            t0 = time.perf_counter()
            with _progress(config.progress, len(records), "eval generate") as bar:
                result["generate"] = evaluate_generation(model, tokenizer, records, max_new_tokens=config.max_new_tokens,
                                                         progress=bar.update, **common)
            timings["generate"] = time.perf_counter() - t0
        if "choice" in metrics:
            mc = [r for r in records if has_options(r)]
            if not mc:
                raise EvalInputError(f"metrics: 'choice' needs multiple-choice examples (BIG-bench target_scores), "
                                     f"but none of the {len(records)} examples of {source or 'the records'} has options. "
                                     f"Fix: drop choice from metrics or use a task with target_scores.")
            t0 = time.perf_counter()
            n_options = sum(len(r.meta["choices"]) for r in mc)
            with _progress(config.progress, n_options, "eval choice") as bar:
                result["choice"] = evaluate_choice(model, tokenizer, mc, progress=bar.update, **common)
            timings["choice"] = time.perf_counter() - t0
        if config.harness_tasks:
            from .harness import run_harness

            t0 = time.perf_counter()
            result["harness"] = run_harness(model, tokenizer, config.harness_tasks, num_fewshot=config.harness_num_fewshot,
                                            limit=config.harness_limit, batch_size=config.batch_size)
            timings["harness"] = time.perf_counter() - t0
    finally:
        model.train(was_training)
    timings["total"] = time.perf_counter() - t_start
    result["seconds"] = timings
    return result


def format_summary(result: dict[str, Any]) -> str:
    """A few readable lines: the headline numbers (choice accuracy with its chance level beside it)."""
    lines = [f"[floe] evaluated {result['examples']} examples from {result['tasks']} tasks"
             + (f" ({result['source']}, split {result['split']})" if result.get("source") else "")]
    if "loss" in result:
        r = result["loss"]
        lines.append(f"[floe] loss {r['loss']:.4f}  perplexity {r['perplexity']:.2f}  "
                     f"({r['tokens']} response tokens, {r['examples']} examples, {r['skipped']} skipped)")
    if "generate" in result:
        r = result["generate"]
        lines.append(f"[floe] generate: exact match {100 * r['exact_match']:.1f}%  ROUGE-L {100 * r['rouge_l']:.1f}  "
                     f"(macro over tasks; {r['num_shots']}-shot, max {r['max_new_tokens']} new tokens)")
    if "choice" in result:
        r = result["choice"]
        lines.append(f"[floe] choice: accuracy {100 * r['accuracy']:.1f}%  (chance {100 * r['chance']:.1f}%)  "
                     f"{r['examples']} examples, {r['num_shots']}-shot")
        if len(r["per_task"]) > 1:
            for task, v in r["per_task"].items():
                lines.append(f"[floe]   {task}: {100 * v['accuracy']:.1f}% (chance {100 * v['chance']:.1f}%, n={v['examples']})")
    if "harness" in result:
        for task, vals in (result["harness"].get("results") or {}).items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in vals.items() if isinstance(v, float) and not math.isnan(v))
            lines.append(f"[floe] harness {task}: {shown}")
    lines.append("[floe] seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items()))
    return "\n".join(lines)
