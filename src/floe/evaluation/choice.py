"""Multiple-choice accuracy by the summed log-likelihood of each option (BIG-bench ``target_scores`` tasks)."""
from __future__ import annotations

from typing import Any, Sequence

from floe.data import IGNORE_INDEX, Record

from .logprobs import option_logprobs, sequence_logprobs
from .metrics import chance_level, choice_chance, correct_options, macro_average, mean
from .prompts import draw_shots, prompt_ids, prompt_messages


def has_options(record: Record) -> bool:
    return bool(record.meta.get("choices")) and record.meta.get("target_scores") is not None


def option_features(prompt: list[int], options: Sequence[str], tokenizer, max_length: int) -> tuple[list[dict], bool]:
    """``{"input_ids": prompt + option, "labels": -100 on the prompt, option ids}`` per option.

    Each option is tokenised on its own (no special tokens) and appended to the prompt ids, as
    lm-evaluation-harness does, so every option is scored after the same prompt tokens. A
    prompt too long for ``max_length`` loses tokens from its left (returned flag: truncated).
    """
    encoded = [list(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in options]
    room = max_length - max(len(e) for e in encoded)
    truncated = len(prompt) > room
    if truncated:
        prompt = prompt[len(prompt) - max(room, 1):]
    return [{"input_ids": prompt + e, "labels": [IGNORE_INDEX] * len(prompt) + e} for e in encoded], truncated


def evaluate_choice(model, tokenizer, records: Sequence[Record], *, shots: dict[str, list[Record]] | None = None,
                    num_shots: int = 0, shot_seed: int = 0, batch_size: int = 8, max_length: int = 1024,
                    template: str = "auto", progress=None, keep_predictions: bool = True,
                    share_prompt: bool = True) -> dict[str, Any]:
    """Pick the option with the highest summed log-likelihood given the prompt (no length
    normalisation; ties go to the first option in the task's order); it is correct when its
    ``target_scores`` value is the highest of the example's. ``chance`` beside each accuracy is
    the mean over examples of #correct options / #options. ``num_shots`` > 0 prepends that many
    solved examples of the same task from ``shots`` (the train split) as earlier chat turns.
    ``share_prompt`` runs each prompt once and continues every option from its key/value cache
    (:func:`.logprobs.option_logprobs`); False scores every prompt + option sequence in full, batched.
    """
    features: list[dict] = []
    spans: list[tuple[int, int]] = []
    prompts: list[list[int]] = []  # each record's prompt as scored (after any left truncation)
    n_truncated = 0
    for record in records:
        demos = draw_shots(record, shots or {}, num_shots, shot_seed)
        prompt = prompt_ids(prompt_messages(record, demos), tokenizer, template)
        feats, truncated = option_features(prompt, record.meta["choices"], tokenizer, max_length)
        n_truncated += truncated
        spans.append((len(features), len(features) + len(feats)))
        prompts.append(feats[0]["input_ids"][:feats[0]["labels"].count(IGNORE_INDEX)])
        features += feats
    if share_prompt and getattr(model, "prompt_cache", True):  # prompt-tuning wrappers opt out
        scored = []
        for prompt, (a, b) in zip(prompts, spans):
            options = [f["input_ids"][len(prompt):] for f in features[a:b]]
            scored += [(s, 0) for s in option_logprobs(model, prompt, options)]
            if progress is not None:
                progress(b - a)
    else:
        scored = sequence_logprobs(model, tokenizer, features, batch_size, progress)
    by_task: dict[str, dict[str, list[float]]] = {}
    predictions = []
    for record, (a, b) in zip(records, spans):
        logps = [s for s, _ in scored[a:b]]
        pick = max(range(len(logps)), key=lambda i: (logps[i], -i))
        scores = record.meta["target_scores"]
        correct = pick in correct_options(scores)
        t = by_task.setdefault(record.meta.get("task", ""), {"acc": [], "chance": [], "scores": []})
        t["acc"].append(float(correct))
        t["chance"].append(choice_chance(scores))
        t["scores"].append(scores)
        if keep_predictions:
            predictions.append({"task": record.meta.get("task", ""), "where": record.meta.get("where", ""),
                                "choices": list(record.meta["choices"]), "logprobs": logps,
                                "prediction": record.meta["choices"][pick], "correct": correct})
    per_task = {task: {"accuracy": mean(v["acc"]), "chance": chance_level(v["scores"]), "examples": len(v["acc"])}
                for task, v in sorted(by_task.items())}
    all_acc = [a for v in by_task.values() for a in v["acc"]]
    all_scores = [s for v in by_task.values() for s in v["scores"]]
    out = {"accuracy": macro_average({t: v["accuracy"] for t, v in per_task.items()}),
           "chance": macro_average({t: v["chance"] for t, v in per_task.items()}),
           "micro_accuracy": mean(all_acc), "micro_chance": chance_level(all_scores),
           "examples": len(records), "num_shots": num_shots, "truncated_prompts": n_truncated, "per_task": per_task}
    if keep_predictions:
        out["predictions"] = predictions
    return out
