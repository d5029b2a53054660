"""Training data: sources -> records -> token ids with the loss on responses only.

>>> ds = load_data("bigbench:natural_instructions", tokenizer, max_examples=400)
>>> batch = next(iter_batches(ds, 8, DataCollator(tokenizer)))

See :func:`load_records` / :func:`load_data` for the options (splits, caps, warm-up
fraction, error handling) and :mod:`floe.data.sources` for the accepted sources.
"""
from .collate import DataCollator, iter_batches
from .loading import TokenizedDataset, load_data, load_records, tokenize_records
from .records import DataError, Record
from .tokenize import IGNORE_INDEX, render_prompt, tokenize_record

__all__ = [
    "DataCollator", "DataError", "IGNORE_INDEX", "Record", "TokenizedDataset", "iter_batches",
    "load_data", "load_records", "render_prompt", "tokenize_record", "tokenize_records",
]
