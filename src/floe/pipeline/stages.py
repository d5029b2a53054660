"""Cached pipeline stages: a folder per (stage, fingerprint of its inputs), finished when its
``stage.json`` exists (written last, atomically). Equal inputs → the same folder → the stage is
skipped; a changed input → a new fingerprint → that stage and those downstream of it run again.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from floe.io import atomic_write_text

STAGE_FILE = "stage.json"


def fingerprint(inputs: Any) -> str:
    """A short stable hash of JSON-able ``inputs``."""
    text = json.dumps(inputs, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Stage:
    """One stage's folder under ``root``, named by the stage and the fingerprint of its inputs."""

    name: str
    inputs: dict[str, Any]
    root: Path

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.inputs)

    @property
    def dir(self) -> Path:
        return self.root / f"{self.name}-{self.fingerprint}"

    def record(self) -> dict[str, Any] | None:
        """The finished stage's record, or None when it has not finished."""
        path = self.dir / STAGE_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def finish(self, result: dict[str, Any], seconds: float, peak_memory_mb: float) -> dict[str, Any]:
        record = {"name": self.name, "fingerprint": self.fingerprint, "inputs": self.inputs, "result": result,
                  "seconds": seconds, "peak_memory_mb": peak_memory_mb}
        text = json.dumps(record, indent=2, default=str)
        atomic_write_text(self.dir / STAGE_FILE, text + "\n")
        return json.loads(text)  # as a later run reads it back (tuples become lists)


def _rss_mb() -> float | None:
    try:  # Linux: resident pages now (ru_maxrss is the whole process's peak, not a stage's)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


@contextmanager
def peak_memory() -> Iterator[dict[str, float]]:
    """Peak memory of the block: CUDA max allocated, or the resident set sampled every 20 ms."""
    out: dict[str, float] = {"mb": 0.0}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        yield out
        out["mb"] = torch.cuda.max_memory_allocated() / 2**20
        return
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            out["mb"] = max(out["mb"], _rss_mb() or 0.0)
            stop.wait(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["mb"] = max(out["mb"], _rss_mb() or 0.0)


def run_stage(stage: Stage, work, log=print, label: str = "") -> tuple[dict[str, Any], bool]:
    """``work(stage.dir) -> result dict`` unless the stage finished before; returns (record, cached)."""
    label = label or stage.name
    done = stage.record()
    if done is not None:
        log(f"[floe] {label}: finished before ({stage.dir.name}), skipped")
        return done, True
    log(f"[floe] {label}: running in {stage.dir}")
    stage.dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with peak_memory() as peak:
        result = work(stage.dir)
    return stage.finish(result, time.perf_counter() - t0, peak["mb"]), False
