"""Taylor cost of every head and neuron on the base model, Eq. 4 (docs/method.md, "Importance").

``c_u = Σ_b Σ_{i ∈ structure(u)} |θ_i ∂L_b/∂θ_i|`` over the weights of the unit's structure
(LLM-Pruner's grouping), one row per batch in a :class:`~floe.selection.importance.MaskGradients`
whose ``taylor()`` sums them. ``taylor: mask``, the cheaper form on the mask gradients, is
:func:`~floe.selection.importance.mask_gradients`.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn

from floe.arch import decoder_layers, find_child, geometry, model_device
from floe.distributed import shard
from floe.selection.importance import (
    BatchCounter,
    MaskGradients,
    SelectionError,
    batch_loss,
    check_rows,
    gathered_rows,
)
from floe.selection.masks import base_linear, frozen, unit_geometry


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
    :func:`floe.adapters.moe_lora.adapters_disabled`). One backward pass per batch; each weight's gradient
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
            for _, batch in (progress or (lambda x: x))(shard(seen.wrap(batches))):
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
    seen.total(stage)
    g = hooks_geo
    grads = MaskGradients(gathered_rows(rows_h, g.num_layers, g.num_heads),
                          gathered_rows(rows_n, g.num_layers, g.num_neurons), gathered_rows(rows_l))
    check_rows(stage, grads)
    return grads
