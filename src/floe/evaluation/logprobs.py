"""Summed log-probabilities of the labelled tokens of many sequences, batched (loss and multiple choice)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from floe.arch import model_device
from floe.data import IGNORE_INDEX, DataCollator
from floe.data.collate import longest_first


@torch.no_grad()
def sequence_logprobs(model, tokenizer, features: Sequence[dict[str, Any]], batch_size: int = 8,
                      progress=None) -> list[tuple[float, int]]:
    """``(sum of log p(label token | preceding tokens), number of labelled tokens)`` per feature.

    Each feature is ``{"input_ids", "labels"}`` with -100 on unscored tokens, exactly as
    :func:`floe.data.load_data` makes them; batches are right-padded by
    :class:`floe.data.DataCollator` and the log-probabilities are the shifted next-token
    cross-entropy that a causal LM's training loss uses (in float32). Sequences are batched
    longest first (less padding); the result is in the input order. ``progress`` is called
    with the number of sequences done after each batch.
    """
    device = model_device(model)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(features)
    for chunk, batch in longest_first(features, batch_size, DataCollator(tokenizer)):
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["labels"].to(device)[:, 1:]
        logits = logits[:, :-1].float()
        mask = labels != IGNORE_INDEX
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.clamp(min=0).reshape(-1),
                              reduction="none").view(labels.shape)
        sums = (-(nll * mask)).sum(1).tolist()
        counts = mask.sum(1).tolist()
        for i, s, n in zip(chunk, sums, counts):
            out[i] = (float(s), int(n))
        if progress is not None:
            progress(len(chunk))
    return out


@torch.no_grad()
def option_logprobs(model, prompt: list[int], options: Sequence[list[int]]) -> list[float]:
    """Summed log p(option tokens | prompt) of each option, the prompt run once.

    The same numbers as :func:`sequence_logprobs` on ``prompt + option`` (up to float rounding): the
    prompt's forward pass fills a key/value cache, which is repeated once per option, and the options
    (right-padded; a causal model's real tokens never attend to the pads after them) continue from it.
    The first token of each option is scored by the prompt's last logits. For a prompt of P tokens and
    n options of O tokens this costs P + n·O tokens instead of n·(P + O): multiple-choice prompts are
    long and options short, so several times less.
    """
    device = model_device(model)
    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    cache, last = out.past_key_values, out.logits[0, -1].float().log_softmax(-1)
    width = max(len(o) for o in options)
    ids = torch.tensor([list(o) + [o[-1]] * (width - len(o)) for o in options], device=device)
    if width > 1:
        cache.batch_repeat_interleave(len(options))
        mask = torch.ones(len(options), len(prompt) + width, dtype=torch.long, device=device)
        logits = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=cache,
                       use_cache=True).logits.float().log_softmax(-1)
    scores = []
    for i, o in enumerate(options):
        s = float(last[o[0]])
        for t in range(1, len(o)):
            s += float(logits[i, t - 1, o[t]])
        scores.append(s)
    return scores
