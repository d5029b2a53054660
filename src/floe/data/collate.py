"""Padding tokenised examples into batches."""
from __future__ import annotations

import random
from typing import Any, Iterator, Sequence

import torch

from .tokenize import IGNORE_INDEX


class DataCollator:
    """Right-pads ``input_ids`` (pad id, else eos id) and ``labels`` (-100); adds ``attention_mask``.

    Usable as a Hugging Face ``Trainer``'s ``data_collator``. Features without
    ``labels`` give a batch without labels (e.g. for generation).
    """

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with; "
                             "set tokenizer.pad_token first.")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of}")
        self.pad_id = int(pad)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        ids = [list(map(int, f["input_ids"])) for f in features]
        width = max(map(len, ids))
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.tensor([x + [self.pad_id] * (width - len(x)) for x in ids], dtype=torch.long),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], dtype=torch.long),
        }
        if all("labels" in f for f in features):
            labels = [list(map(int, f["labels"])) for f in features]
            for x, y in zip(ids, labels):
                if len(x) != len(y):
                    raise ValueError(f"input_ids and labels differ in length ({len(x)} vs {len(y)})")
            batch["labels"] = torch.tensor([y + [IGNORE_INDEX] * (width - len(y)) for y in labels],
                                           dtype=torch.long)
        return batch


def iter_batches(dataset: Sequence[dict[str, Any]], batch_size: int, collator: DataCollator, *,
                 shuffle: bool = False, seed: int = 0, drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Padded tensor batches over ``dataset`` (in order, or shuffled by ``seed``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = list(range(len(dataset)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        if drop_last and len(chunk) < batch_size:
            return
        yield collator([dataset[i] for i in chunk])
