"""Turning a source string into records, grouped by task.

Sources, tried in this order:

- ``bigbench:<name>[,<name>...]``: BIG-bench JSON tasks (see :mod:`floe.data.bigbench`);
- a local ``.json`` / ``.jsonl`` / ``.parquet`` file (one task, named after the file);
- a local folder: a data set saved with ``datasets.save_to_disk``, or a folder of
  json/jsonl/parquet files (one task per file; files whose names say ``train``,
  ``validation``/``valid``/``dev`` or ``test`` give the splits);
- ``hf:<name>[:<config>]`` or a bare ``owner/name``: a Hugging Face Hub data set, only
  when online (``HF_HUB_OFFLINE`` unset or 0).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import bigbench
from .records import DataError, ErrorPolicy, Record, enumerate_rows, read_json_rows, read_parquet_rows, rows_to_records

FILE_SUFFIXES = (".json", ".jsonl", ".parquet")
_SPLIT_WORDS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                "val": "validation", "dev": "validation", "test": "test", "testing": "test"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class Loaded:
    """Items of a source: ``tasks`` to be split by us, ``presplit`` tasks that come with splits.

    Items are :class:`Record` s, or lazy items with a ``to_record()`` method (BIG-bench).
    """

    tasks: dict[str, list[Any]] = field(default_factory=dict)
    presplit: dict[str, dict[str, list[Record]]] = field(default_factory=dict)
    mixing: str = "proportional"

    def count(self) -> int:
        return sum(map(len, self.tasks.values())) + sum(
            len(v) for splits in self.presplit.values() for v in splits.values())


def hub_online() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("", "0", "false", "no", "off")


def load_source(source: str, policy: ErrorPolicy) -> Loaded:
    """All records of ``source`` (no splitting yet)."""
    if source.startswith("bigbench:"):
        names = [n for n in source[len("bigbench:"):].split(",") if n.strip()]
        if not names:
            raise DataError("bigbench: needs a task name, e.g. bigbench:natural_instructions")
        return Loaded(tasks=bigbench.load_tasks(names), mixing="equal")
    path = Path(source).expanduser()
    if path.is_file():
        return Loaded(tasks={path.stem: _file_records(path, path.stem, policy)})
    if path.is_dir():
        return _folder(path, policy)
    if source.startswith("hf:") or (_HUB_ID.match(source) and path.suffix.lower() not in FILE_SUFFIXES):
        return _hub(source.removeprefix("hf:"), policy)
    raise DataError(f"{source}: no such file or folder. Fix: check the path (json, jsonl, parquet or a "
                    f"folder), or use bigbench:<task> or hf:<dataset>.")


def _file_records(path: Path, task: str, policy: ErrorPolicy) -> list[Record]:
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        rows = read_json_rows(path, policy)
    elif suffix == ".parquet":
        rows = read_parquet_rows(path)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; expected .json, .jsonl or .parquet.")
    return rows_to_records(rows, str(path), task, policy)


def _split_of(path: Path) -> str | None:
    words = re.split(r"[^a-z]+", path.name.lower())
    hits = {_SPLIT_WORDS[w] for w in words if w in _SPLIT_WORDS}
    return hits.pop() if len(hits) == 1 else None


def _folder(path: Path, policy: ErrorPolicy) -> Loaded:
    if any((path / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
        import datasets

        return _from_hf(datasets.load_from_disk(str(path)), str(path), policy)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)
    if not files:
        raise DataError(f"{path}: the folder has no .json, .jsonl or .parquet files and is not a saved "
                        f"Hugging Face data set.")
    splits = {f: _split_of(f) for f in files}
    if not any(splits.values()):  # no split names: every file is a task we split ourselves
        return Loaded(tasks={_task_name(f, path): _file_records(f, _task_name(f, path), policy) for f in files})
    unnamed = [str(f) for f, s in splits.items() if s is None]
    if unnamed:
        raise DataError(f"{path}: some files name a split (train/validation/test) and some do not: "
                        f"{', '.join(unnamed[:3])}. Fix: name every file after its split, or none.")
    task = path.name
    native: dict[str, list[Record]] = {}
    for f, split in splits.items():
        native.setdefault(split, []).extend(_file_records(f, task, policy))
    return Loaded(presplit={task: native})


def _task_name(file: Path, root: Path) -> str:
    return str(file.relative_to(root).with_suffix("")).replace(os.sep, "/")


def _hub(spec: str, policy: ErrorPolicy) -> Loaded:
    if not hub_online():
        raise DataError(
            f"{spec!r} is not a local file or folder, and loading Hugging Face data sets by name is disabled "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')}). Fix: give a local path, or unset "
            f"HF_HUB_OFFLINE to download from the Hub."
        )
    import datasets

    name, _, config = spec.partition(":")
    return _from_hf(datasets.load_dataset(name, config or None), name, policy)


def _from_hf(ds: Any, label: str, policy: ErrorPolicy) -> Loaded:
    import datasets

    task = Path(label).name or label
    if isinstance(ds, datasets.Dataset):
        return Loaded(tasks={task: _hf_records(ds, f"data set {label!r}", task, policy)})
    named = {split: _SPLIT_WORDS.get(split.lower(), split) for split in ds}
    if len(ds) == 1:
        (only,) = ds
        return Loaded(tasks={task: _hf_records(ds[only], f"data set {label!r} split {only!r}", task, policy)})
    native: dict[str, list[Record]] = {}
    for split, canon in named.items():
        native.setdefault(canon, []).extend(_hf_records(ds[split], f"data set {label!r} split {split!r}", task, policy))
    return Loaded(presplit={task: native})


def _hf_records(ds: Any, label: str, task: str, policy: ErrorPolicy) -> list[Record]:
    return rows_to_records(list(enumerate_rows(ds, label)), label, task, policy)
