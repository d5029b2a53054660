"""Mask gradients and Taylor costs: the Fisher of the adapted model, the cost of the base model.

For every mask variable ``u`` (query head or FFN neuron, :mod:`.masks`) and every example ``e``
(or batch ``b``) we record ``g[e, u] = ∂L_e/∂m_u`` at ``m = 1``, ``L_e`` the next-token loss on
the response tokens (``labels`` = -100 elsewhere). Then (``docs/method.md``, "Importance"):

* Fisher (Eq. 8-9, diagonal) on the *adapted* model. ``fisher: example`` (default): ``F_u =
  Σ_e g[e, u]²`` over examples, as Eq. 8's expectation is; the per-example gradients come from
  the same single backward pass per batch (:func:`mask_gradients` with ``per_example=True``), and
  the result does not depend on how examples are batched. ``fisher: batch``: ``F_u = Σ_b
  g[b, u]²`` over batch-mean gradients (depends on the batch size).
* Taylor cost (Eq. 4) on the *base* model (adapters off). ``taylor: weights`` (default,
  :func:`weight_taylor`): ``c_u = Σ_b Σ_{i ∈ structure(u)} |θ_i ∂L_b/∂θ_i|`` over the weights of
  the unit's structure (LLM-Pruner's grouping). ``taylor: mask``: ``c_u = Σ_b |g[b, u]|``; with
  ``y = W (m ⊙ x)``, ``∂L/∂m_u = Σ_{(i,j) ∈ u} W_ij ∂L/∂W_ij`` over the output projection's
  columns, summed *before* the absolute value (it ranks units differently from Eq. 4).

All passes run in eval mode with the weights frozen (only the masks, or for Eq. 4 the structure
weights, require gradients). Batches are streamed; what is kept is one ``(L, H)`` + ``(L, F)``
float32 row per batch or example on the CPU. Under ``torchrun``/``accelerate launch``
(``torch.distributed`` initialised) process ``r`` of ``W`` takes batches ``i ≡ r (mod W)`` and
the rows are all-gathered back into batch order, so every process ends with exactly what a
single process computes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from floe.arch import decoder_layers, find_child, geometry
from floe.errors import InputError
from floe.selection.masks import (
    MaskHooks,
    base_linear,
    frozen,
    model_device,
    to_model_inputs,
    unit_geometry,
)


class SelectionError(InputError):
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
    """Gradients of the loss w.r.t. the mask variables at ``m = 1``, one row per batch or per example.

    Rows are batches (``unit == "batch"``: ``g[b, u] = ∂L_b/∂m_u``) or examples (``unit ==
    "example"``: ``g[e, u] = ∂L_e/∂m_u``, ``L_e`` the example's mean loss over its response
    tokens). :func:`weight_taylor` also returns per-batch rows of Eq. 4 costs in this form.
    """

    head: torch.Tensor
    """``(R, L, H)`` float32, CPU."""
    neuron: torch.Tensor
    """``(R, L, F)`` float32, CPU."""
    loss: torch.Tensor
    """``(B,)`` the batch losses at ``m = 1``."""
    batch_of: torch.Tensor | None = None
    """``(R,)`` long: the batch of each row (``None``: row ``b`` is batch ``b``)."""
    share: torch.Tensor | None = None
    """``(R,)`` float64, per-example rows only: ``N_e / N_b``, the example's share of its batch's
    response tokens, so that ``Σ_{e∈b} share_e g[e] = ∂L_b/∂m``."""
    unit: str = "batch"
    """``"batch"`` or ``"example"``: what a row is."""

    @property
    def num_batches(self) -> int:
        return int(self.loss.shape[0])

    def rows_batch(self) -> torch.Tensor:
        return torch.arange(self.head.shape[0]) if self.batch_of is None else self.batch_of

    def fisher(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Diagonal empirical Fisher ``F_u = Σ_rows g[r,u]²`` (Eq. 8-9): ``(L, H)``, ``(L, F)``."""
        return (self.head.double() ** 2).sum(0).float(), (self.neuron.double() ** 2).sum(0).float()

    def taylor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Taylor cost ``c_u = Σ_rows |g[r,u]|``: ``(L, H)``, ``(L, F)`` (rows of costs: their sum)."""
        return self.head.double().abs().sum(0).float(), self.neuron.double().abs().sum(0).float()

    def subset(self, index: torch.Tensor | list[int]) -> "MaskGradients":
        """The rows of the batches in ``index`` (for subsample-stability analysis)."""
        index = torch.as_tensor(index, dtype=torch.long)
        if self.batch_of is None:
            return MaskGradients(self.head[index], self.neuron[index], self.loss[index], unit=self.unit)
        position = torch.full((self.num_batches,), -1, dtype=torch.long)
        position[index] = torch.arange(index.numel())
        rows = torch.nonzero(position[self.batch_of] >= 0).reshape(-1)
        rows = rows[torch.argsort(position[self.batch_of[rows]], stable=True)]
        share = None if self.share is None else self.share[rows]
        return MaskGradients(self.head[rows], self.neuron[rows], self.loss[index],
                             position[self.batch_of[rows]], share, self.unit)

    def per_batch(self) -> "MaskGradients":
        """Per-batch gradients ``∂L_b/∂m`` (per-example rows summed with their shares)."""
        if self.unit == "batch":
            return self
        w = self.share.to(torch.float64)[:, None, None]
        out = []
        for rows in (self.head, self.neuron):
            acc = torch.zeros((self.num_batches, *rows.shape[1:]), dtype=torch.float64)
            acc.index_add_(0, self.batch_of, rows.double() * w)
            out.append(acc.float())
        return MaskGradients(out[0], out[1], self.loss, unit="batch")


def batch_loss(model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    """Mean next-token loss over the batch's labelled (response) tokens."""
    inputs = to_model_inputs(batch, device)
    if "labels" not in inputs:
        raise SelectionError("selection batches need 'labels' (response tokens; -100 elsewhere): "
                             "build them with floe.data.DataCollator")
    return model(**inputs, use_cache=False).loss


