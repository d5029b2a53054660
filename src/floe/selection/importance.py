"""Per-batch mask gradients: the Fisher of the adapted model and the Taylor cost of the base model.

For every batch ``b`` and mask variable ``u`` (query head or FFN neuron, :mod:`.masks`) we record
``g[b, u] = ∂L_b/∂m_u`` at ``m = 1``, where ``L_b`` is the batch's next-token loss on its
response tokens (``labels`` = -100 elsewhere). Then

* Fisher (paper Eq. 8-9, diagonal): ``F_u = Σ_b g[b, u]²`` on the *adapted* model;
* Taylor cost (Eq. 4, per unit): ``c_u = Σ_b |g[b, u]|`` on the *base* model (adapters off).
  With ``y = W (m ⊙ x)``, ``∂L/∂m_u = Σ_{(i,j) ∈ u} W_ij ∂L/∂W_ij``: the first-order Taylor
  term of the unit's output-projection weights, summed inside the unit before the absolute
  value (LLM-Pruner's vector-wise importance). Under grouped-query attention every *query* head
  has its own mask, so each query head gets its own cost directly; the k/v projections shared
  by a group are not scored, so nothing needs splitting.

Both run in eval mode with every weight frozen (only the masks require gradients). Batches are
streamed one at a time; what is kept is ``(B, L, H)`` + ``(B, L, F)`` float32 on the CPU (the
refinement stage needs the per-batch gradients). Under ``torchrun``/``accelerate launch``
(``torch.distributed`` initialised) process ``r`` of ``W`` takes batches ``i ≡ r (mod W)`` and
the per-batch results are all-gathered back into batch order, so every process ends with exactly
what a single process computes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from floe.selection.masks import MaskHooks, frozen, model_device, to_model_inputs


class SelectionError(ValueError):
    """Bad input to layer selection (data, adapter, configuration) or a numerical failure."""


# ----------------------------------------------------------------------------- distribution

def dist_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when ``torch.distributed`` is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_batch_rows(local: torch.Tensor, num_batches: int) -> torch.Tensor:
    """Reassemble per-batch rows computed round-robin across processes into batch order.

    ``local``: ``(n_local, ...)`` rows for batches ``rank, rank + W, …``. Returns
    ``(num_batches, ...)`` on the CPU, identical on every process. Single process: ``local``.
    """
    rank, world = dist_info()
    if world == 1:
        return local
    per = math.ceil(num_batches / world)
    dev = _comm_device()
    padded = torch.zeros((per, *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[: local.shape[0]] = local.to(dev)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = torch.empty((num_batches, *local.shape[1:]), dtype=local.dtype)
    for r, part in enumerate(parts):
        idx = torch.arange(r, num_batches, world)
        out[idx] = part[: idx.numel()].cpu()
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over processes (in place where possible); no-op in a single process."""
    _, world = dist_info()
    if world == 1:
        return t
    dev = _comm_device()
    moved = t.to(dev)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    return moved.to(t.device)


def my_batches(batches: Iterable[dict]) -> Iterable[tuple[int, dict]]:
    """``(index, batch)`` for the batches this process handles (all of them in one process)."""
    rank, world = dist_info()
    for i, batch in enumerate(batches):
        if i % world == rank:
            yield i, batch


