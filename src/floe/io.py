"""Atomic writes: a file or folder appears complete or not at all (a killed run leaves no half output).

The temp file and folder come from ``tempfile`` (private: 0600 / 0700), and some writers make
private files too (``safetensors.save_file``); before they are moved into place they get the
permissions a plain ``open()`` / ``mkdir()`` would have given them (0666 / 0777 minus the
process umask, usually 0644 / 0755), so outputs can be shared.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def current_umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _share(path: str | os.PathLike, folder: bool) -> None:
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


def share_tree(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the permissions of a plain ``open()`` / ``mkdir()``
    (writers such as ``safetensors.save_file`` make private 0600 files); an owner-executable file stays executable (0777 minus the umask)."""
    mask = current_umask()
    root = Path(root)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            os.chmod(path, 0o777 & ~mask)
        else:
            executable = 0o111 if path.stat().st_mode & 0o100 else 0
            os.chmod(path, (0o666 | executable) & ~mask)


def atomic_file(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _share(tmp, folder=False)  # after write: a writer may have replaced the file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_file(path, lambda tmp: Path(tmp).write_text(text))


def atomic_dir(target: str | os.PathLike, write: Callable[[Path], None], *, existing: str = "replace") -> Path:
    """Write a folder's files into a temp dir beside ``target`` via ``write(tmp_dir)``, then move it in.

    ``existing`` says what happens to a folder already at ``target``: ``replace`` (swap the new one
    in), ``keep`` (it wins: another process wrote the same thing first, ours is dropped) or
    ``merge`` (each new entry replaces its namesake inside it; the folder's other files stay).
    """
    if existing not in ("replace", "keep", "merge"):
        raise ValueError(f"existing must be 'replace', 'keep' or 'merge', got {existing!r}")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        share_tree(tmp)  # the folder and the files the writer made
        if not target.exists():
            _move_or_lose_race(tmp, target, keep=existing == "keep")
        elif existing == "merge":
            for entry in sorted(tmp.iterdir()):
                os.replace(entry, target / entry.name)
        elif existing == "replace":
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless dropped, merged or failed
    return target


def _move_or_lose_race(tmp: Path, target: Path, keep: bool) -> None:
    """Rename ``tmp`` to ``target``; with ``keep``, a ``target`` that appeared meanwhile wins."""
    try:
        os.replace(tmp, target)
    except OSError:
        if not (keep and target.exists()):
            raise