def response_tokens(batch: dict) -> torch.Tensor:
    """``(batch,)`` float64: each example's number of predicted (response) tokens after the shift."""
    return (batch["labels"][:, 1:] != -100).sum(1).double()


def _nonfinite_error(stage: str, index: int, what: str) -> SelectionError:
    return SelectionError(
        f"{stage}: batch {index} gave a non-finite {what}. Causes: a batch with no response tokens "
        "(every label -100), a model or adapter with NaN/inf weights, or float16 overflow; check the "
        "data and adapter, or load the model in float32/bfloat16.")


def _check_rows(stage: str, grads: MaskGradients) -> None:
    for b in range(grads.num_batches):
        if not torch.isfinite(grads.loss[b]):
            raise _nonfinite_error(stage, b, "loss")
    bad = ~(torch.isfinite(grads.head).flatten(1).all(1) & torch.isfinite(grads.neuron).flatten(1).all(1))
    if bool(bad.any()):
        raise _nonfinite_error(stage, int(grads.rows_batch()[torch.nonzero(bad)[0, 0]]), "gradient")


def mask_gradients(model: nn.Module, batches: Iterable[dict], *, stage: str = "mask gradients",
                   per_example: bool = False,
                   progress: Callable[[Iterable], Iterable] | None = None) -> MaskGradients:
    """``∂L/∂m`` at ``m = 1`` for every head and neuron mask, per batch or per example (streaming).

    ``per_example=False``: one row per batch, ``∂L_b/∂m`` (``fisher: batch``, ``taylor: mask``).
    ``per_example=True`` (Eq. 8, ``fisher: example``): one row per example, ``∂L_e/∂m`` with
    ``L_e`` the example's mean loss over its response tokens. It costs no extra pass: the mask
    hooks see each example's activations ``x`` and output gradients during the batch's single
    backward pass, and ``Σ_{tokens of e} x · ∂L_b/∂(m ⊙ x)`` is example e's part of ``∂L_b/∂m``,
    i.e. ``(N_e / N_b) ∂L_e/∂m`` (N: response tokens), rescaled here. A row does not depend on
    which other examples share its batch, so neither does ``F_u = Σ_e g[e,u]²``.

    Runs ``model`` as it is (call under :func:`floe.adapters.adapters_disabled` for the base
    model). Eval mode, weights frozen, restored afterwards. Raises :class:`SelectionError` when a
    batch gives a non-finite loss or gradient, or when there is no batch.
    """
    device = model_device(model)
    rows_h, rows_n, rows_l, rows_s = [], [], [], []
    seen = BatchCounter()
    with frozen(model), MaskHooks(model, requires_grad=True, per_example=per_example) as hooks:
        g = hooks.geometry
        for i, batch in (progress or (lambda x: x))(my_batches(seen.wrap(batches))):
            loss = batch_loss(model, batch, device)
            n_examples = int(batch["input_ids"].shape[0])
            if torch.isfinite(loss):
                g_head, g_neuron = torch.autograd.grad(loss, [hooks.head, hooks.neuron])
                if per_example:
                    g_head = torch.stack([hooks.example_head[k] for k in range(g.num_layers)], 1)
                    g_neuron = torch.stack([hooks.example_neuron[k] for k in range(g.num_layers)], 1)
                    hooks.example_head.clear()
                    hooks.example_neuron.clear()
                g_head, g_neuron = g_head.detach().float().cpu(), g_neuron.detach().float().cpu()
            else:  # keep going so that every process reaches the gather; report after it
                shape = (n_examples,) if per_example else ()
                g_head = torch.full((*shape, g.num_layers, g.num_heads), float("nan"))
                g_neuron = torch.full((*shape, g.num_layers, g.num_neurons), float("nan"))
            if per_example:
                tokens = response_tokens(batch)
                share = tokens / tokens.sum().clamp_min(1.0)
                scale = torch.where(share > 0, 1.0 / share.clamp_min(1e-300), 0.0).float()
                g_head, g_neuron = g_head * scale[:, None, None], g_neuron * scale[:, None, None]
                rows_s.append(share)
            rows_h.append(g_head)
            rows_n.append(g_neuron)
            rows_l.append(loss.detach().float().cpu().reshape(()))
    n_seen = seen.count
    check_batch_count(n_seen)
    if n_seen == 0:
        raise SelectionError(f"{stage}: no batches were given")
    loss = gather_batch_rows(torch.stack(rows_l) if rows_l else torch.zeros(0), n_seen)
    if per_example:
        grads = _gather_examples(rows_h, rows_n, rows_s, loss, n_seen, g)
    else:
        empty = lambda *s: torch.zeros((0, *s))  # noqa: E731
        head = gather_batch_rows(torch.stack(rows_h) if rows_h else empty(g.num_layers, g.num_heads), n_seen)
        neuron = gather_batch_rows(torch.stack(rows_n) if rows_n else empty(g.num_layers, g.num_neurons), n_seen)
        grads = MaskGradients(head, neuron, loss)
    _check_rows(stage, grads)
    return grads


