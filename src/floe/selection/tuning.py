"""Tuning stage: layer-wise least squares for continuous mask values (paper Eq. 16-21, App. H).

Layer by layer on the adapted model (docs/method.md, "Tuning stage"): the *teacher* runs with every
mask at 1; the *student* runs each layer on its own inputs, which flow through the already-tuned
earlier layers (and, for the FFN, through this layer's tuned attention). For a sublayer ``l``
(attention or FFN) with units ``u`` (heads or neurons) the residual output is affine in the
masks (the masks scale the input of the pre-trained ``o_proj``/``down_proj``, :mod:`.masks`):

    O(x'; m) = x' + const(x') + Σ_u m_u W_u z_u(x'),      W_u: the unit's columns of W

so with the masked units ``S`` held at 0 and ``δ = m − 1`` on the free units ``F``, Eq. 17 is

    min_δ Σ_t || Σ_{u∈F} δ_u W_u z_{u,t} − b_t ||²,   b_t = O_teacher,t − O(x'_t; m_binary)

whose normal equations need no ``tokens × d × units`` tensor: with the module input ``z_t``
(one column per input feature) and ``M = W^T W``,

    G = P^T (M ⊙ Σ_t z_t z_t^T) P,     r = P^T Σ_t z_t ⊙ (W^T b_t)

(``P`` sums a head's ``head_dim`` columns; identity for neurons). ``Σ_t z z^T`` and ``r`` are
accumulated over batches in float64, only over real (non-padding) tokens, and summed over
processes under ``torch.distributed``. The damped solve is
:func:`floe.selection.lstsq.ridge_solve` (towards ``m = 1``). If it fails, or gives a non-finite
value or ``|m| > max_abs``, the sublayer keeps its binary mask and the diagnostics say why.

The residual stream of LLaMA/Qwen2/Mistral/Gemma(1) layers is ``out = x + o_proj(·) +
down_proj(·)``; this is checked on the teacher. Layers that normalise the projections before
adding them (Gemma 2/3's sandwich norms) break the linearity; there the stage reconstructs the
projection outputs instead (``objective = "projection"`` in the diagnostics), an approximation.

Memory: the teacher and student hidden states of the batches (``2 × tokens × hidden``, on the
model's device), one ``D_in × D_in`` float64 accumulator (``D_in`` = intermediate size for the
FFN) and, when it fits in ``cache_bytes``, the free neurons' activations of one layer (which
spares a forward pass). Compute: the decoder layers run about 2.3 times over the data (teacher,
attention-only student, student), plus the Gram products (``tokens × D_in²`` per layer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from floe.arch import decoder_layers, find_child, model_device
from floe.distributed import reduce_sum
from floe.selection.importance import SelectionError
from floe.selection.lstsq import RidgeSolveError, ridge_solve
from floe.selection.masks import MaskHooks, MaskSet, UnitGeometry, base_linear, frozen
from floe.selection.replay import BatchState, Capture, capture_layer_inputs, run_layer


@dataclass
class SublayerSystem:
    """Normal equations of one sublayer over its free (unmasked) units."""

    layer: int
    kind: str
    """``"attention"`` (units = query heads) or ``"ffn"`` (units = neurons)."""
    free: torch.Tensor
    """``(n,)`` long: indices of the free units (the variables, in this order)."""
    gram: torch.Tensor
    """``(n, n)`` float64: ``Σ_t C_t^T C_t`` with ``C_t`` the free units' contributions."""
    rhs: torch.Tensor
    """``(n,)`` float64: ``Σ_t C_t^T b_t``."""
    sq_norm: float
    """``Σ_t ||b_t||²``: the reconstruction error at the binary mask."""
    tokens: int


@dataclass
class TuningResult:
    """Continuous mask values (masked units 0) and what happened per sublayer."""

    head: torch.Tensor
    """``(L, H)`` float32."""
    neuron: torch.Tensor
    """``(L, F)`` float32."""
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    systems: list[SublayerSystem] | None = None


