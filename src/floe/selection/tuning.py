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

from floe.arch import decoder_layers, find_child
from floe.selection.determination import MaskSet
from floe.selection.importance import BatchCounter, SelectionError, all_reduce_sum, check_batch_count, my_batches
from floe.selection.lstsq import RidgeSolveError, ridge_solve
from floe.selection.masks import MaskHooks, base_linear, frozen, model_device, to_model_inputs, token_mask


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


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


@dataclass
class _BatchState:
    x_teacher: torch.Tensor
    x_student: torch.Tensor
    tokens: torch.Tensor  # (batch, seq) bool
    calls: list[tuple[tuple, dict]]  # per layer: the extra args/kwargs the model passed it


class _Capture:
    """Forward hooks recording a layer's projection inputs (pre-mask) and outputs."""

    def __init__(self, o_proj: nn.Module, o_base: nn.Linear, down: nn.Module, down_base: nn.Linear):
        self.values: dict[str, torch.Tensor] = {}
        self.stop_after_o = False  # end the layer's forward once o_proj has run (attention pass)
        self.handles = [
            o_base.register_forward_pre_hook(self._pre("z_attn"), prepend=True),
            down_base.register_forward_pre_hook(self._pre("z_ffn"), prepend=True),
            o_proj.register_forward_hook(self._post("o")),
            down.register_forward_hook(self._post("d")),
        ]

    def _pre(self, key: str):
        def hook(module, args):
            self.values[key] = args[0].detach()
        return hook

    def _post(self, key: str):
        def hook(module, args, output):
            self.values[key] = (output[0] if isinstance(output, tuple) else output).detach()
            if key == "o" and self.stop_after_o:
                raise _Stop
        return hook

    def run_attention(self, layer: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> None:
        """Run ``layer`` up to its ``o_proj`` only (the FFN is not needed for the attention pass)."""
        self.stop_after_o = True
        try:
            _run_layer(layer, hidden, call)
        except _Stop:
            pass
        finally:
            self.stop_after_o = False

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _first_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: Iterable[dict],
                          device: torch.device) -> list[_BatchState]:
    """One truncated forward per batch: the first layer's hidden input and every layer's call args."""
    states: list[_BatchState] = []
    seen = BatchCounter()
    for _, batch in my_batches(seen.wrap(batches)):
        calls: list[tuple[tuple, dict]] = []
        first: list[torch.Tensor] = []

        def pre(module, args, kwargs, _calls=calls, _first=first):
            hidden = args[0] if args else kwargs["hidden_states"]
            if not _first:
                _first.append(hidden.detach())
            rest = args[1:] if args else ()
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            _calls.append((rest, kw))
            if len(_calls) == len(layers):
                raise _Stop

        handles = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in layers]
        try:
            with torch.no_grad():
                model(**{k: v for k, v in to_model_inputs(batch, device).items() if k != "labels"},
                      use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if len(calls) != len(layers):
            raise SelectionError(f"tuning stage: the model called {len(calls)} of its {len(layers)} "
                                 "decoder layers; cannot replay them one by one")
        tok = token_mask(batch).to(device)
        states.append(_BatchState(first[0], first[0].clone(), tok, calls))
    n_seen = seen.count
    check_batch_count(n_seen)
    return states


def _run_layer(layer: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    return _first_tensor(layer(hidden, *args, **kwargs))


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
        zz, zwb = all_reduce_sum(self.zz), all_reduce_sum(self.zwb)
        sq, tokens = all_reduce_sum(self.sq), all_reduce_sum(self.tokens)
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
        g = hooks.geometry
        if tuple(masks.masked_head.shape) != (g.num_layers, g.num_heads) or \
                tuple(masks.masked_neuron.shape) != (g.num_layers, g.num_neurons):
            raise SelectionError(f"masks have shapes {tuple(masks.masked_head.shape)}/"
                                 f"{tuple(masks.masked_neuron.shape)}, the model needs "
                                 f"({g.num_layers}, {g.num_heads})/({g.num_layers}, {g.num_neurons})")
        binary_head = masks.head_mask().to(device)
        binary_neuron = masks.neuron_mask().to(device)
        hooks.head.copy_(binary_head)
        hooks.neuron.copy_(binary_neuron)
        tuned_head = binary_head.clone()
        tuned_neuron = binary_neuron.clone()
        states = _capture_layer_inputs(model, layers, batches, device)
        result = TuningResult(tuned_head, tuned_neuron, [], [] if keep_systems else None)
        for k in (progress or (lambda x: x))(range(len(layers))):
            layer = layers[k]
            o_proj, down = find_child(layer, "o_proj")[1], find_child(layer, "down_proj")[1]
            o_base, down_base = base_linear(o_proj), base_linear(down)
            cap = _Capture(o_proj, o_base, down, down_base)
            hooks.layers = {k}
            try:
                # teacher (all masks 1): targets of both sublayers, and the next teacher input
                hooks.enabled = False
                targets: list[tuple[torch.Tensor, torch.Tensor]] = []
                residual = True
                for i, st in enumerate(states):
                    out = _run_layer(layer, st.x_teacher, st.calls[k])
                    o, d = cap.values["o"], cap.values["d"]
                    if i == 0:
                        residual = _residual_form(st.x_teacher, o, d, out)
                    targets.append(((st.x_teacher + o) if residual else o, out if residual else d))
                    st.x_teacher = out
                hooks.enabled = True
                # every process must use the same objective (a process may hold no batch)
                residual = float(all_reduce_sum(torch.tensor(0.0 if residual else 1.0, dtype=torch.float64))) == 0.0
                objective = "residual" if residual else "projection"
                # attention: head masks free, student input x'
                hooks.neuron[k] = binary_neuron[k]
                free_h = torch.nonzero(~masks.masked_head[k]).reshape(-1)
                acc = _Accumulator(_unit_columns(free_h, g.head_dim), device)
                for st, (t_attn, _) in zip(states, targets):
                    cap.run_attention(layer, st.x_student, st.calls[k])
                    o = cap.values["o"]
                    acc.add(cap.values["z_attn"], t_attn - ((st.x_student + o) if residual else o),
                            o_base.weight, st.tokens)
                sys_h = acc.system(k, "attention", free_h, o_base.weight, g.head_dim)
                m_h, diag_h = _solve(sys_h, g.num_heads, damping, max_abs)
                tuned_head[k] = m_h.to(device, torch.float32)
                hooks.head[k] = tuned_head[k]
                # FFN: neuron masks free, tuned heads in place
                free_n = torch.nonzero(~masks.masked_neuron[k]).reshape(-1)
                acc = _Accumulator(free_n, device)
                # With the residual form the tuned layer's output is out_binary + W_F (δ ⊙ z_F): keep
                # (out, z_F) per batch when they fit in cache_bytes instead of re-running the layer.
                itemsize = states[0].x_student.element_size() if states else 4
                need = sum(st.x_student[..., 0].numel() for st in states) * free_n.numel() * itemsize
                cache: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if residual and need <= cache_bytes else None
                free_dev = free_n.to(device)
                for st, (_, t_ffn) in zip(states, targets):
                    out = _run_layer(layer, st.x_student, st.calls[k])
                    acc.add(cap.values["z_ffn"], t_ffn - (out if residual else cap.values["d"]),
                            down_base.weight, st.tokens)
                    if cache is not None:
                        cache.append((out, cap.values["z_ffn"].index_select(-1, free_dev)))
                sys_n = acc.system(k, "ffn", free_n, down_base.weight, 1)
                m_n, diag_n = _solve(sys_n, g.num_neurons, damping, max_abs)
                tuned_neuron[k] = m_n.to(device, torch.float32)
                hooks.neuron[k] = tuned_neuron[k]
                # advance the student through the tuned layer
                if cache is not None:
                    delta = (tuned_neuron[k].index_select(0, free_dev) - 1.0).float()
                    w_free = down_base.weight.index_select(1, free_dev).float()
                    for st, (out, z_free) in zip(states, cache):
                        st.x_student = (out.float() + (z_free.float() * delta) @ w_free.T).to(out.dtype)
                    del cache
                else:
                    for st in states:
                        st.x_student = _run_layer(layer, st.x_student, st.calls[k])
            finally:
                cap.remove()
            for diag in (diag_h, diag_n):
                diag["objective"] = objective
                result.diagnostics.append(diag)
            if keep_systems:
                result.systems.extend([sys_h, sys_n])
        result.head = tuned_head.float().cpu()
        result.neuron = tuned_neuron.float().cpu()
    return result