def _gather_examples(rows_h: list[torch.Tensor], rows_n: list[torch.Tensor], rows_s: list[torch.Tensor],
                     loss: torch.Tensor, n_batches: int, g) -> MaskGradients:
    """Per-example rows of this process's batches → all examples of all batches, in batch order."""
    local_max = max((r.shape[0] for r in rows_h), default=0)
    e_max = _all_max(local_max)
    pad = lambda rows, *s: torch.stack([torch.cat([r, r.new_zeros((e_max - r.shape[0], *s))])  # noqa: E731
                                        for r in rows]) if rows else torch.zeros((0, e_max, *s))
    counts = torch.tensor([float(r.shape[0]) for r in rows_h], dtype=torch.float64)
    head = gather_batch_rows(pad(rows_h, g.num_layers, g.num_heads), n_batches)
    neuron = gather_batch_rows(pad(rows_n, g.num_layers, g.num_neurons), n_batches)
    share = gather_batch_rows(pad([s.double() for s in rows_s]), n_batches)
    counts = gather_batch_rows(counts, n_batches).long()
    valid = torch.arange(e_max)[None, :] < counts[:, None]
    batch_of = torch.arange(n_batches)[:, None].expand(-1, e_max)[valid]
    return MaskGradients(head[valid], neuron[valid], loss, batch_of, share[valid], "example")


def _all_max(value: int) -> int:
    """The largest ``value`` over processes."""
    _, world = dist_info()
    if world == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# ----------------------------------------------------------------------------- Eq. 4 Taylor cost

def _structure(model: nn.Module) -> list[tuple[nn.Parameter, int, str, str]]:
    """``(parameter, layer, unit type, how to reduce it)`` for the weights of every unit's structure
    (LLM-Pruner's grouping): q/k/v rows and o columns for heads, gate/up rows and down columns
    for neurons (biases of the same rows too)."""
    _, layers = decoder_layers(model)
    out = []
    for k, layer in enumerate(layers):
        for name, kind, how in (("q_proj", "head", "rows"), ("k_proj", "head", "kv_rows"),
                                ("v_proj", "head", "kv_rows"), ("o_proj", "head", "cols"),
                                ("gate_proj", "neuron", "rows"), ("up_proj", "neuron", "rows"),
                                ("down_proj", "neuron", "cols")):
            try:
                linear = base_linear(find_child(layer, name)[1])
            except (ValueError, TypeError) as err:
                raise SelectionError(f"taylor: weights needs separate q/k/v/o and gate/up/down projections "
                                     f"in every decoder layer ({err}); use taylor: mask for this model") from err
            out.append((linear.weight, k, kind, how))
            if linear.bias is not None and how != "cols":
                out.append((linear.bias, k, kind, how))
    return out


def _reduce(a: torch.Tensor, how: str, unit_size: int, group: int) -> torch.Tensor:
    """Per-unit sums of ``a = |θ · ∂L/∂θ|`` (rows: first dimension, cols: second)."""
    per_feature = a.sum(1) if how != "cols" and a.dim() == 2 else (a.sum(0) if how == "cols" else a)
    per_unit = per_feature.reshape(-1, unit_size).sum(1)
    if how == "kv_rows":  # each of the `group` query heads reading this kv head gets an equal share
        per_unit = per_unit.repeat_interleave(group) / group
    return per_unit


