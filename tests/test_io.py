"""floe.io: atomic writes give shared outputs the usual permissions (0666/0777 minus the umask)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from floe.io import atomic_dir, atomic_file, atomic_write_text


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Run a test under a given umask and put the old one back."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                       (0o002, 0o664, 0o775)])
def test_atomic_outputs_get_the_permissions_a_plain_open_would_give(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    text = atomic_write_text(tmp_path / "a" / "metrics.json", "{}")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # reference: what open() gives under this umask
    assert _mode(text) == _mode(plain) == file_mode

    png = atomic_file(tmp_path / "plot.png", lambda tmp: Path(tmp).write_bytes(b"png"))
    assert _mode(png) == file_mode

    def write(folder: Path) -> None:
        (folder / "adapter_config.json").write_text("{}")
        (folder / "sub").mkdir()

    out = atomic_dir(tmp_path / "adapter", write)
    ref = tmp_path / "plain_dir"
    ref.mkdir()
    assert _mode(out) == _mode(ref) == dir_mode
    assert _mode(out / "adapter_config.json") == file_mode and _mode(out / "sub") == dir_mode
    # replacing an existing folder keeps the rule and leaves no temp or old folder behind
    atomic_dir(tmp_path / "adapter", write)
    assert _mode(tmp_path / "adapter") == dir_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "adapter", "plain.txt", "plain_dir", "plot.png"]


def test_a_writer_that_replaces_the_temp_file_still_gets_shared_permissions(tmp_path, umask):
    umask(0o022)

    def replace(tmp: str) -> None:  # e.g. a library that writes elsewhere and renames onto the path
        os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"x")
        os.close(fd)

    assert _mode(atomic_file(tmp_path / "w.bin", replace)) == 0o644


def test_a_failed_write_leaves_nothing(tmp_path):
    def boom(tmp):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_file(tmp_path / "x.json", boom)
    with pytest.raises(RuntimeError):
        atomic_dir(tmp_path / "d", boom)
    assert list(tmp_path.iterdir()) == []


def test_files_a_writer_makes_private_inside_an_atomic_folder_are_shared_too(tmp_path, umask):
    import torch
    from safetensors.torch import save_file

    umask(0o022)

    def write(folder: Path) -> None:
        save_file({"w": torch.zeros(2)}, str(folder / "adapter.safetensors"))  # safetensors writes 0600
        script = folder / "run.sh"
        script.write_text("#!/bin/sh\n")
        script.chmod(0o700)

    out = atomic_dir(tmp_path / "adapter", write)
    assert _mode(out / "adapter.safetensors") == 0o644
    assert _mode(out / "run.sh") == 0o755  # execute bits kept, opened to the group and others


def test_existing_folder_is_replaced_kept_or_merged_as_asked(tmp_path):
    def writer(**files: str):
        return lambda folder: [(folder / name).write_text(text) for name, text in files.items()]

    def contents(folder: Path) -> dict[str, str]:
        return {p.name: p.read_text() for p in folder.iterdir()}

    target = tmp_path / "out"
    atomic_dir(target, writer(a="1", extra="x"))
    atomic_dir(target, writer(a="2", b="2"), existing="merge")  # new files in, other files stay
    assert contents(target) == {"a": "2", "b": "2", "extra": "x"}
    atomic_dir(target, writer(a="3"), existing="keep")  # another writer came first: its folder wins
    assert contents(target) == {"a": "2", "b": "2", "extra": "x"}
    atomic_dir(target, writer(a="4"))  # replace (the default): only the new folder's files
    assert contents(target) == {"a": "4"}
    atomic_dir(tmp_path / "new", writer(a="5"), existing="keep")  # nothing there yet: written
    assert contents(tmp_path / "new") == {"a": "5"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]  # no temp folder left
    with pytest.raises(ValueError, match="existing"):
        atomic_dir(target, writer(a="6"), existing="overwrite")
