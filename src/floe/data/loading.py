"""The two entry points: :func:`load_records` (text) and :func:`load_data` (token ids)."""
from __future__ import annotations

import inspect
from typing import Any

import torch

from .records import DataError, ErrorPolicy, Record, logger, materialize
from .sources import load_source
from .splits import canonical_split, select
from .tokenize import tokenize_record, use_chat_template

DEFAULT_VAL_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.1


def load_records(
    source: str,
    *,
    split: str = "train",
    fraction: float = 1.0,
    seed: int = 42,
    max_examples: int | None = None,
    max_per_task: int | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    on_error: str = "raise",
    mixing: str = "auto",
) -> list[Record]:
    """Untokenised records of one split of ``source``.

    Args:
        source: a json/jsonl/parquet file, a folder, ``bigbench:<task>[,<task>]`` or
            ``hf:<dataset>[:<config>]`` (see :mod:`floe.data.sources`).
        split: ``train``, ``validation`` (``val``/``dev``), ``test`` or ``all``. Splits are
            made per task by a permutation seeded by ``seed`` and the task name, before
            any cap, so held-out examples never reach ``train``.
        fraction: keep this share of each task's examples (e.g. 0.5 for the warm-up
            sample; a subset of the ``fraction=1`` data for the same seed).
        max_examples: total cap after mixing; ``max_per_task``: cap per task.
        mixing: how ``max_examples`` is shared among tasks: ``equal`` (BIG-bench
            default), ``proportional`` (files/data sets default) or ``auto``.
        on_error: ``raise`` (default) or ``skip`` malformed examples with a warning.
    """
    policy = ErrorPolicy(on_error)
    split = canonical_split(split)
    loaded = load_source(source, policy)
    policy.report(f"malformed examples in {source}")
    if loaded.count() == 0:
        raise DataError(f"{source}: no usable examples (the data set is empty"
                        + (" after skipping malformed ones)." if on_error == "skip" else ")."))
    try:
        records = select(
            loaded.tasks, split, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
            max_per_task=max_per_task, max_examples=max_examples, fraction=fraction,
            mixing=loaded.mixing if mixing == "auto" else mixing, presplit=loaded.presplit,
        )
    except ValueError as err:
        raise DataError(f"{source}: {err}") from None
    records = materialize(records, policy)
    policy.report(f"malformed examples in {source}")
    if not records:
        raise DataError(f"{source}: split {split!r} is empty ({loaded.count()} examples in all; "
                        f"val_fraction={val_fraction}, test_fraction={test_fraction}). "
                        f"Fix: use more data or larger held-out fractions.")
    return records


class TokenizedDataset(torch.utils.data.Dataset):
    """A list of ``{"input_ids", "labels"}`` (lists of ints); ``examples[i]`` is the source record.

    A plain list-backed torch ``Dataset`` rather than a ``datasets.Dataset``: evaluation reads each
    feature's source :class:`Record` (task, references, choices) beside it, which Arrow would store
    as plain dicts, and every epoch indexes lists instead of converting Arrow rows back.
    """

    def __init__(self, features: list[dict[str, list[int]]], examples: list[Record], info: dict[str, Any]):
        if len(features) != len(examples):
            raise ValueError("features and examples must align")
        self.features = features
        self.examples = examples
        self.info = info

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return dict(self.features[i])

    @property
    def num_tokens(self) -> int:
        return sum(len(f["input_ids"]) for f in self.features)

    def __repr__(self) -> str:
        return f"TokenizedDataset({len(self)} examples, {self.num_tokens} tokens, {self.info})"


def tokenize_records(records: list[Record], tokenizer, *, max_length: int = 1024, template: str = "auto",
                     truncate_prompt: bool = False, on_error: str = "raise",
                     info: dict[str, Any] | None = None) -> TokenizedDataset:
    """Tokenise records (loss on responses only); see :func:`load_data`."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    policy = ErrorPolicy(on_error)
    features, kept = [], []
    for record in records:
        try:
            features.append(tokenize_record(record, tokenizer, max_length=max_length, template=template,
                                            truncate_prompt=truncate_prompt))
            kept.append(record)
        except DataError as err:
            policy.handle(err)
    n_skipped = len(policy.skipped)
    policy.report("examples that could not be tokenised within max_length")
    if not features:
        raise DataError(f"no examples left after tokenisation ({n_skipped} skipped); "
                        f"raise max_length (now {max_length}) or check the data.")
    meta = dict(info or {}, template="chat" if use_chat_template(tokenizer, template) else "plain",
                max_length=max_length, skipped=n_skipped)
    return TokenizedDataset(features, kept, meta)


def load_data(source: str, tokenizer, *, max_length: int = 1024, truncate_prompt: bool = False,
              template: str = "auto", **options: Any) -> TokenizedDataset:
    """Tokenised examples of one split of ``source``; labels are -100 on prompt tokens.

    ``options`` are :func:`load_records`'s (``split``, ``fraction``, ``seed``, ``max_examples``,
    ``max_per_task``, ``val_fraction``, ``test_fraction``, ``on_error``, ``mixing``). Uses the
    tokenizer's chat template when it has one (``template="auto"``), else the plain
    ``### Instruction / ### Response`` format ending in eos. Examples longer than ``max_length``
    raise (naming the example) unless ``on_error="skip"`` (warn and drop) or
    ``truncate_prompt=True`` (drop prompt tokens from the left; the final response is never cut).
    """
    call = inspect.signature(load_records).bind(source, **options)  # a wrong option name is a TypeError here
    call.apply_defaults()
    chosen = call.arguments
    records = load_records(*call.args, **call.kwargs)
    ds = tokenize_records(records, tokenizer, max_length=max_length, template=template,
                          truncate_prompt=truncate_prompt, on_error=chosen["on_error"],
                          info={"source": source, "split": canonical_split(chosen["split"]), "seed": chosen["seed"],
                                "fraction": chosen["fraction"]})
    logger.info("%s", ds)
    return ds