class _Accumulator:
    """``Σ_t z_F z_F^T``, ``Σ_t z_F ⊙ (W^T b)_F`` and ``Σ_t ||b||²`` for one sublayer."""

    def __init__(self, cols: torch.Tensor, device: torch.device):
        n = cols.numel()
        self.cols = cols.to(device)
        self.zz = torch.zeros((n, n), dtype=torch.float64, device=device)
        self.zwb = torch.zeros(n, dtype=torch.float64, device=device)
        self.sq = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, z: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor) -> None:
        sel = tokens.reshape(-1)
        z = z.reshape(-1, z.shape[-1])[sel].float()
        b = b.reshape(-1, b.shape[-1])[sel].float()
        zf = z.index_select(1, self.cols)
        self.zz += (zf.T @ zf).double()
        wb = (b @ weight.float()).index_select(1, self.cols)  # (T, D_in) = W^T b_t per token
        self.zwb += (zf * wb).sum(0).double()
        self.sq += (b.double() ** 2).sum()
        self.tokens += float(sel.sum())

    def system(self, layer: int, kind: str, free: torch.Tensor, weight: torch.Tensor,
               unit_size: int) -> SublayerSystem:
        zz, zwb = reduce_sum(self.zz), reduce_sum(self.zwb)
        sq, tokens = reduce_sum(self.sq), reduce_sum(self.tokens)
        w = weight.double().index_select(1, self.cols)
        n = free.numel()
        gram = ((w.T @ w) * zz).reshape(n, unit_size, n, unit_size).sum((1, 3))
        rhs = zwb.reshape(n, unit_size).sum(1)
        return SublayerSystem(layer, kind, free.cpu(), gram.cpu(), rhs.cpu(), float(sq), int(tokens))


