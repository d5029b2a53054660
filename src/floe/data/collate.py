"""Padding tokenised examples into batches, and the orders batches are drawn in (on ``DataLoader``)."""
from __future__ import annotations

import random
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from .tokenize import IGNORE_INDEX


def pad_id(tokenizer) -> int:
    """The id padding uses: the tokenizer's pad token, else its EOS token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with; "
                         "set tokenizer.pad_token first.")
    return int(pad)


class DataCollator:
    """Pads ``input_ids`` (pad id, else eos id) and ``labels`` (-100); adds ``attention_mask``.

    Right-padding by default (training, scoring); ``padding_side="left"`` for generation, where
    every row's next token must sit in the last column. Usable as a Hugging Face ``Trainer``'s
    ``data_collator``. Features without ``labels`` give a batch without labels.

    Our own rather than ``transformers.DataCollatorForSeq2Seq``, which does the -100 label padding
    too: that one follows ``tokenizer.padding_side`` (some checkpoints ship "left", which would
    move training's tokens) and needs a pad token, where this one takes the side from the caller
    and falls back to EOS.
    """

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None, padding_side: str = "right"):
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_id = pad_id(tokenizer)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side

    def _pad(self, rows: list[list[int]], value: int, width: int) -> torch.Tensor:
        if self.padding_side == "left":
            return torch.tensor([[value] * (width - len(x)) + x for x in rows], dtype=torch.long)
        return torch.tensor([x + [value] * (width - len(x)) for x in rows], dtype=torch.long)

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        ids = [list(map(int, f["input_ids"])) for f in features]
        width = max(map(len, ids))
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": self._pad(ids, self.pad_id, width),
                 "attention_mask": self._pad([[1] * len(x) for x in ids], 0, width)}
        if all("labels" in f for f in features):
            labels = [list(map(int, f["labels"])) for f in features]
            for x, y in zip(ids, labels):
                if len(x) != len(y):
                    raise ValueError(f"input_ids and labels differ in length ({len(x)} vs {len(y)})")
            batch["labels"] = self._pad(labels, IGNORE_INDEX, width)
        return batch


def iter_batches(dataset: Sequence[dict[str, Any]], batch_size: int, collator: DataCollator, *,
                 shuffle: bool = False, seed: int = 0, drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Padded tensor batches over ``dataset`` (in order, or shuffled by ``seed``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = list(range(len(dataset)))
    if shuffle:  # Python's seeded shuffle, not DataLoader(shuffle=True): its torch RNG would draw other batches
        random.Random(seed).shuffle(order)
    return iter(DataLoader(dataset, batch_size=batch_size, sampler=order, collate_fn=collator, drop_last=drop_last))


def longest_first(features: Sequence[dict[str, Any]], batch_size: int,
                  collator: DataCollator) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """``(indices, batch)`` over ``features`` sorted longest first (least padding); a caller puts
    each row's result back at its index."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return zip(chunks, DataLoader(features, batch_sampler=chunks, collate_fn=collator))
