"""BIG-bench JSON tasks, read from the ``bigbench==1.0.0`` source archive.

The archive (358 MB .tar.gz, from PyPI via :func:`floe.cache.pip_download`; never
installed) holds ~1000 ``task.json`` files, 1.7 GB uncompressed. We extract only the
requested ones into the cache, several members per pass (one pass over the gzip
stream costs ~9 s whatever is extracted), and cache the list of members so that
name resolution needs no pass at all.

Names (after ``bigbench:``; several may be joined with commas):

- ``natural_instructions``: every subtask of a task with subtasks (the 61 NI subtasks);
- ``sports_understanding``: a single task;
- ``subtask001_quoref_question_generation`` or ``natural_instructions/subtask001_...``:
  one subtask.

Prompts follow BIG-bench's zero-shot format (``bigbench/api/json_task.py``):
``task_prefix + example_input_prefix + input [+ choices] + example_output_prefix``,
with the task prefix as its own paragraph and outer whitespace stripped.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from floe.io import atomic_file

from ..cache import cache_dir, pip_download
from .records import DataError, Record, SkipExample, logger

REQUIREMENT = "bigbench==1.0.0"
_MARK = "/benchmark_tasks/"
_INDEX_VERSION = 1

# BIG-bench's defaults for JSON tasks (bigbench/api/json_task.py).
DEFAULT_INPUT_PREFIX = "\nQ: "
DEFAULT_OUTPUT_PREFIX = "\nA: "
DEFAULT_CHOICE_PREFIX = "\n  choice: "


def fetch_archive() -> Path:
    """Path of the BIG-bench source archive, downloaded into the cache on first use (offline:
    a missing archive is a ``FetchError`` naming ``floe fetch bigbench``)."""
    return pip_download(REQUIREMENT, fetch_command="floe fetch bigbench")


def task_root() -> Path:
    """Where extracted ``<task>/task.json`` files live."""
    return cache_dir() / "bigbench-1.0.0" / "tasks"


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through an open file handle, atomically (see :func:`floe.io.atomic_file`)."""
    def through_handle(tmp: str) -> None:
        with open(tmp, mode) as fh:
            write(fh)

    atomic_file(path, through_handle)


def _task_key(member: str) -> str | None:
    """``.../benchmark_tasks/natural_instructions/subtask001_x/task.json`` -> ``natural_instructions/subtask001_x``."""
    if _MARK not in member:
        return None
    rel = member.split(_MARK, 1)[1]
    parent, _, base = rel.rpartition("/")
    return parent if base in ("task.json", "task.py") and parent else None


def scan_archive(archive: Path, wanted: Callable[[str], bool]) -> dict[str, Any]:
    """One pass over the archive: list its tasks and extract the ``task.json`` of wanted keys."""
    index: dict[str, Any] = {"version": _INDEX_VERSION, "archive": archive.name,
                             "archive_size": archive.stat().st_size, "json": {}, "programmatic": []}
    root = task_root()
    with tarfile.open(archive, "r|gz") as tar:  # streaming: each member read once, in order
        for member in tar:
            key = _task_key(member.name)
            if key is None or not member.isfile():
                continue
            if member.name.endswith("task.py"):
                index["programmatic"].append(key)
                continue
            index["json"][key] = {"member": member.name, "size": member.size}
            target = root / key / "task.json"
            if wanted(key) and not target.exists():
                src = tar.extractfile(member)
                assert src is not None
                _atomic_write(target, lambda fh: _copy(src, fh))
    return index


def _copy(src, dst) -> None:
    while chunk := src.read(1 << 20):
        dst.write(chunk)


def _index_path() -> Path:
    return cache_dir() / "bigbench-1.0.0" / "index.json"


def load_index(archive: Path, wanted: Callable[[str], bool] = lambda k: False) -> dict[str, Any]:
    """The cached member index, building it (one scan, extracting ``wanted`` keys on the way) if needed."""
    path = _index_path()
    if path.exists():
        try:
            index = json.loads(path.read_text())
            if index.get("version") == _INDEX_VERSION and index.get("archive_size") == archive.stat().st_size:
                return index
        except (OSError, json.JSONDecodeError):
            pass  # corrupt or stale: rebuild
    index = scan_archive(archive, wanted)
    _atomic_write(path, lambda fh: json.dump(index, fh), mode="w")
    return index


def _could_need(names: list[str]) -> Callable[[str], bool]:
    def wanted(key: str) -> bool:
        return any(key == n or key.startswith(n + "/") or key.rsplit("/", 1)[-1] == n for n in names)
    return wanted


def resolve(names: list[str], index: dict[str, Any]) -> list[str]:
    """Task keys (directories holding a ``task.json``) for the requested names."""
    keys = set(index["json"])
    out: list[str] = []
    for name in names:
        name = name.strip().strip("/")
        children = sorted(k for k in keys if k.startswith(name + "/"))
        by_base = sorted(k for k in keys if k.rsplit("/", 1)[-1] == name)
        if children:  # a task with subtasks: its own task.json holds only metadata
            found = children
        elif name in keys:
            found = [name]
        elif len(by_base) == 1:
            found = by_base
        elif by_base:
            raise DataError(f"bigbench:{name} is ambiguous; it matches {', '.join(by_base)}. "
                            f"Fix: use the full name, e.g. bigbench:{by_base[0]}.")
        elif name in index["programmatic"]:
            raise DataError(f"bigbench:{name} is a programmatic task (task.py); only JSON tasks are supported.")
        else:
            tops = sorted({k.split("/", 1)[0] for k in keys} | {k.rsplit('/', 1)[-1] for k in keys})
            close = difflib.get_close_matches(name, tops, n=5)
            raise DataError(f"bigbench:{name}: no such JSON task in {REQUIREMENT}."
                            + (f" Did you mean: {', '.join(close)}?" if close else "")
                            + " Fix: use a directory name under bigbench/benchmark_tasks/.")
        out.extend(k for k in found if k not in out)
    return out


