"""Untokenised examples and the three supported row schemas.

A :class:`Record` is a conversation (``messages``: list of ``{role, content}``)
plus metadata. Rows from files or data sets are turned into records by
:func:`rows_to_records`, which detects the schema once per file from the
column names:

- Alpaca: ``instruction``, ``output``, optional ``input``
- Dolly: ``instruction``, ``response``, optional ``context`` (and ``category``)
- chat: ``messages`` (list of ``{role, content}``; the loss covers assistant turns)

Every problem is reported with its location (file and line / item / row) and field.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from floe.errors import InputError

logger = logging.getLogger("floe.data")

ROLES = ("system", "user", "assistant")


class DataError(InputError):
    """A data source is malformed or cannot be used; the message says where and how to fix it."""


class SkipExample(DataError):
    """An example its source marks unusable (e.g. an empty BIG-bench target): skipped with a warning."""


@dataclass
class Record:
    """One example: a conversation and its metadata.

    ``meta`` always has ``task`` (the task/file it came from, used for per-task
    splits), ``where`` (a human-readable location for error messages) and
    ``references`` (acceptable responses, the first being the training target);
    BIG-bench records also carry ``choices``/``target_scores`` for multiple choice.
    """

    messages: list[dict[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """The conversation up to (not including) the last assistant turn."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]

    @property
    def response(self) -> str:
        """Content of the last assistant turn (the training target)."""
        return [m for m in self.messages if m["role"] == "assistant"][-1]["content"]


@dataclass(frozen=True)
class Schema:
    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()

    def describe(self) -> str:
        req = ", ".join(f"'{f}'" for f in self.required)
        opt = ", ".join(f"'{f}'" for f in self.optional)
        return f"{self.name} ({req}" + (f"; optional {opt})" if opt else ")")


ALPACA = Schema("Alpaca", ("instruction", "output"), ("input", "system"))
DOLLY = Schema("Dolly", ("instruction", "response"), ("context", "category"))
CHAT = Schema("chat", ("messages",))
SCHEMAS = (CHAT, ALPACA, DOLLY)  # order = priority when a row matches several


def _matches(row: dict, schema: Schema) -> bool:
    return all(f in row for f in schema.required)


def detect_schema(rows: Iterable[tuple[str, Any]], source: str) -> tuple[Schema, str]:
    """Schema of a file: the first schema matched by the first row that matches any.

    Returns the schema and the location of the row it was detected from.
    """
    seen: set[str] = set()
    for where, row in rows:
        if not isinstance(row, dict):
            continue
        seen.update(map(str, row))
        for schema in SCHEMAS:
            if _matches(row, schema):
                return schema, where
    expected = "; ".join(s.describe() for s in SCHEMAS)
    found = ", ".join(sorted(f"'{k}'" for k in seen)) or "none"
    raise DataError(
        f"{source}: no row has the fields of a supported schema. Expected one of: {expected}. "
        f"Fields found: {found}. Fix: rename the columns to one of these schemas."
    )


def _text(row: dict, name: str, where: str, schema: Schema, *, required: bool) -> str:
    if name not in row or row[name] is None:
        if required:
            raise DataError(
                f"{where}: field '{name}' is missing; the {schema.describe()} schema needs it."
            )
        return ""
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__} ({value!r:.60}).")
    return value


def _nonempty(value: str, name: str, where: str) -> str:
    if not value.strip():
        raise DataError(f"{where}: field '{name}' is empty; every example needs a non-empty {name}.")
    return value


def _join(*parts: str) -> str:
    return "\n\n".join(p.strip() for p in parts if p and p.strip())


def row_to_record(row: Any, schema: Schema, where: str, task: str) -> Record:
    """Convert one row of a known schema into a :class:`Record` (raises :class:`DataError`)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with the {schema.describe()} fields, got {type(row).__name__}.")
    meta: dict[str, Any] = {"task": task, "where": where, "schema": schema.name}
    if schema is CHAT:
        messages = _chat_messages(row.get("messages"), where)
    else:
        instruction = _text(row, "instruction", where, schema, required=True)
        if schema is ALPACA:
            extra = _text(row, "input", where, schema, required=False)
            answer = _nonempty(_text(row, "output", where, schema, required=True), "output", where)
            system = _text(row, "system", where, schema, required=False)
        else:
            extra = _text(row, "context", where, schema, required=False)
            answer = _nonempty(_text(row, "response", where, schema, required=True), "response", where)
            system = ""
            if isinstance(row.get("category"), str):
                meta["category"] = row["category"]
        prompt = _nonempty(_join(instruction, extra), "instruction", where)
        messages = ([{"role": "system", "content": system}] if system.strip() else []) + [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ]
    if "id" in row and isinstance(row["id"], (str, int)):
        meta["id"] = row["id"]
    record = Record(messages, meta)
    meta["references"] = [record.response]
    return record


def _chat_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects, "
                        f"got {type(messages).__name__}.")
    out = []
    for i, m in enumerate(messages):
        f = f"messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where}: field '{f}' must be an object with 'role' and 'content', got {type(m).__name__}.")
        for key in ("role", "content"):
            if key not in m:
                raise DataError(f"{where}: field '{f}.{key}' is missing; chat messages need 'role' and 'content'.")
            if not isinstance(m[key], str):
                raise DataError(f"{where}: field '{f}.{key}' must be a string, got {type(m[key]).__name__}.")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: field '{f}.role' is {m['role']!r}; expected one of {', '.join(ROLES)}.")
        if m["role"] == "assistant":
            if not any(p["role"] == "user" for p in out):
                raise DataError(f"{where}: field '{f}': an assistant turn must follow a user turn.")
            _nonempty(m["content"], f"{f}.content", where)
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: field 'messages' has no assistant turn; the loss needs at least one.")
    return out


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Log a data warning once per process: loading the train and validation splits reads the same
    source twice, and the same skipped rows must not be reported twice."""
    if message not in _warned:
        _warned.add(message)
        logger.warning("%s", message)


