"""The MoE-LoRA linear layer (HydraLoRA style, DESIGN.md "MoE-LoRA adapter").

    y = W x + (alpha / r) · Σ_i w_i(x) · B_i (A · dropout(x)),   w = softmax(router(x))

Fused form: Σ_i w_i B_i h = [B_1 … B_M] · (w ⊗ h) with h = A·dropout(x) — a single
matmul with the concatenated experts (d_out × M·r), the cost of one LoRA of rank M·r,
instead of M separate products.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class MoELoraLinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` with a shared A, ``num_experts`` B matrices and a router."""

    def __init__(self, base: nn.Linear, r: int, num_experts: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MoELoraLinear wraps nn.Linear, got {type(base).__name__}")
        self.base = base
        self.r = r
        self.num_experts = num_experts
        self.scaling = float(alpha) / r
        d_in, d_out = base.in_features, base.out_features
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(d_in, r, bias=False, **factory)
        self.lora_B = nn.Parameter(torch.zeros(num_experts, d_out, r, **factory))
        self.router = nn.Linear(d_in, num_experts, bias=False, **factory) if num_experts > 1 else None
        self.enabled = True
        self.keep_router_probs = False  # set by the model when the load-balancing loss is on
        self.router_probs: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # A and router: Kaiming-uniform (PEFT's LoRA default); every B_i zero, so the
        # wrapped layer equals the base layer at initialisation.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        if self.router is not None:
            nn.init.kaiming_uniform_(self.router.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # some model code reads .weight (dtype/device probes)
        return self.base.weight

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax routing weights ``w(x)`` of shape ``(..., M)``, computed in float32."""
        assert self.router is not None
        return F.softmax(self.router(x).float(), dim=-1)

    def _gated(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w ⊗ h, [B_1 … B_M])`` with ``h = A·dropout(x)``: the fused form's two factors.

        ``Σ_i w_i B_i h = [B_1 … B_M] · (w ⊗ h)``; for M = 1 this is just ``(h, B_1)``.
        """
        if self.router is None:
            return self.lora_A(self.lora_dropout(x)), self.lora_B[0]
        # Route before A: backward then runs the A path first, whose fresh dx buffer the
        # router's and the base's dx are added into in place (the other order costs an extra
        # out-of-place (tokens × d_in) add, seen with torch.profiler).
        w = self.route(x)
        if self.keep_router_probs:
            self.router_probs = w
        h = self.lora_A(self.lora_dropout(x))  # (..., r)
        gated = (w.to(h.dtype).unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)  # (..., M·r) = w ⊗ h
        # [B_1 … B_M]: (M, d_out, r) → (d_out, M·r), expert-major to match w ⊗ h. The copy is
        # M·r·d_out numbers, negligible next to the (tokens × d_out) output.
        b_cat = self.lora_B.permute(1, 0, 2).reshape(self.out_features, -1)
        return gated, b_cat

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution ``(alpha/r) Σ_i w_i B_i A dropout(x)`` (fused)."""
        gated, b_cat = self._gated(x)
        return F.linear(gated * self.scaling, b_cat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # a fresh tensor nothing else refers to (hooks on .base see x as given)
        if not self.enabled:
            return y
        gated, b_cat = self._gated(x)
        gated, b_t, s = gated.to(y.dtype), b_cat.to(y.dtype).t(), self.scaling
        # y += s · (w ⊗ h) · [B_1 … B_M]ᵀ as one GEMM accumulated in place into the base output,
        # the scaling folded in: no extra passes over the (tokens × d_out) output for "* s" and
        # "y + delta" (−20% of the adapter's forward+backward cost on CPU at SmolLM2's FFN size,
        # benchmarks/moe_lora_layer.py).
        if not (torch.is_grad_enabled() and (y.requires_grad or gated.requires_grad)):
            if y.is_contiguous():  # no autograd: in place through a flat view, any rank
                y.view(-1, y.shape[-1]).addmm_(gated.reshape(-1, gated.shape[-1]), b_t, alpha=s)
                return y
        # With autograd, in place on y itself only: through a view, autograd would copy the
        # gradient twice in backward (F.linear with a bias returns a view for 3-D input).
        elif y.dim() == 2:
            return y.addmm_(gated, b_t, alpha=s)
        elif y.dim() == 3 and y._base is None:
            return y.baddbmm_(gated, b_t.expand(y.shape[0], -1, -1), alpha=s)
        return y + F.linear(gated * s, b_t.t())

    def extra_repr(self) -> str:
        return f"r={self.r}, num_experts={self.num_experts}, scaling={self.scaling:g}"