def ensure_extracted(names: list[str]) -> list[tuple[str, Path]]:
    """Resolve names to tasks and make sure their ``task.json`` files are in the cache.

    Returns ``(task key, path)`` pairs. Missing files are extracted in a single pass.
    """
    archive = fetch_archive()
    index = load_index(archive, wanted=_could_need(names))
    keys = resolve(names, index)
    root = task_root()
    missing = {k for k in keys if not (root / k / "task.json").exists()}
    if missing:
        logger.info("extracting %d BIG-bench task files from %s", len(missing), archive.name)
        scan_archive(archive, wanted=missing.__contains__)
    return [(k, root / k / "task.json") for k in keys]


# --- task.json -> records -----------------------------------------------------


def _choice_order(choices: list[str], example_input: str) -> list[str]:
    """A fixed shuffle of the options (BIG-bench permutes them too), the same on every run."""
    seed = int.from_bytes(hashlib.sha256(example_input.encode()).digest()[:8], "big")
    order = sorted(choices)
    random.Random(seed).shuffle(order)
    return order


class EmptyTarget(SkipExample):
    """An example with no non-empty target (one in the NI subtasks): skipped, whatever ``on_error``."""


def example_to_record(example: Any, task: dict[str, Any], key: str, index: int) -> Record:
    """One BIG-bench example as a single-turn record (raises :class:`DataError`)."""
    where = f"bigbench task '{key}', example {index}"
    if not isinstance(example, dict):
        raise DataError(f"{where}: expected an object, got {type(example).__name__}.")
    text = example.get("input")
    if not isinstance(text, str):
        raise DataError(f"{where}: field 'input' must be a string, got {type(text).__name__}.")
    scores = example.get("target_scores")
    choices = score_values = None
    if scores is not None:
        if not isinstance(scores, dict) or not scores:
            raise DataError(f"{where}: field 'target_scores' must be a non-empty object of option -> score.")
        choices, score_values = list(scores), [float(v) for v in scores.values()]
    target = example.get("target")
    if target is not None:
        targets = target if isinstance(target, list) else [target]
        if not targets or not all(isinstance(t, (str, int, float)) for t in targets):
            raise DataError(f"{where}: field 'target' must be a string or a non-empty list of strings.")
        references = [str(t) for t in targets]
    elif choices is not None:
        best = max(score_values)  # first option with the highest score, as BIG-bench does
        references = [choices[score_values.index(best)]]
    else:
        raise DataError(f"{where}: field 'target' or 'target_scores' is missing.")
    response = next((r.strip() for r in references if r.strip()), "")
    if not response:
        raise EmptyTarget(f"{where}: field 'target' is empty.")

    body = text
    if choices is not None and task.get("append_choices_to_input", True):
        prefix = task.get("choice_prefix", DEFAULT_CHOICE_PREFIX)
        body += prefix + prefix.join(_choice_order(choices, text))
    body = task.get("example_input_prefix", DEFAULT_INPUT_PREFIX) + body
    body += task.get("example_output_prefix", DEFAULT_OUTPUT_PREFIX)
    prompt = "\n\n".join(p.strip() for p in (task.get("task_prefix", ""), body) if p.strip())
    meta = {"task": key, "where": where, "schema": "bigbench", "index": index,
            "references": references, "choices": choices, "target_scores": score_values,
            "preferred_score": task.get("preferred_score"), "metrics": task.get("metrics")}
    return Record([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], meta)


def _fingerprint(example: Any) -> Any:
    """Identity of an example for dropping duplicates: same input and targets (cheaper than json.dumps)."""
    if not isinstance(example, dict):
        return repr(example)
    return example.get("input"), repr(example.get("target")), repr(example.get("target_scores"))


@dataclass(frozen=True)
class PendingExample:
    """A BIG-bench example turned into a :class:`Record` only if selected (most of 193k are not)."""

    key: str
    index: int
    example: Any
    task: dict[str, Any]

    def to_record(self) -> Record:
        return example_to_record(self.example, self.task, self.key, self.index)


def task_examples(key: str, path: Path) -> list[PendingExample]:
    """Examples of one extracted task, exact duplicates removed (as BIG-bench does)."""
    try:
        task = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}. "
                        f"Fix: delete the file so that it is extracted again.") from None
    examples = task.pop("examples", None) if isinstance(task, dict) else None
    if not isinstance(examples, list) or not examples:
        raise DataError(f"bigbench task '{key}' ({path}) has no 'examples' list.")
    seen: set[Any] = set()
    out = []
    for i, example in enumerate(examples):
        fingerprint = _fingerprint(example)
        if fingerprint not in seen:
            seen.add(fingerprint)
            out.append(PendingExample(key, i, example, task))
    if len(out) < len(examples):
        logger.info("bigbench task '%s': dropped %d duplicate examples", key, len(examples) - len(out))
    return out


def load_tasks(names: list[str]) -> dict[str, list[PendingExample]]:
    """Examples of each requested BIG-bench task, keyed by task."""
    return {key: task_examples(key, path) for key, path in ensure_extracted(names)}