def weight_taylor(model: nn.Module, batches: Iterable[dict], *, stage: str = "Taylor cost (Eq. 4)",
                  progress: Callable[[Iterable], Iterable] | None = None) -> MaskGradients:
    """Eq. 4 per unit, per batch: ``c[b, u] = Σ_{i ∈ structure(u)} |θ_i · ∂L_b/∂θ_i|``.

    Structure (LLM-Pruner): a neuron's ``gate_proj``/``up_proj`` rows and ``down_proj`` column;
    a query head's ``q_proj`` rows and ``o_proj`` columns plus ``1/G`` of the ``k_proj``/``v_proj``
    rows of the kv head it reads (G query heads per kv head). Run it on the base model (under
    :func:`floe.adapters.adapters_disabled`). One backward pass per batch; each weight's gradient
    is reduced to per-unit sums by a hook as soon as it is accumulated and then freed, so at most
    one weight's gradient exists at a time (a 7B model never holds its whole gradient). Returns the
    per-batch rows as a :class:`MaskGradients` whose ``taylor()`` sums them over batches.
    """
    device = model_device(model)
    geo = geometry(model.config)
    hooks_geo = unit_geometry(model)
    group = geo.num_heads // geo.num_kv_heads
    params = _structure(model)
    rows_h, rows_n, rows_l = [], [], []
    acc: dict[str, torch.Tensor] = {}
    seen = BatchCounter()

    def hook_for(layer: int, kind: str, how: str, unit_size: int):
        def hook(p: torch.Tensor) -> None:
            a = (p.detach().float() * p.grad.float()).abs()
            acc[kind][layer] += _reduce(a, how, unit_size, group).double()
            p.grad = None
        return hook

    handles = []
    with frozen(model, keep=[p for p, *_ in params]):
        try:
            for p, layer, kind, how in params:
                size = hooks_geo.head_dim if kind == "head" else 1
                handles.append(p.register_post_accumulate_grad_hook(hook_for(layer, kind, how, size)))
            for i, batch in (progress or (lambda x: x))(my_batches(seen.wrap(batches))):
                acc["head"] = torch.zeros((hooks_geo.num_layers, hooks_geo.num_heads), dtype=torch.float64,
                                          device=device)
                acc["neuron"] = torch.zeros((hooks_geo.num_layers, hooks_geo.num_neurons), dtype=torch.float64,
                                            device=device)
                loss = batch_loss(model, batch, device)
                if torch.isfinite(loss):
                    loss.backward()
                    row_h, row_n = acc["head"].float().cpu(), acc["neuron"].float().cpu()
                else:
                    row_h, row_n = torch.full(acc["head"].shape, float("nan")), torch.full(acc["neuron"].shape,
                                                                                           float("nan"))
                rows_h.append(row_h)
                rows_n.append(row_n)
                rows_l.append(loss.detach().float().cpu().reshape(()))
        finally:
            for h in handles:
                h.remove()
            for p, *_ in params:
                p.grad = None
    n_seen = seen.count
    check_batch_count(n_seen)
    if n_seen == 0:
        raise SelectionError(f"{stage}: no batches were given")
    g = hooks_geo
    empty = lambda *s: torch.zeros((0, *s))  # noqa: E731
    grads = MaskGradients(
        gather_batch_rows(torch.stack(rows_h) if rows_h else empty(g.num_layers, g.num_heads), n_seen),
        gather_batch_rows(torch.stack(rows_n) if rows_n else empty(g.num_layers, g.num_neurons), n_seen),
        gather_batch_rows(torch.stack(rows_l) if rows_l else empty(), n_seen))
    _check_rows(stage, grads)
    return grads


# ----------------------------------------------------------------------------- true masked loss

def masked_losses(model: nn.Module, batches: list[dict], head: torch.Tensor | None = None,
                  neuron: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)`` batch losses of ``model`` with the given mask values applied (forward passes only)."""
    device = model_device(model)
    rows = []
    with frozen(model), MaskHooks(model, head, neuron) as _, torch.no_grad():
        for _, batch in my_batches(batches):
            rows.append(batch_loss(model, batch, device).detach().float().cpu().reshape(()))
    return gather_batch_rows(torch.stack(rows) if rows else torch.zeros(0), len(batches))


class BatchCounter:
    """Counts the items an iterable yields (to learn B from a stream)."""

    def __init__(self) -> None:
        self.count = 0

    def wrap(self, items: Iterable) -> Iterable:
        for x in items:
            self.count += 1
            yield x