def check_batch_count(n_seen: int) -> None:
    """Every process must have iterated the same number of batches."""
    _, world = dist_info()
    if world == 1:
        return
    t = torch.tensor([float(n_seen), -float(n_seen)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != n_seen or int(-t[1]) != n_seen:
        raise SelectionError(f"processes saw different numbers of batches (this one {n_seen}, range "
                             f"{int(-t[1])}..{int(t[0])}); give every process the same data")


# ----------------------------------------------------------------------------- gradients

@dataclass
class MaskGradients:
    """Per-batch gradients of the loss w.r.t. the mask variables at ``m = 1``."""

    head: torch.Tensor
    """``(B, L, H)`` float32, CPU."""
    neuron: torch.Tensor
    """``(B, L, F)`` float32, CPU."""
    loss: torch.Tensor
    """``(B,)`` the batch losses at ``m = 1``."""

    @property
    def num_batches(self) -> int:
        return int(self.loss.shape[0])

    def fisher(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Diagonal empirical Fisher ``F_u = Σ_b g[b,u]²`` (Eq. 9): ``(L, H)``, ``(L, F)``."""
        return (self.head.double() ** 2).sum(0).float(), (self.neuron.double() ** 2).sum(0).float()

    def taylor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Taylor cost ``c_u = Σ_b |g[b,u]|`` (Eq. 4 per unit): ``(L, H)``, ``(L, F)``."""
        return self.head.double().abs().sum(0).float(), self.neuron.double().abs().sum(0).float()

    def subset(self, index: torch.Tensor | list[int]) -> "MaskGradients":
        """The gradients of the batches in ``index`` (for subsample-stability analysis)."""
        index = torch.as_tensor(index, dtype=torch.long)
        return MaskGradients(self.head[index], self.neuron[index], self.loss[index])


def batch_loss(model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    """Mean next-token loss over the batch's labelled (response) tokens."""
    inputs = to_model_inputs(batch, device)
    if "labels" not in inputs:
        raise SelectionError("selection batches need 'labels' (response tokens; -100 elsewhere): "
                             "build them with floe.data.DataCollator")
    return model(**inputs, use_cache=False).loss


def _nonfinite_error(stage: str, index: int, what: str) -> SelectionError:
    return SelectionError(
        f"{stage}: batch {index} gave a non-finite {what}. Causes: a batch with no response tokens "
        "(every label -100), a model or adapter with NaN/inf weights, or float16 overflow; check the "
        "data and adapter, or load the model in float32/bfloat16.")


def mask_gradients(model: nn.Module, batches: Iterable[dict], *, stage: str = "mask gradients",
                   progress: Callable[[Iterable], Iterable] | None = None) -> MaskGradients:
    """Per-batch ``∂L_b/∂m`` at ``m = 1`` for every head and neuron mask (streaming).

    Runs ``model`` as it is (call under :func:`floe.adapters.adapters_disabled` for the base
    model). Eval mode, weights frozen, restored afterwards. Raises :class:`SelectionError` when a
    batch gives a non-finite loss or gradient, or when there is no batch.
    """
    device = model_device(model)
    rows_h, rows_n, rows_l = [], [], []
    seen = BatchCounter()
    with frozen(model), MaskHooks(model, requires_grad=True) as hooks:
        for i, batch in (progress or (lambda x: x))(my_batches(seen.wrap(batches))):
            loss = batch_loss(model, batch, device)
            if torch.isfinite(loss):
                g_head, g_neuron = torch.autograd.grad(loss, [hooks.head, hooks.neuron])
                g_head, g_neuron = g_head.detach().float().cpu(), g_neuron.detach().float().cpu()
            else:  # keep going so that every process reaches the gather; report after it
                g_head = torch.full(hooks.head.shape, float("nan"))
                g_neuron = torch.full(hooks.neuron.shape, float("nan"))
            rows_h.append(g_head)
            rows_n.append(g_neuron)
            rows_l.append(loss.detach().float().cpu().reshape(()))
    n_seen = seen.count
    check_batch_count(n_seen)
    if n_seen == 0:
        raise SelectionError(f"{stage}: no batches were given")
    g = hooks.geometry
    empty = lambda *s: torch.zeros((0, *s))  # noqa: E731
    head = gather_batch_rows(torch.stack(rows_h) if rows_h else empty(g.num_layers, g.num_heads), n_seen)
    neuron = gather_batch_rows(torch.stack(rows_n) if rows_n else empty(g.num_layers, g.num_neurons), n_seen)
    loss = gather_batch_rows(torch.stack(rows_l) if rows_l else empty(), n_seen)
    for b in range(n_seen):
        if not torch.isfinite(loss[b]):
            raise _nonfinite_error(stage, b, "loss")
        if not (torch.isfinite(head[b]).all() and torch.isfinite(neuron[b]).all()):
            raise _nonfinite_error(stage, b, "gradient")
    return MaskGradients(head, neuron, loss)


class BatchCounter:
    """Counts the items an iterable yields (to learn B from a stream)."""

    def __init__(self) -> None:
        self.count = 0

    def wrap(self, items: Iterable) -> Iterable:
        for x in items:
            self.count += 1
            yield x

