"""Records -> token ids and labels, with the loss on response tokens only.

The conversation is rendered to text as a list of segments, each marked as loss or
not (prompt). With a chat template, the response segment of assistant turn *i* is the
text between ``template(messages[:i], add_generation_prompt=True)`` and
``template(messages[:i+1])``, up to and including the end-of-turn special token that
follows the content (the trailing newline etc. stays masked). Without a chat template
the plain format is::

    ### Instruction:\\n{user}\\n\\n### Response:\\n{assistant}{eos}

The full text is tokenised once; a token gets its id as label when its character span
overlaps a loss segment, else -100. (``apply_chat_template(return_assistant_tokens_mask=True)``
would do this only for templates with ``{% generation %}`` markers, which most, SmolLM2's
included, do not have.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .records import DataError, Record

IGNORE_INDEX = -100
INSTRUCTION_HEADER = "### Instruction:\n"
RESPONSE_HEADER = "### Response:\n"


@dataclass
class Segment:
    text: str
    loss: bool


def use_chat_template(tokenizer, template: str = "auto") -> bool:
    if template not in ("auto", "chat", "plain"):
        raise ValueError(f"template must be 'auto', 'chat' or 'plain', got {template!r}")
    has = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has:
        raise ValueError("template='chat' but the tokenizer has no chat template; use 'plain' or 'auto'.")
    return has if template == "auto" else template == "chat"


def _special_tokens(tokenizer) -> list[str]:
    found = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    found.update(getattr(tokenizer, "all_special_tokens", []))
    return sorted((t for t in found if t), key=len, reverse=True)


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_segments(messages: list[dict], tokenizer, where: str = "example") -> list[Segment]:
    """Segments of a conversation rendered with the tokenizer's chat template."""
    try:
        return _chat_segments(messages, tokenizer, where)
    except DataError:
        raise
    except Exception as err:  # jinja errors, e.g. a template that refuses a 'system' turn
        raise DataError(f"{where}: the tokenizer's chat template failed on this conversation: {err}. "
                        f"Fix: adapt the messages to the template, or use template='plain'.") from err


def _chat_segments(messages: list[dict], tokenizer, where: str) -> list[Segment]:
    full = _render(tokenizer, messages, False)
    specials = _special_tokens(tokenizer)
    segments: list[Segment] = []
    pos = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], True)
        upto = _render(tokenizer, messages[:i + 1], False)
        if not (full.startswith(upto) and upto.startswith(prefix) and len(prefix) >= pos):
            raise DataError(
                f"{where}: the tokenizer's chat template does not render turn {i} as a prefix of the "
                f"conversation, so prompt and response cannot be told apart. Fix: use template='plain'."
            )
        span = upto[len(prefix):]
        content = message["content"]
        at = span.find(content)
        if at < 0 and content.strip():
            content = content.strip()  # templates that trim the content
            at = span.find(content)
        if at < 0:
            end = len(span)  # content rewritten by the template: supervise the whole turn
        else:
            end = at + len(content)
            rest = span[end:]
            gap = len(rest) - len(rest.lstrip(" "))
            eot = next((s for s in specials if rest[gap:].startswith(s)), None)
            end = end + gap + len(eot) if eot else len(span)
        segments.append(Segment(full[pos:len(prefix)], False))
        segments.append(Segment(span[:end], True))
        pos = len(prefix) + end
    segments.append(Segment(full[pos:], False))
    return [s for s in segments if s.text]


def plain_segments(messages: list[dict], eos: str) -> list[Segment]:
    """Segments of the plain format (no chat template)."""
    segments: list[Segment] = []
    for m in messages:
        if m["role"] == "system":
            segments.append(Segment(m["content"].strip() + "\n\n", False))
        elif m["role"] == "user":
            segments.append(Segment(INSTRUCTION_HEADER + m["content"].strip() + "\n\n", False))
        else:
            segments.append(Segment(RESPONSE_HEADER, False))
            segments.append(Segment(m["content"].strip() + eos, True))
            segments.append(Segment("\n\n", False))
    if segments and segments[-1].text == "\n\n" and not segments[-1].loss:
        segments.pop()  # nothing follows the last response
    return segments