def _unit_columns(free: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Input-feature columns of the given units (``unit_size`` consecutive columns each)."""
    return (free.unsqueeze(1) * unit_size + torch.arange(unit_size)).reshape(-1)


def _solve(system: SublayerSystem, num_units: int, damping: float, max_abs: float) -> tuple[torch.Tensor, dict]:
    """Tuned values for all units of the sublayer (masked 0, free 1 + δ) and diagnostics."""
    m = torch.zeros(num_units, dtype=torch.float64)
    m[system.free] = 1.0
    diag: dict[str, Any] = dict(layer=system.layer, kind=system.kind, free_units=int(system.free.numel()),
                                tokens=system.tokens, error_binary=system.sq_norm)
    if system.free.numel() == 0:
        diag.update(status="no_free_units", error_tuned=system.sq_norm)
        return m, diag
    try:
        delta = ridge_solve(system.gram, system.rhs, damping).double()
    except (RidgeSolveError, torch.linalg.LinAlgError, RuntimeError) as err:
        diag.update(status="fallback_binary", reason=f"solve failed: {err}", error_tuned=system.sq_norm)
        return m, diag
    tuned = 1.0 + delta
    worst = float(tuned.abs().max())
    if not math.isfinite(worst) or worst > max_abs:
        diag.update(status="fallback_binary", reason=f"max |m| = {worst:.3g} > {max_abs:g}",
                    error_tuned=system.sq_norm)
        return m, diag
    m[system.free] = tuned
    after = system.sq_norm - 2 * float(delta @ system.rhs) + float(delta @ system.gram @ delta)
    diag.update(status="tuned", error_tuned=max(after, 0.0), max_abs_mask=worst,
                mean_mask=float(tuned.mean()), min_mask=float(tuned.min()))
    return m, diag


def _residual_form(x: torch.Tensor, o: torch.Tensor, d: torch.Tensor, out: torch.Tensor) -> bool:
    """Does ``out == x + o + d`` hold (LLaMA-style residual stream)?"""
    err = (out.float() - (x.float() + o.float() + d.float())).norm()
    tol = (1e-4 if out.dtype == torch.float32 or out.dtype == torch.float64 else 2e-2) * out.float().norm()
    return bool(err <= tol + 1e-12)


@dataclass
class _Tuner:
    """The state of the tuning stage as it walks the layers: the model's mask hooks, the binary
    masks, the batches' teacher/student inputs and the tuned values so far."""

    hooks: MaskHooks
    masks: MaskSet
    states: list[BatchState]
    device: torch.device
    damping: float
    max_abs: float
    cache_bytes: int
    binary_neuron: torch.Tensor
    tuned_head: torch.Tensor
    tuned_neuron: torch.Tensor

    @property
    def geometry(self) -> UnitGeometry:
        return self.hooks.geometry

    def teacher(self, k: int, layer: nn.Module, cap: Capture) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], bool]:
        """Layer ``k`` with every mask at 1: the targets of both sublayers, and the next teacher input.
        Also whether the layer is LLaMA-style ``out = x + o + d`` (the same answer on every process)."""
        self.hooks.enabled = False
        targets: list[tuple[torch.Tensor, torch.Tensor]] = []
        residual = True
        for i, st in enumerate(self.states):
            out = run_layer(layer, st.x_teacher, st.calls[k])
            o, d = cap.values["o"], cap.values["d"]
            if i == 0:
                residual = _residual_form(st.x_teacher, o, d, out)
            targets.append(((st.x_teacher + o) if residual else o, out if residual else d))
            st.x_teacher = out
        self.hooks.enabled = True
        # every process must use the same objective (a process may hold no batch)
        residual = float(reduce_sum(torch.tensor(0.0 if residual else 1.0, dtype=torch.float64))) == 0.0
        return targets, residual

    def attention(self, k: int, layer: nn.Module, cap: Capture, o_base: nn.Linear, targets: list,
                  residual: bool) -> tuple[SublayerSystem, dict]:
        """Head masks free, the student's input ``x'``: solve, and put the tuned heads in place."""
        g = self.geometry
        self.hooks.neuron[k] = self.binary_neuron[k]
        free_h = torch.nonzero(~self.masks.masked_head[k]).reshape(-1)
        acc = _Accumulator(_unit_columns(free_h, g.head_dim), self.device)
        for st, (t_attn, _) in zip(self.states, targets):
            cap.run_attention(layer, st.x_student, st.calls[k])
            o = cap.values["o"]
            acc.add(cap.values["z_attn"], t_attn - ((st.x_student + o) if residual else o), o_base.weight, st.tokens)
        system = acc.system(k, "attention", free_h, o_base.weight, g.head_dim)
        m_h, diag = _solve(system, g.num_heads, self.damping, self.max_abs)
        self.tuned_head[k] = m_h.to(self.device, torch.float32)
        self.hooks.head[k] = self.tuned_head[k]
        return system, diag

    def ffn(self, k: int, layer: nn.Module, cap: Capture, down_base: nn.Linear, targets: list,
            residual: bool) -> tuple[SublayerSystem, dict]:
        """Neuron masks free, the tuned heads in place: solve, then advance the student through the layer."""
        g = self.geometry
        free_n = torch.nonzero(~self.masks.masked_neuron[k]).reshape(-1)
        acc = _Accumulator(free_n, self.device)
        # With the residual form the tuned layer's output is out_binary + W_F (δ ⊙ z_F): keep
        # (out, z_F) per batch when they fit in cache_bytes instead of re-running the layer.
        itemsize = self.states[0].x_student.element_size() if self.states else 4
        need = sum(st.x_student[..., 0].numel() for st in self.states) * free_n.numel() * itemsize
        cache: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if residual and need <= self.cache_bytes else None
        free_dev = free_n.to(self.device)
        for st, (_, t_ffn) in zip(self.states, targets):
            out = run_layer(layer, st.x_student, st.calls[k])
            acc.add(cap.values["z_ffn"], t_ffn - (out if residual else cap.values["d"]), down_base.weight, st.tokens)
            if cache is not None:
                cache.append((out, cap.values["z_ffn"].index_select(-1, free_dev)))
        system = acc.system(k, "ffn", free_n, down_base.weight, 1)
        m_n, diag = _solve(system, g.num_neurons, self.damping, self.max_abs)
        self.tuned_neuron[k] = m_n.to(self.device, torch.float32)
        self.hooks.neuron[k] = self.tuned_neuron[k]
        if cache is not None:
            delta = (self.tuned_neuron[k].index_select(0, free_dev) - 1.0).float()
            w_free = down_base.weight.index_select(1, free_dev).float()
            for st, (out, z_free) in zip(self.states, cache):
                st.x_student = (out.float() + (z_free.float() * delta) @ w_free.T).to(out.dtype)
        else:
            for st in self.states:
                st.x_student = run_layer(layer, st.x_student, st.calls[k])
        return system, diag

    def layer(self, k: int, layer: nn.Module) -> list[tuple[SublayerSystem, dict]]:
        """Tune layer ``k``: attention, then FFN; ``(system, diagnostics)`` per sublayer."""
        o_proj, down = find_child(layer, "o_proj")[1], find_child(layer, "down_proj")[1]
        o_base, down_base = base_linear(o_proj), base_linear(down)
        cap = Capture(o_proj, o_base, down, down_base)
        self.hooks.layers = {k}
        try:
            targets, residual = self.teacher(k, layer, cap)
            solved = [self.attention(k, layer, cap, o_base, targets, residual),
                      self.ffn(k, layer, cap, down_base, targets, residual)]
        finally:
            cap.remove()
        for _, diag in solved:
            diag["objective"] = "residual" if residual else "projection"
        return solved


