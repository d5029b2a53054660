"""What result files record about the code that made them: package versions and the git commit."""
from __future__ import annotations

import importlib.metadata as md
import platform
import subprocess
from pathlib import Path

DEFAULT_PACKAGES = ("floe", "torch", "transformers", "peft", "optuna")


def package_versions(packages: tuple[str, ...] = DEFAULT_PACKAGES, python: bool = True) -> dict[str, str]:
    """Installed versions of ``packages`` (those not installed are left out), and Python's."""
    out = {"python": platform.python_version()} if python else {}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    """The short commit of the checkout this code runs from (None outside a git checkout)."""
    try:
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True,
                              timeout=10, cwd=Path(__file__).parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None