def render_prompt(messages: list[dict], tokenizer, template: str = "auto") -> str:
    """Text to feed for generating the next assistant turn after ``messages`` (for evaluation)."""
    if use_chat_template(tokenizer, template):
        return _render(tokenizer, messages, True)
    return "".join(s.text for s in plain_segments(messages + [{"role": "assistant", "content": ""}], ""))


def segments_for(record: Record, tokenizer, template: str = "auto") -> list[Segment]:
    where = record.meta.get("where", "example")
    if use_chat_template(tokenizer, template):
        return chat_segments(record.messages, tokenizer, where)
    return plain_segments(record.messages, tokenizer.eos_token or "")


def tokenize_segments(segments: list[Segment], tokenizer, add_special_tokens: bool) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 outside loss segments) for rendered segments."""
    text = "".join(s.text for s in segments)
    spans, pos = [], 0
    for s in segments:
        if s.loss:
            spans.append((pos, pos + len(s.text)))
        pos += len(s.text)
    try:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except NotImplementedError:  # slow tokenizer: no offsets; tokenise segment by segment
        return _tokenize_piecewise(segments, tokenizer, add_special_tokens)
    ids = list(enc["input_ids"])
    labels = []
    for tok, (a, b) in zip(ids, enc["offset_mapping"]):
        hit = b > a and any(a < e and b > s for s, e in spans)
        labels.append(tok if hit else IGNORE_INDEX)
    return ids, labels


def _tokenize_piecewise(segments, tokenizer, add_special_tokens) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for k, s in enumerate(segments):
        piece = tokenizer(s.text, add_special_tokens=add_special_tokens and k == 0)["input_ids"]
        ids += piece
        labels += piece if s.loss else [IGNORE_INDEX] * len(piece)
    return ids, labels


def fit_length(ids: list[int], labels: list[int], max_length: int, truncate_prompt: bool,
               where: str) -> tuple[list[int], list[int]]:
    """Check ``max_length``; optionally drop prompt tokens from the left to fit.

    Only tokens before the last response may be dropped, so the result always keeps
    the complete final response and at least one supervised token.
    """
    if len(ids) <= max_length:
        return ids, labels
    last_start = _last_loss_run_start(labels)
    response = len(ids) - last_start
    if truncate_prompt and response <= max_length:
        cut = len(ids) - max_length
        return ids[cut:], labels[cut:]
    hint = "pass on_error='skip' to drop such examples" + (
        "" if truncate_prompt else ", or truncate_prompt=True to shorten the prompt")
    raise DataError(f"{where}: {len(ids)} tokens exceed max_length={max_length} (the last response alone is "
                    f"{response} tokens). Fix: raise max_length, {hint}.")


def _last_loss_run_start(labels: list[int]) -> int:
    """Index where the last supervised stretch begins (through any masked tokens up to the end)."""
    i = max(k for k, lab in enumerate(labels) if lab != IGNORE_INDEX)
    while i > 0 and labels[i - 1] != IGNORE_INDEX:
        i -= 1
    return i


def tokenize_record(record: Record, tokenizer, *, max_length: int, template: str = "auto",
                    truncate_prompt: bool = False) -> dict[str, Any]:
    """``{"input_ids", "labels"}`` of one record (raises :class:`DataError` on any problem)."""
    chat = use_chat_template(tokenizer, template)
    segments = segments_for(record, tokenizer, template)
    # Chat templates write their own BOS when they want one (as apply_chat_template does);
    # the plain format gets the tokenizer's usual special tokens.
    ids, labels = tokenize_segments(segments, tokenizer, add_special_tokens=not chat)
    where = record.meta.get("where", "example")
    if all(lab == IGNORE_INDEX for lab in labels):
        raise DataError(f"{where}: the response produced no supervised tokens; check the response text "
                        f"and the tokenizer's chat template.")
    ids, labels = fit_length(ids, labels, max_length, truncate_prompt, where)
    return {"input_ids": ids, "labels": labels}

