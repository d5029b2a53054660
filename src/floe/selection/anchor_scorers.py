"""Layer scorers from published anchors that read data: LoRA-drop, adapter ablation (single layers
and greedy) and linear CKA. The data-free ones (Spectrum, AlphaLoRA) are in :mod:`.spectral_scorers`;
:mod:`.scorer_table` maps every ``scorer`` name to its function.

Every score is ``(L,)``, higher = more important (ranked first). All passes are forward passes
(no gradients), in eval mode (no dropout) with the weights frozen; nothing in the model is patched:
the statistics come from forward hooks, and switching a layer's adapter off sets the flag PEFT's
own ``disable_adapters`` sets. Under ``torch.distributed`` each process takes its block of the
batches (:func:`floe.distributed.shard`) and the sums are reduced, so every process ends with the
one-process result.

* ``lora_drop`` (Zhou et al., LoRA-drop, arXiv 2402.07721): the warm-up adapter's output size,
  ``g_l = (1/N) Σ_t Σ_{m ∈ l} ||Δ_m(x_t)||²`` and ``I_l = g_l / Σ_j g_j`` (:func:`lora_drop_scores`);
* ``ablation``: ``s_l = L̄(adapter of layer l off, all others on) − L̄(all on)`` (:func:`ablation_scores`);
* ``ablation_greedy``: greedy forward selection of the k layers whose adapters, kept alone, give
  the lowest loss (:func:`ablation_greedy`). IST (arXiv 2410.11772) estimates the same quantity,
  the loss a layer's adapter is worth, by suppressing random layers' adapters during training;
* ``cka``: ``s_l = 1 − CKA(X_l, Y_l)`` between decoder layer l's input and output hidden states
  on the base model, linear CKA (Kornblith et al., ICML 2019) (:func:`linear_cka`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn

from floe.adapters.moe_lora.model import modules_disabled, moe_lora_modules
from floe.arch import decoder_layers, model_device, model_inputs, text_config
from floe.distributed import reduce_sum, shard
from floe.selection.importance import BatchCounter, SelectionError, batch_loss, gathered_rows
from floe.selection.masks import frozen

Progress = Callable[[Iterable], Iterable] | None


def adapters_by_layer(model: nn.Module) -> dict[int, list[Any]]:
    """The model's MoE-LoRA modules (:class:`~floe.adapters.moe_lora.model.MoELoraView`) by decoder layer."""
    prefix, _ = decoder_layers(model)
    out: dict[int, list[Any]] = {}
    for name, view in moe_lora_modules(model).items():
        out.setdefault(int(name[len(prefix) + 1:].split(".")[0]), []).append(view)
    if not out:
        raise SelectionError("this scorer needs the warm-up adapter (MoE-LoRA layers) on the model")
    return out


def token_mask(batch: dict, device: torch.device) -> torch.Tensor:
    """``(batch, seq)`` bool: the non-padding tokens (``attention_mask``; every token without one)."""
    am = batch.get("attention_mask")
    return torch.ones_like(batch["input_ids"], dtype=torch.bool).to(device) if am is None else am.to(device) > 0


def _forward_all(model: nn.Module, batches: Iterable[dict], stage: str, progress: Progress,
                 before: Callable[[dict], None], after: Callable[[dict], None] = lambda batch: None) -> int:
    """One no-grad forward pass per batch of this process between ``before(batch)`` and ``after(batch)``."""
    device = model_device(model)
    seen = BatchCounter()
    with frozen(model), torch.no_grad():
        for _, batch in (progress or (lambda x: x))(shard(seen.wrap(batches))):
            before(batch)
            model(**model_inputs(batch, device), use_cache=False)
            after(batch)
    return seen.total(stage)


# ----------------------------------------------------------------------------- LoRA-drop

@dataclass
class TokenRows:
    """A per-token statistic summed per batch and layer, kept per batch so that it subsets by batch."""

    sums: torch.Tensor
    """``(B, L)`` float64: per batch, ``Σ_{non-padding t} Σ_{m ∈ l} ||Δ_m(x_t)||²``."""
    tokens: torch.Tensor
    """``(B,)`` float64: non-padding tokens per batch."""

    def subset(self, index: list[int]) -> "TokenRows":
        idx = torch.as_tensor(index, dtype=torch.long)
        return TokenRows(self.sums[idx], self.tokens[idx])

    def mean(self) -> torch.Tensor:
        """``(L,)``: ``g_l``, the mean over all non-padding tokens."""
        return self.sums.sum(0) / self.tokens.sum().clamp_min(1.0)