def _check_shapes(masks: MaskSet, g: UnitGeometry) -> None:
    if tuple(masks.masked_head.shape) != (g.num_layers, g.num_heads) or \
            tuple(masks.masked_neuron.shape) != (g.num_layers, g.num_neurons):
        raise SelectionError(f"masks have shapes {tuple(masks.masked_head.shape)}/"
                             f"{tuple(masks.masked_neuron.shape)}, the model needs "
                             f"({g.num_layers}, {g.num_heads})/({g.num_layers}, {g.num_neurons})")


def tune_masks(model: nn.Module, batches: Iterable[dict], masks: MaskSet, *, damping: float = 1e-3,
               max_abs: float = 10.0, keep_systems: bool = False, cache_bytes: int = 1 << 30,
               progress: Callable[[Iterable], Iterable] | None = None) -> TuningResult:
    """The tuning stage on the adapted ``model`` (run it with adapters enabled).

    ``masks``: the binary masked set from determination/refinement. Returns the continuous mask
    values (masked units 0; a sublayer whose solve fails keeps 1 on its free units) and one
    diagnostics dict per sublayer (``status`` ``"tuned"``, ``"fallback_binary"`` with a
    ``reason``, or ``"no_free_units"``; ``error_binary``/``error_tuned`` = Σ_t‖b_t‖² before and
    after). ``keep_systems`` also returns each sublayer's normal equations. ``cache_bytes`` bounds
    the per-layer cache of FFN activations that spares re-running each layer after its solve.
    """
    device = model_device(model)
    _, layers = decoder_layers(model)
    with frozen(model), MaskHooks(model) as hooks, torch.no_grad():
        _check_shapes(masks, hooks.geometry)
        binary_head = masks.head_mask().to(device)
        binary_neuron = masks.neuron_mask().to(device)
        hooks.head.copy_(binary_head)
        hooks.neuron.copy_(binary_neuron)
        tuner = _Tuner(hooks, masks, capture_layer_inputs(model, layers, batches, device), device, damping,
                       max_abs, cache_bytes, binary_neuron, binary_head.clone(), binary_neuron.clone())
        result = TuningResult(tuner.tuned_head, tuner.tuned_neuron, [], [] if keep_systems else None)
        for k in (progress or (lambda x: x))(range(len(layers))):
            for system, diag in tuner.layer(k, layers[k]):
                result.diagnostics.append(diag)
                if keep_systems:
                    result.systems.append(system)
        result.head = tuner.tuned_head.float().cpu()
        result.neuron = tuner.tuned_neuron.float().cpu()
    return result
