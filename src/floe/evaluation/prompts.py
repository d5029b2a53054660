"""Prompts for generation and multiple choice: zero-shot or k-shot, rendered as training renders them."""
from __future__ import annotations

import random
from typing import Sequence

from floe.data import Record, render_prompt
from floe.data.tokenize import use_chat_template


def shot_pools(records: Sequence[Record]) -> dict[str, list[Record]]:
    """Demonstration candidates by task."""
    pools: dict[str, list[Record]] = {}
    for r in records:
        pools.setdefault(r.meta.get("task", ""), []).append(r)
    return pools


def draw_shots(record: Record, pools: dict[str, list[Record]], k: int, seed: int) -> list[Record]:
    """``k`` demonstrations from the record's own task, drawn by ``seed`` and the record (fewer if the pool is small)."""
    if k <= 0:
        return []
    task = record.meta.get("task", "")
    pool = [r for r in pools.get(task, []) if r.messages != record.messages]
    rng = random.Random(f"floe-shots:{seed}:{task}:{record.meta.get('where', '')}:{record.messages[0]['content'][:200]}")
    return rng.sample(pool, min(k, len(pool)))


def prompt_messages(record: Record, shots: Sequence[Record] = ()) -> list[dict[str, str]]:
    """The conversation to continue: the record's system turn(s), then each shot as a user/assistant
    exchange, then the record's prompt turns (a k-shot prompt is a multi-turn chat)."""
    own = record.prompt_messages
    system = [m for m in own if m["role"] == "system"]
    rest = [m for m in own if m["role"] != "system"]
    demos: list[dict[str, str]] = []
    for s in shots:
        demos += [m for m in s.prompt_messages if m["role"] != "system"]
        demos.append({"role": "assistant", "content": s.response})
    return system + demos + rest


def prompt_ids(messages: list[dict[str, str]], tokenizer, template: str = "auto") -> list[int]:
    """Token ids of the generation prompt (special tokens as :func:`floe.data.tokenize_record` adds them)."""
    text = render_prompt(messages, tokenizer, template)
    chat = use_chat_template(tokenizer, template)
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])