def lora_output_rows(model: nn.Module, batches: Iterable[dict], progress: Progress = None) -> TokenRows:
    """Per batch and layer the summed squared norm of the adapter's output over the non-padding tokens.

    A forward hook on every MoE-LoRA module recomputes from the module's input ``x`` its routed
    adapter output ``Δ(x) = (α/r) Σ_i w_i(x) B_i A x`` (:meth:`MoELoraLinear.delta`; dropout is
    off in eval mode), the part the adapter adds to the frozen layer's output ``W x``.
    """
    by_layer = adapters_by_layer(model)
    num_layers = len(decoder_layers(model)[1])
    device = model_device(model)
    acc = torch.zeros(num_layers, dtype=torch.float64)
    keep: list[torch.Tensor] = []

    def hook(layer: int, view: Any) -> Callable:
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            delta = view.layer.delta(args[0], view.adapter).double()            # (batch, seq, d_out)
            acc[layer] += float(((delta ** 2).sum(-1) * keep[0]).sum())        # ||Δ(x_t)||² over kept t
        return record

    rows, tokens = [], []

    def before(batch: dict) -> None:
        acc.zero_()
        keep[:] = [token_mask(batch, device)]

    def after(batch: dict) -> None:
        rows.append(acc.clone())
        tokens.append(keep[0].sum().double().cpu().reshape(()))

    handles = [v.layer.register_forward_hook(hook(k, v)) for k, views in by_layer.items() for v in views]
    try:
        _forward_all(model, batches, "LoRA-drop adapter outputs", progress, before, after)
    finally:
        for h in handles:
            h.remove()
    out = TokenRows(gathered_rows(rows, num_layers, dtype=torch.float64),
                    gathered_rows(tokens, dtype=torch.float64))
    if not bool(torch.isfinite(out.sums).all()):
        raise SelectionError("LoRA-drop: the adapter's output is not finite; check the adapter weights")
    return out


def lora_drop_scores(rows: TokenRows) -> torch.Tensor:
    """LoRA-drop's normalised importance ``I_l = g_l / Σ_j g_j``, ``(L,)`` (sums to 1; 0 without an adapter)."""
    g = rows.mean()
    total = float(g.sum())
    if not total > 0:
        raise SelectionError("LoRA-drop: the adapter's output is zero on every layer (an untrained adapter "
                             "with B = 0?); score the warm-up adapter")
    return (g / total).float()


# ----------------------------------------------------------------------------- ablation

@contextlib.contextmanager
def adapters_off(by_layer: dict[int, list[Any]], layers: Iterable[int]) -> Iterator[None]:
    """The adapters of ``layers`` switched off (the frozen layer's output only); restored afterwards."""
    with modules_disabled([v.layer for k in set(layers) for v in by_layer.get(k, [])]):
        yield


def mean_loss(model: nn.Module, batches: list[dict]) -> float:
    """``L̄``: the mean over batches of each batch's mean response-token loss (forward passes only)."""
    device = model_device(model)
    rows = []
    with frozen(model), torch.no_grad():
        for _, batch in shard(batches):
            rows.append(batch_loss(model, batch, device).detach().double().cpu().reshape(()))
    losses = gathered_rows(rows, dtype=torch.float64)
    if losses.numel() == 0 or not bool(torch.isfinite(losses).all()):
        raise SelectionError("ablation: a batch gave a non-finite loss (or there is no batch); check the data")
    return float(losses.mean())


def ablation_scores(model: nn.Module, batches: list[dict]) -> tuple[torch.Tensor, dict[str, Any]]:
    """``s_l = L̄(adapter of l off) − L̄(all on)``: one pass over ``batches`` per adapted layer, plus one."""
    by_layer = adapters_by_layer(model)
    num_layers = len(decoder_layers(model)[1])
    base = mean_loss(model, batches)
    off = torch.full((num_layers,), base, dtype=torch.float64)  # a layer without an adapter: no change
    for layer in sorted(by_layer):
        with adapters_off(by_layer, [layer]):
            off[layer] = mean_loss(model, batches)
    return off - base, {"loss_all_on": base, "loss_layer_off": off.tolist()}