class ErrorPolicy:
    """Applies ``on_error``: raise at once, or count, log and skip bad examples."""

    def __init__(self, on_error: str):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.skipped: list[str] = []

    def handle(self, err: DataError) -> None:
        if self.on_error == "raise":
            raise err
        self.skipped.append(str(err))

    def report(self, what: str) -> None:
        if self.skipped:
            first = "\n  ".join(self.skipped[:3])
            warn_once(f"skipped {len(self.skipped)} {what} (on_error='skip'); first: \n  {first}")
            self.skipped = []


def materialize(items: list[Any], policy: ErrorPolicy) -> list[Record]:
    """Records from selected items: records as they are, lazy items via their ``to_record()``."""
    records, unusable = [], []
    for item in items:
        if isinstance(item, Record):
            records.append(item)
            continue
        try:
            records.append(item.to_record())
        except SkipExample as err:
            unusable.append(str(err))
        except DataError as err:
            policy.handle(err)
    if unusable:
        warn_once(f"skipped {len(unusable)} unusable examples (first: {unusable[0]})")
    return records


def rows_to_records(rows: list[tuple[str, Any]], source: str, task: str, policy: ErrorPolicy) -> list[Record]:
    """Detect the schema of ``rows`` (``(location, row)`` pairs of one file) and convert them."""
    if not rows and policy.skipped:
        raise DataError(f"{source}: no usable examples ({len(policy.skipped)} malformed rows skipped); "
                        f"first problem: {policy.skipped[0]}")
    if not rows:
        raise DataError(f"{source}: the data set is empty. Fix: point to a file with at least one example.")
    schema, detected_at = detect_schema(rows, source)
    logger.debug("%s: %s schema (detected at %s)", source, schema.name, detected_at)
    records = []
    for where, row in rows:
        try:
            if isinstance(row, dict) and not _matches(row, schema):
                missing = [f for f in schema.required if f not in row]
                raise DataError(
                    f"{where}: field {', '.join(repr(f) for f in missing)} missing; this file uses the "
                    f"{schema.describe()} schema (detected at {detected_at})."
                )
            records.append(row_to_record(row, schema, where, task))
        except DataError as err:
            policy.handle(err)
    return records


# --- files -----------------------------------------------------------------
# Read here rather than with datasets.load_dataset("json"/"parquet"): an error must name the file
# and line of the bad row, on_error="skip" must drop single bad lines, and a .json file holding JSON
# Lines must still load; load_dataset fails the whole file and writes an Arrow copy into its cache.


def read_json_rows(path: Path, policy: ErrorPolicy) -> list[tuple[str, Any]]:
    """Rows of a JSON list or JSONL file as ``(location, value)`` pairs.

    A ``.json`` file that holds JSON Lines is accepted too (a common mix-up).
    """
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":
                raise DataError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}.") from None
            return _jsonl_rows(path, text, policy)  # several top-level values: JSON Lines
        if not isinstance(data, list):
            raise DataError(
                f"{path}: expected a JSON list of examples (or JSON Lines), got a {type(data).__name__}"
                + (f" with keys {sorted(data)[:6]}" if isinstance(data, dict) else "") + "."
            )
        return [(f"{path}, item {i}", row) for i, row in enumerate(data)]
    return _jsonl_rows(path, text, policy)


def _jsonl_rows(path: Path, text: str, policy: ErrorPolicy) -> list[tuple[str, Any]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            policy.handle(DataError(f"{where}: invalid JSON at column {err.colno}: {err.msg}. "
                                    f"Each line of a JSONL file must be one JSON object."))
            continue
        if not isinstance(row, dict):
            policy.handle(DataError(f"{where}: expected a JSON object, got {type(row).__name__}."))
            continue
        rows.append((where, row))
    return rows


def read_parquet_rows(path: Path) -> list[tuple[str, Any]]:
    import pyarrow.parquet as pq  # installed with `datasets`

    return [(f"{path}, row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]


def enumerate_rows(rows: Iterable[dict], label: str) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(rows):
        yield f"{label}, row {i}", row

