"""Greedy decoding in left-padded batches, then exact match and ROUGE-L against the references."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from floe.arch import model_device
from floe.data import DataCollator, Record
from floe.data.collate import longest_first

from .metrics import exact_match, macro_average, mean, rouge_l
from .prompts import draw_shots, prompt_ids, prompt_messages


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids of the tokenizer and of the model's generation config (e.g. a chat model's end-of-turn)."""
    ids: list[int] = []
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[list[int]], *, max_new_tokens: int = 64, batch_size: int = 8,
                    stop_ids: Sequence[int] | None = None, progress=None) -> list[list[int]]:
    """Greedy continuation token ids of each prompt, without the stop token.

    Prompts are batched longest first and LEFT-padded (pad id, attention mask 0), so every
    row's next token sits in the last column; ``model.generate`` (greedy: ``do_sample=False``,
    one beam) builds the position ids from the attention mask. A row stops at its first stop
    token (default :func:`stop_token_ids`) or after ``max_new_tokens``; finished rows are padded.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    stops = list(stop_ids) if stop_ids is not None else stop_token_ids(model, tokenizer)
    collator = DataCollator(tokenizer, padding_side="left")
    device = model_device(model)
    out: list[list[int]] = [[] for _ in prompts]
    features = [{"input_ids": list(p)} for p in prompts]
    for chunk, batch in longest_first(features, batch_size, collator):
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        width = ids.shape[1]
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                             max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=stops or None,
                             pad_token_id=collator.pad_id, temperature=None, top_p=None, top_k=None,
                             repetition_penalty=None, no_repeat_ngram_size=None)
        for i, row in zip(chunk, gen[:, width:].tolist()):
            cut = next((k for k, t in enumerate(row) if t in stops), len(row))
            out[i] = row[:cut]
        if progress is not None:
            progress(len(chunk))
    return out


def evaluate_generation(model, tokenizer, records: Sequence[Record], *, shots: dict[str, list[Record]] | None = None,
                        num_shots: int = 0, shot_seed: int = 0, max_new_tokens: int = 64, batch_size: int = 8,
                        max_length: int = 1024, template: str = "auto", progress=None,
                        keep_predictions: bool = True) -> dict[str, Any]:
    """Greedy answers scored by exact match and ROUGE-L (see :mod:`floe.evaluation.metrics`) against
    ``meta["references"]`` (else the record's response), per task and macro-averaged over tasks
    (``exact_match``/``rouge_l``; ``micro_*`` average over examples). Prompts longer than
    ``max_length`` lose tokens from the left (counted in ``truncated_prompts``)."""
    prompts, n_truncated = [], 0
    for record in records:
        demos = draw_shots(record, shots or {}, num_shots, shot_seed)
        ids = prompt_ids(prompt_messages(record, demos), tokenizer, template)
        if len(ids) > max_length:
            ids, n_truncated = ids[len(ids) - max_length:], n_truncated + 1
        prompts.append(ids)
    generated = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                progress=progress)
    by_task: dict[str, dict[str, list[float]]] = {}
    predictions = []
    for record, ids in zip(records, generated):
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        refs = [r for r in record.meta.get("references") or [] if str(r).strip()] or [record.response]
        em, rl = exact_match(text, refs), rouge_l(text, refs)
        t = by_task.setdefault(record.meta.get("task", ""), {"em": [], "rl": []})
        t["em"].append(em)
        t["rl"].append(rl)
        if keep_predictions:
            predictions.append({"task": record.meta.get("task", ""), "where": record.meta.get("where", ""),
                                "prediction": text, "references": refs, "exact_match": em, "rouge_l": rl,
                                "new_tokens": len(ids)})
    per_task = {task: {"exact_match": mean(v["em"]), "rouge_l": mean(v["rl"]), "examples": len(v["em"])}
                for task, v in sorted(by_task.items())}
    out = {"exact_match": macro_average({t: v["exact_match"] for t, v in per_task.items()}),
           "rouge_l": macro_average({t: v["rouge_l"] for t, v in per_task.items()}),
           "micro_exact_match": mean([x for v in by_task.values() for x in v["em"]]),
           "micro_rouge_l": mean([x for v in by_task.values() for x in v["rl"]]),
           "examples": len(records), "num_shots": num_shots, "max_new_tokens": max_new_tokens,
           "truncated_prompts": n_truncated, "per_task": per_task}
    if keep_predictions:
        out["predictions"] = predictions
    return out