def ablation_greedy(model: nn.Module, batches: list[dict], k: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Greedy forward selection of ``k`` layers by the loss of their adapters kept alone (all others off).

    Round r adds to the chosen set S the layer l minimising ``L̄(adapters on S ∪ {l} only)``
    (ties: the lower layer), one pass over ``batches`` per candidate: ``Σ_{r<k} (L − r) = kL −
    k(k−1)/2`` passes, at most k·L. Ranking: the chosen layers in the order picked, then the others
    by their loss in the last round (lower first). Scores are ``L − position`` in that ranking; the
    per-round losses are in the diagnostics.
    """
    by_layer = adapters_by_layer(model)
    num_layers = len(decoder_layers(model)[1])
    chosen: list[int] = []
    rounds = []
    losses: dict[int, float] = {}
    for _ in range(k):
        losses = {}
        for layer in range(num_layers):
            if layer not in chosen:
                with adapters_off(by_layer, set(range(num_layers)) - {*chosen, layer}):
                    losses[layer] = mean_loss(model, batches)
        best = min(losses, key=lambda j: (losses[j], j))
        chosen.append(best)
        rounds.append({"picked": best, "loss": losses[best], "losses": dict(losses)})
    order = chosen + sorted((j for j in losses if j not in chosen), key=lambda j: (losses[j], j))
    scores = torch.zeros(num_layers, dtype=torch.float64)
    for position, layer in enumerate(order):
        scores[layer] = num_layers - position
    return scores, {"chosen": chosen, "rounds": rounds, "passes": sum(len(r["losses"]) for r in rounds)}


# ----------------------------------------------------------------------------- CKA

def linear_cka(model: nn.Module, batches: Iterable[dict], progress: Progress = None) -> torch.Tensor:
    """``(L,)`` linear CKA between each decoder layer's input ``X`` and output ``Y`` (n tokens × d).

    Over the non-padding tokens of all batches, with column-centred ``X``, ``Y`` (Kornblith et al.
    2019, Eq. for linear CKA in feature space)::

        CKA(X, Y) = ||Yᵀ X||_F² / (||Xᵀ X||_F · ||Yᵀ Y||_F)

    accumulated from ``n``, ``Σx``, ``Σy``, ``XᵀX``, ``YᵀY``, ``XᵀY`` (float64), centred at the end:
    ``X_cᵀ Y_c = XᵀY − n μ_x μ_yᵀ``. Hooks on the decoder layers; runs ``model`` as it is (call under
    :func:`floe.adapters.moe_lora.adapters_disabled` for the base model).
    """
    _, layers = decoder_layers(model)
    device = model_device(model)
    d = text_config(model.config).hidden_size
    stats = [[torch.zeros((), dtype=torch.float64, device=device), torch.zeros(d, dtype=torch.float64, device=device),
              torch.zeros(d, dtype=torch.float64, device=device)]
             + [torch.zeros(d, d, dtype=torch.float64, device=device) for _ in range(3)] for _ in layers]
    keep: list[torch.Tensor] = []

    def hook(layer: int) -> Callable:
        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = (args[0] if args else kwargs["hidden_states"])[keep[0]].double()       # (n, d)
            y = (output[0] if isinstance(output, (tuple, list)) else output)[keep[0]].double()
            s = stats[layer]
            s[0] += x.shape[0]
            s[1] += x.sum(0)
            s[2] += y.sum(0)
            s[3] += x.T @ x
            s[4] += y.T @ y
            s[5] += x.T @ y
        return record

    handles = [layer.register_forward_hook(hook(k), with_kwargs=True) for k, layer in enumerate(layers)]
    try:
        _forward_all(model, batches, "CKA hidden states", progress,
                     lambda batch: keep.__setitem__(slice(None), [token_mask(batch, device)]))
    finally:
        for h in handles:
            h.remove()
    out = torch.zeros(len(layers), dtype=torch.float64)
    for k, s in enumerate(stats):
        n, sx, sy, xx, yy, xy = (reduce_sum(t).cpu() for t in s)
        mx, my = sx / n, sy / n
        cxx, cyy = xx - n * torch.outer(mx, mx), yy - n * torch.outer(my, my)
        cxy = xy - n * torch.outer(mx, my)
        denominator = float(torch.linalg.norm(cxx) * torch.linalg.norm(cyy))
        if not (denominator > 0 and torch.isfinite(cxy).all()):
            raise SelectionError(f"CKA: layer {k}'s hidden states are constant or not finite over the tokens")
        out[k] = float((cxy ** 2).sum()) / denominator
    return out
