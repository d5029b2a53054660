"""Mask variables on attention heads and FFN neurons (paper Eq. 2; docs/method.md, "Mask variables").

One mask variable per *query* head and one per FFN neuron, in every decoder layer:

* head ``h`` of layer ``l``: a forward pre-hook on ``o_proj`` multiplies columns
  ``h·head_dim … (h+1)·head_dim − 1`` of its input (the concatenated head outputs) by
  ``m[l, h]``. ``head_dim`` comes from :func:`floe.arch.geometry` (``config.head_dim`` when the
  config has one), so grouped-query attention and Gemma-style head sizes work;
* neuron ``j``: a forward pre-hook on ``down_proj`` multiplies entry ``j`` of its input (the
  gated activation ``act(gate) · up``) by ``m[l, j]``.

The hooks sit on the *pre-trained* ``nn.Linear``: when MoE-LoRA wraps ``o_proj``/``down_proj``
(``MoELoraLinear``), the hook goes on the wrapper's ``.base``, so the adapter still sees the
unmasked input. That is Eq. 2, ``θ̃ = m ⊙ θ + φ`` — the mask scales the pre-trained weights, not
the adapter — and it keeps each sublayer's output linear (affine) in its masks, which the tuning
stage relies on (a router's softmax on a masked input would not be). With all masks 1 the model's
output is bit-identical (multiplication by 1.0 is exact); nothing in the model's code is patched,
and leaving the context removes every hook.

:class:`MaskSet` is the binary masked set (``True`` = mask 0) that determination (Alg. 1),
refinement (Alg. 2) and tuning pass on; :class:`MaskHooks` applies its mask values.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn

from floe.arch import decoder_layers, find_child, geometry, model_device


@dataclass(frozen=True)
class UnitGeometry:
    """Mask-variable counts of a model: ``L`` layers × ``H`` query heads / ``F`` neurons."""

    num_layers: int
    num_heads: int
    head_dim: int
    num_neurons: int


@dataclass(frozen=True, eq=False)
class MaskSet:
    """Masked units (``True`` = mask variable set to 0).

    ``masked_head``: ``(L, H)`` bool; ``masked_neuron``: ``(L, F)`` bool. ``diagnostics`` holds
    what the stage that produced the set wants to report (JSON-friendly scalars).
    """

    masked_head: torch.Tensor
    masked_neuron: torch.Tensor
    diagnostics: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("masked_head", "masked_neuron"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.bool or t.dim() != 2:
                raise ValueError(f"MaskSet.{name} must be a 2-D bool tensor (layers, units); "
                                 f"got {type(t).__name__} {getattr(t, 'dtype', '')} "
                                 f"{tuple(getattr(t, 'shape', ()))}")
        if self.masked_head.shape[0] != self.masked_neuron.shape[0]:
            raise ValueError(f"MaskSet layer counts differ: heads {tuple(self.masked_head.shape)}"
                             f" vs neurons {tuple(self.masked_neuron.shape)}")

    @property
    def num_layers(self) -> int:
        return int(self.masked_head.shape[0])

    def head_mask(self) -> torch.Tensor:
        """Float mask values ``m`` for heads: 0 where masked, 1 elsewhere, ``(L, H)``."""
        return (~self.masked_head).to(torch.float32)

    def neuron_mask(self) -> torch.Tensor:
        """Float mask values ``m`` for neurons: 0 where masked, 1 elsewhere, ``(L, F)``."""
        return (~self.masked_neuron).to(torch.float32)

    def masked_cost(self, cost_head: torch.Tensor, cost_neuron: torch.Tensor) -> float:
        """Total per-unit cost ``sum_{u masked} c_u``."""
        return float(cost_head.double()[self.masked_head].sum()
                     + cost_neuron.double()[self.masked_neuron].sum())

    def counts_per_layer(self) -> tuple[list[int], list[int]]:
        """Masked heads and masked neurons per layer."""
        return (self.masked_head.sum(1).tolist(), self.masked_neuron.sum(1).tolist())


def base_linear(module: nn.Module) -> nn.Linear:
    """The pre-trained ``nn.Linear`` inside ``module`` (itself, or an adapter wrapper's base)."""
    if isinstance(module, nn.Linear):
        return module
    for attr in ("base", "base_layer"):  # FLoE's MoELoraLinear / PEFT's LoraLayer
        inner = getattr(module, attr, None)
        if isinstance(inner, nn.Linear):
            return inner
    raise TypeError(f"expected an nn.Linear or an adapter wrapping one, got {type(module).__name__}")


def unit_geometry(model: nn.Module) -> UnitGeometry:
    """Counts of head and neuron mask variables, checked against the modules' shapes."""
    geo = geometry(model.config)
    _, layers = decoder_layers(model)
    o_proj = base_linear(find_child(layers[0], "o_proj")[1])
    down = base_linear(find_child(layers[0], "down_proj")[1])
    if o_proj.in_features != geo.num_heads * geo.head_dim:
        raise ValueError(
            f"o_proj takes {o_proj.in_features} inputs but the config gives {geo.num_heads} heads × "
            f"head_dim {geo.head_dim} = {geo.num_heads * geo.head_dim}; cannot place head masks")
    return UnitGeometry(len(layers), geo.num_heads, geo.head_dim, down.in_features)


def mask_modules(model: nn.Module) -> list[tuple[nn.Linear, nn.Linear]]:
    """Per decoder layer, the pre-trained ``(o_proj, down_proj)`` linears the masks act on."""
    _, layers = decoder_layers(model)
    return [(base_linear(find_child(layer, "o_proj")[1]), base_linear(find_child(layer, "down_proj")[1]))
            for layer in layers]


def scale_heads(x: torch.Tensor, m: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Multiply head ``h``'s slice ``x[..., h·d:(h+1)·d]`` by ``m[h]`` (``x``: ``(..., H·d)``)."""
    shape = x.shape
    return (x.reshape(*shape[:-1], m.shape[0], head_dim) * m.to(x.dtype).unsqueeze(-1)).reshape(shape)


class MaskHooks:
    """Forward pre-hooks that multiply head/neuron mask variables into a model.

    ``head``: ``(L, H)`` and ``neuron``: ``(L, F)`` float tensors on the model's device (ones
    unless given; pass ``requires_grad=True`` for gradients w.r.t. the masks). The hooks read
    the tensors at every forward, so they may be changed in place (or replaced) between calls;
    ``enabled = False`` or ``layers = {…}`` limits where they act. Use as a context manager, or
    call :meth:`remove`.
    """

    def __init__(self, model: nn.Module, head: torch.Tensor | None = None, neuron: torch.Tensor | None = None,
                 requires_grad: bool = False, per_example: bool = False):
        self.geometry = unit_geometry(model)
        g = self.geometry
        device = model_device(model)
        self.head = self._init(head, (g.num_layers, g.num_heads), device, requires_grad, "head")
        self.neuron = self._init(neuron, (g.num_layers, g.num_neurons), device, requires_grad, "neuron")
        self.enabled = True
        self.layers: set[int] | None = None  # None: every layer
        # per_example: during backward, ``example_head[l]`` (batch, H) / ``example_neuron[l]`` (batch, F)
        # receive each example's part of ∂L/∂m (Σ over its tokens of x · ∂L/∂(m ⊙ x)), see
        # :func:`floe.selection.importance.mask_gradients`
        self.per_example = per_example
        self.example_head: dict[int, torch.Tensor] = {}
        self.example_neuron: dict[int, torch.Tensor] = {}
        self._handles = []
        for layer, (o_proj, down) in enumerate(mask_modules(model)):
            self._handles.append(o_proj.register_forward_pre_hook(self._head_hook(layer)))
            self._handles.append(down.register_forward_pre_hook(self._neuron_hook(layer)))

    @staticmethod
    def _init(t: torch.Tensor | None, shape: tuple[int, int], device, requires_grad: bool, name: str) -> torch.Tensor:
        if t is None:
            t = torch.ones(shape, dtype=torch.float32, device=device)
        elif tuple(t.shape) != shape:
            raise ValueError(f"{name} mask must have shape {shape} (layers, units), got {tuple(t.shape)}")
        else:
            t = t.detach().to(device=device, dtype=torch.float32).clone()
        return t.requires_grad_(requires_grad)

    def _active(self, layer: int) -> bool:
        return self.enabled and (self.layers is None or layer in self.layers)

    def _head_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple):
            if not self._active(layer):
                return None
            out = scale_heads(args[0], self.head[layer], self.geometry.head_dim)
            if self.per_example and out.requires_grad:
                out.register_hook(self._example_sums(args[0].detach(), self.example_head, layer, True))
            return (out, *args[1:])
        return hook

    def _neuron_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple):
            if not self._active(layer):
                return None
            out = args[0] * self.neuron[layer].to(args[0].dtype)
            if self.per_example and out.requires_grad:
                out.register_hook(self._example_sums(args[0].detach(), self.example_neuron, layer, False))
            return (out, *args[1:])
        return hook

    def _example_sums(self, x: torch.Tensor, sink: dict[int, torch.Tensor], layer: int, heads: bool):
        """Tensor hook on ``m ⊙ x``: per example, ``Σ_tokens x · grad`` per unit (= ∂L/∂m at m = 1)."""
        def hook(grad: torch.Tensor) -> None:
            prod = x.float() * grad.float()  # (batch, seq, units·d)
            prod = prod.reshape(prod.shape[0], -1, prod.shape[-1]).sum(1)
            if heads:
                prod = prod.reshape(prod.shape[0], -1, self.geometry.head_dim).sum(2)
            sink[layer] = prod.detach()
        return hook

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "MaskHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def mask_hooks(model: nn.Module, head: torch.Tensor | None = None, neuron: torch.Tensor | None = None,
               requires_grad: bool = False) -> MaskHooks:
    """Install head/neuron mask hooks on ``model``; use as ``with mask_hooks(model) as m: ...``."""
    return MaskHooks(model, head, neuron, requires_grad)


def token_mask(batch: dict) -> torch.Tensor:
    """``(batch, seq)`` bool: real (non-padding) tokens."""
    am = batch.get("attention_mask")
    return torch.ones_like(batch["input_ids"], dtype=torch.bool) if am is None else am.bool()


@contextlib.contextmanager
def frozen(model: nn.Module, keep: Iterable[nn.Parameter] = ()) -> Iterator[None]:
    """Every parameter frozen except ``keep``, eval mode (no dropout); both restored after."""
    params = list(model.parameters())
    before = [p.requires_grad for p in params]
    was_training = model.training
    keep_ids = {id(p) for p in keep}
    for p in params:
        p.requires_grad_(id(p) in keep_ids)
    model.eval()
    try:
        yield
    finally:
        for p, b in zip(params, before):
            p.requires_grad_(b)
        model.train(was_training)
