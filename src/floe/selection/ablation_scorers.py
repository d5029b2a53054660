"""Ablation scorers: per-layer scores other than FLoE's, for the ablation the paper's reviewers asked for.

Every scorer returns ``(L,)`` float32 scores; higher = more important (ranked first):

* ``fisher``: the diagonal Fisher of the layer's mask variables on the adapted model,
  ``Σ_{u∈l} F_u`` (heads + neurons), with no budget, search or tuning;
* ``taylor``: the layer's total Taylor cost on the base model, ``Σ_{u∈l} c_u``;
* ``grad_norm``: the mean over batches of the norm of the loss gradient w.r.t. the layer's
  adapter parameters (A, every B_i, router);
* ``fim_variance``: FIM-LoRA's informativeness, the variance over batches of the gradient of
  the layer's LoRA-B matrices summed over their entries (B is scored because a zero-initialised
  B makes ``∂L/∂A`` vanish at the start of training);
* ``random``: a seeded random permutation (uniform scores from ``torch.Generator(seed)``).

Layers without an adapter get 0 from the two adapter-gradient scorers. FLoE's own per-layer
score is in :mod:`.layer_score`; :mod:`.scorer_table` maps every ``scorer`` name to its function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn

from floe.adapters.moe_lora import moe_lora_modules
from floe.arch import decoder_layers, model_device
from floe.distributed import reduce_sum, shard
from floe.selection.importance import BatchCounter, SelectionError, batch_loss, gathered_rows
from floe.selection.masks import frozen


def fisher_layer_scores(fisher_head: torch.Tensor, fisher_neuron: torch.Tensor) -> torch.Tensor:
    """``Σ_{u∈l} F_u`` over the layer's heads and neurons, ``(L,)``."""
    return (fisher_head.double().sum(1) + fisher_neuron.double().sum(1)).float()


def taylor_layer_scores(cost_head: torch.Tensor, cost_neuron: torch.Tensor) -> torch.Tensor:
    """``Σ_{u∈l} c_u`` over the layer's heads and neurons, ``(L,)``."""
    return (cost_head.double().sum(1) + cost_neuron.double().sum(1)).float()


def random_layer_scores(num_layers: int, seed: int) -> torch.Tensor:
    """Seeded uniform scores: a random ranking, the same for the same seed."""
    return torch.rand(num_layers, generator=torch.Generator().manual_seed(int(seed)))


@dataclass
class AdapterGradientStats:
    """Per-layer statistics of the adapter-parameter gradients over batches."""

    grad_norm: torch.Tensor
    """``(L,)``: mean over batches of ``||∂L_b/∂φ_l||``."""
    fim_variance: torch.Tensor | None
    """``(L,)``: ``Σ_{entries of B_l} Var_b(∂L_b/∂B)`` (``None`` on a :meth:`subset`)."""
    per_batch_sq_norm: torch.Tensor
    """``(B, L)``: ``||∂L_b/∂φ_l||²``."""
    num_batches: int

    def subset(self, index: list[int]) -> "AdapterGradientStats":
        """The statistics of the batches in ``index`` (subsample stability). ``grad_norm`` comes from
        the per-batch norms (float64); ``fim_variance`` is ``None``: it needs the gradients
        themselves, which are not kept per batch, so :func:`adapter_gradient_stats` reruns for it."""
        rows = self.per_batch_sq_norm[torch.as_tensor(index)]
        return AdapterGradientStats(rows.double().sqrt().mean(0), None, rows, len(index))


def _layer_of(names: Iterable[str], prefix: str) -> list[int]:
    return [int(n[len(prefix) + 1:].split(".")[0]) for n in names]


def adapter_gradient_stats(model: nn.Module, batches: Iterable[dict],
                           progress: Callable[[Iterable], Iterable] | None = None) -> AdapterGradientStats:
    """One gradient pass over the batches w.r.t. the MoE-LoRA parameters (eval mode, no dropout)."""
    mods = moe_lora_modules(model)
    if not mods:
        raise SelectionError("grad_norm / fim_variance scorers need the adapted model (MoE-LoRA layers)")
    prefix, layers = decoder_layers(model)
    num_layers = len(layers)
    layer_ids = _layer_of(mods, prefix)
    all_params: list[tuple[int, nn.Parameter]] = []
    b_params: list[tuple[int, nn.Parameter]] = []
    for lid, m in zip(layer_ids, mods.values()):
        params = [m.lora_A.weight, m.lora_B] + ([m.router.weight] if m.router is not None else [])
        all_params += [(lid, p) for p in params]
        b_params.append((lid, m.lora_B))
    device = model_device(model)
    sums_b = [torch.zeros_like(p, dtype=torch.float64) for _, p in b_params]
    sq_b = torch.zeros(num_layers, dtype=torch.float64)  # Σ_b ||g_B,b||² per layer
    rows: list[torch.Tensor] = []
    seen = BatchCounter()
    params_only = [p for _, p in all_params]
    b_index = {id(p): j for j, (_, p) in enumerate(b_params)}
    with frozen(model, keep=params_only):
        for i, batch in (progress or (lambda x: x))(shard(seen.wrap(batches))):
            loss = batch_loss(model, batch, device)
            if not torch.isfinite(loss):
                raise SelectionError(f"adapter gradients: batch {i} gave a non-finite loss; check the data "
                                     "(every label -100?) and the adapter weights")
            grads = torch.autograd.grad(loss, params_only)
            sq = torch.zeros(num_layers, dtype=torch.float64)
            for (lid, p), gr in zip(all_params, grads):
                gd = gr.detach().double()
                if not torch.isfinite(gd).all():
                    raise SelectionError(f"adapter gradients: batch {i} gave a non-finite gradient")
                sq[lid] += float((gd ** 2).sum())
                j = b_index.get(id(p))
                if j is not None:
                    sums_b[j] += gd
                    sq_b[lid] += float((gd ** 2).sum())
            rows.append(sq.float())
    n_seen = seen.total("adapter gradients")
    per_batch = gathered_rows(rows, num_layers)
    sq_b = reduce_sum(sq_b)
    mean_sq = torch.zeros(num_layers, dtype=torch.float64)  # ||Σ_b g_b||² per layer
    for (lid, _), s in zip(b_params, sums_b):
        s = reduce_sum(s)
        mean_sq[lid] += float((s ** 2).sum())
    n = float(n_seen)
    # Σ_entries Var_b(g) with the unbiased (n-1) denominator: (Σ_b g² − (Σ_b g)²/n) / (n − 1)
    variance = (sq_b - mean_sq / n) / max(n - 1.0, 1.0)
    return AdapterGradientStats(
        grad_norm=per_batch.double().sqrt().mean(0).float(),
        fim_variance=variance.clamp_min(0).float(),
        per_batch_sq_norm=per_batch,
        num_batches=n_seen,
    )
