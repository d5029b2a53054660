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
float32 row per batch or example on the CPU. Under ``torchrun``/``accelerate launch`` each
process takes a contiguous block of the batches and the rows are gathered back into batch order
(:mod:`floe.distributed`, on accelerate), so every process ends with exactly what a single
process computes. Eq. 4's weight form is in :mod:`.taylor`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn

from floe.arch import model_device, model_inputs
from floe.distributed import gather_rows, reduce_max, shard
from floe.errors import InputError
from floe.selection.masks import MaskHooks, frozen


class SelectionError(InputError):
    """Bad input to layer selection (data, adapter, configuration) or a numerical failure."""


def check_batch_count(n_seen: int) -> None:
    """Every process must have iterated the same number of batches."""
    most, least = reduce_max(n_seen), -reduce_max(-n_seen)
    if most != n_seen or least != n_seen:
        raise SelectionError(f"processes saw different numbers of batches (this one {n_seen}, range "
                             f"{int(least)}..{int(most)}); give every process the same data")


class BatchCounter:
    """Counts the items an iterable yields (to learn B from a stream)."""

    def __init__(self) -> None:
        self.count = 0

    def wrap(self, items: Iterable) -> Iterable:
        for x in items:
            self.count += 1
            yield x

    def total(self, stage: str) -> int:
        """``B``, checked to be the same on every process and > 0 (:class:`SelectionError` otherwise)."""
        check_batch_count(self.count)
        if self.count == 0:
            raise SelectionError(f"{stage}: no batches were given")
        return self.count


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
    inputs = model_inputs(batch, device)
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


def check_rows(stage: str, grads: MaskGradients) -> None:
    """Raise :class:`SelectionError` naming the first batch with a non-finite loss or gradient."""
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

    Runs ``model`` as it is (call under :func:`floe.adapters.moe_lora.adapters_disabled` for the base
    model). Eval mode, weights frozen, restored afterwards. Raises :class:`SelectionError` when a
    batch gives a non-finite loss or gradient, or when there is no batch.
    """
    device = model_device(model)
    rows_h, rows_n, rows_l, rows_s = [], [], [], []
    seen = BatchCounter()
    with frozen(model), MaskHooks(model, requires_grad=True, per_example=per_example) as hooks:
        g = hooks.geometry
        for _, batch in (progress or (lambda x: x))(shard(seen.wrap(batches))):
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
    n_seen = seen.total(stage)
    loss = gathered_rows(rows_l)
    if per_example:  # rows: examples, in batch order; the batch of each from the examples per batch
        per_batch = gathered_rows([torch.tensor([r.shape[0] for r in rows_h], dtype=torch.long)], cat=True)
        batch_of = torch.repeat_interleave(torch.arange(n_seen), per_batch)
        grads = MaskGradients(gathered_rows(rows_h, g.num_layers, g.num_heads, cat=True),
                              gathered_rows(rows_n, g.num_layers, g.num_neurons, cat=True), loss, batch_of,
                              gathered_rows(rows_s, dtype=torch.float64, cat=True), "example")
    else:
        grads = MaskGradients(gathered_rows(rows_h, g.num_layers, g.num_heads),
                              gathered_rows(rows_n, g.num_layers, g.num_neurons), loss)
    check_rows(stage, grads)
    return grads


def gathered_rows(rows: list[torch.Tensor], *shape: int, dtype: torch.dtype = torch.float32,
              cat: bool = False) -> torch.Tensor:
    """This process's rows (stacked, or concatenated with ``cat``) gathered from every process in batch
    order; ``shape``/``dtype``: of one row, for a process that holds no batch."""
    if not rows:
        return gather_rows(torch.zeros((0, *shape), dtype=dtype))
    return gather_rows(torch.cat(rows) if cat else torch.stack(rows))


# ----------------------------------------------------------------------------- true masked loss

def masked_losses(model: nn.Module, batches: list[dict], head: torch.Tensor | None = None,
                  neuron: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)`` batch losses of ``model`` with the given mask values applied (forward passes only)."""
    device = model_device(model)
    rows = []
    with frozen(model), MaskHooks(model, head, neuron) as _, torch.no_grad():
        for _, batch in shard(batches):
            rows.append(batch_loss(model, batch, device).detach().float().cpu().reshape(()))
    return gathered_rows(rows)

