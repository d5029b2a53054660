"""Small shared builders for the training tests (tiny model + toy instruction data)."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import make_tokenizer, tiny_model
from transformers import TrainerCallback

QA = [
    ("What is the capital of France?", "Paris."),
    ("Translate 'cat' into French.", "chat"),
    ("Answer with one word: the opposite of hot.", "cold"),
    ("What colour is the sky?", "blue"),
    ("Name the capital of Italy.", "Rome."),
    ("Answer the question: 2 + 2 =", "4"),
]


def write_alpaca_jsonl(path: Path, n: int = 24) -> Path:
    rows = [{"instruction": q, "input": "", "output": a} for q, a in (QA * (n // len(QA) + 1))[:n]]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def tokenized(n: int = 24, tmp_path: Path | None = None, split: str = "train"):
    """A tokenised toy data set through the real floe.data path (JSONL → chat template)."""
    from floe.data import load_data

    assert tmp_path is not None
    f = write_alpaca_jsonl(tmp_path / "toy.jsonl", n)
    return load_data(str(f), make_tokenizer(), split=split, max_length=64, val_fraction=0.0, test_fraction=0.0)


def save_tiny_model_folder(path: Path, arch: str = "llama") -> Path:
    model = tiny_model(arch)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


class Killed(Exception):
    """What ``KillAfter`` raises: stands for the process being killed."""


class KillAfter(TrainerCallback):
    """Dies as a killed process would: after step ``step`` and its checkpoint, before the next step."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step >= self.step:
            raise Killed
