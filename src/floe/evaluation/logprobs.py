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
