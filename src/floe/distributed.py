"""Data parallelism for the passes that read every batch once (layer selection), on ``accelerate``.

Under ``torchrun``/``accelerate launch`` every process holds the same list of batches;
:func:`shard` gives each one a contiguous block of them (accelerate's
``split_between_processes``), :func:`gather_rows` puts the per-batch rows back together in batch
order (``pad_across_processes`` + ``gather``, then the padding dropped), and :func:`reduce_sum` /
:func:`reduce_max` wrap accelerate's ``reduce``. So every process ends with exactly what one
process computes. In a single process all of them are no-ops and :func:`shard` streams.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import gather, pad_across_processes, reduce


def state() -> PartialState:
    """accelerate's process state (initialises ``torch.distributed`` under torchrun when needed).

    Without CUDA (or MPS) the processes are CPU ones (gloo): accelerate has to be told, as
    :mod:`floe.training` tells the Trainer, or it sees one process per torchrun worker. A process
    group made before (by a script, a test) is followed: gloo's collectives run on CPU tensors.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_backend() != "nccl":
        st = PartialState(cpu=True, backend=dist.get_backend())
    else:
        mps = getattr(torch.backends, "mps", None)
        st = PartialState(cpu=not (torch.cuda.is_available() or (mps is not None and mps.is_available())))
    if dist.is_available() and dist.is_initialized() and st.num_processes != dist.get_world_size():
        raise RuntimeError(f"accelerate sees {st.num_processes} processes but torch.distributed "
                           f"{dist.get_world_size()}; create the accelerate state with the right device first")
    return st


def rank_and_world() -> tuple[int, int]:
    """``(process index, number of processes)``; ``(0, 1)`` without torch.distributed."""
    st = state()
    return st.process_index, st.num_processes


def shard(items: Iterable[Any]) -> Iterable[tuple[int, Any]]:
    """``(index, item)`` for the items this process handles: all of them, streamed, in one process;
    a contiguous block of the (listed) items under torch.distributed."""
    st = state()
    if st.num_processes == 1:
        return enumerate(items)
    with st.split_between_processes(list(enumerate(items))) as mine:
        return mine


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every process's rows (dimension 0), concatenated in process order, on the CPU.

    With :func:`shard`'s contiguous blocks that is item order. The blocks may differ in length
    (and be empty): they are padded for the gather and the padding is dropped.
    """
    st = state()
    if st.num_processes == 1:
        return local
    counts = gather(torch.tensor([local.shape[0]], device=st.device)).tolist()
    padded = pad_across_processes(local.to(st.device), dim=0)
    rows = gather(padded).cpu()
    per = padded.shape[0]
    return torch.cat([rows[r * per: r * per + n] for r, n in enumerate(counts)])


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over processes (a new tensor on ``t``'s device); ``t`` itself in one process."""
    st = state()
    if st.num_processes == 1:
        return t
    return reduce(t.to(st.device), reduction="sum").to(t.device)


def reduce_max(value: float) -> float:
    """The largest ``value`` over processes."""
    st = state()
    if st.num_processes == 1:
        return value
    return float(reduce(torch.tensor([float(value)], dtype=torch.float64, device=st.device), reduction="max"))


def wait_for_everyone() -> None:
    """Barrier (no-op in one process)."""
    state().wait_for_everyone()
