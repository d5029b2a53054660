"""The MoE-LoRA linear layer (HydraLoRA style, docs/method.md "MoE-LoRA"), as a PEFT LoRA layer.

    y = W x + (alpha / r) · Σ_i w_i(x) · B_i (A · dropout(x)),   w = softmax(router(x))

Fused form: Σ_i w_i B_i h = [B_1 … B_M] · (w ⊗ h) with h = A·dropout(x) — a single
matmul with the concatenated experts (d_out × M·r), the cost of one LoRA of rank M·r,
instead of M separate products.

The layer follows PEFT's ``LoraLayer`` conventions: per adapter name, ``lora_A[name]`` is an
``nn.Linear(d_in, r)``, ``lora_B[name]`` an ``nn.Linear(M·r, d_out)`` whose weight *is* the
concatenation ``[B_1 … B_M]`` (expert-major columns: ``B_i = weight[:, i·r:(i+1)·r]``), and
``lora_router[name]`` an ``nn.Linear(d_in, M)`` (absent for M = 1). For M = 1 the layer is
exactly PEFT's LoRA: same parameter names and shapes, so an M = 1 adapter is a plain PEFT
LoRA adapter.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraLayer


class MoELoraLinear(nn.Module, LoraLayer):
    """Wraps a frozen ``nn.Linear`` with, per adapter, a shared A, M expert B matrices and a router.

    Built by PEFT (``get_peft_model`` with a ``floe.MoELoraConfig``) as
    ``MoELoraLinear(target, adapter_name, config=config, r=..., lora_alpha=..., **kwargs)``;
    for stand-alone use see :meth:`wrap`.
    """

    adapter_layer_names = LoraLayer.adapter_layer_names + ("lora_router",)
    other_param_names = LoraLayer.other_param_names + ("num_experts",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 8, lora_alpha: float = 8,
                 **kwargs) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        if not isinstance(self.get_base_layer(), nn.Linear):
            raise TypeError(f"MoELoraLinear wraps nn.Linear, got {type(self.get_base_layer()).__name__}")
        self.lora_router = nn.ModuleDict({})
        self.num_experts: dict[str, int] = {}
        self.keep_router_probs = False  # set when the load-balancing loss is on
        self.router_probs: torch.Tensor | None = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        self.train(self.get_base_layer().training)  # a new module starts in train mode: keep the model's mode

    @classmethod
    def wrap(cls, base: nn.Linear, r: int, num_experts: int, alpha: float, dropout: float = 0.0,
             adapter_name: str = "default") -> "MoELoraLinear":
        """A stand-alone layer around ``base`` (tests, benchmarks); models use ``get_peft_model``."""
        from floe.adapters.moe_lora.config import MoELoraConfig

        cfg = MoELoraConfig(r=r, num_experts=num_experts, lora_alpha=alpha, lora_dropout=dropout)
        return cls(base, adapter_name, config=cfg, r=r, lora_alpha=alpha)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: Any, **kwargs) -> None:
        num_experts = int(getattr(config, "num_experts", 1))  # a plain LoraConfig adds a plain LoRA
        if r <= 0 or num_experts <= 0:
            raise ValueError(f"r and num_experts must be positive integers, got r={r}, num_experts={num_experts}")
        init = config.init_lora_weights
        unsupported = [name for name, on in (("use_dora", config.use_dora), ("lora_bias", config.lora_bias),
                                             ("init_lora_weights", init not in (True, False, "gaussian")))
                       if on]
        if unsupported:
            raise ValueError(f"MoE-LoRA layers do not support {', '.join(unsupported)}; "
                             "use init_lora_weights True/False/'gaussian', no DoRA, no LoRA bias")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.num_experts[adapter_name] = num_experts
        self.use_rslora[adapter_name] = config.use_rslora
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        self.use_dora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        drop = config.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(p=drop) if drop > 0 else nn.Identity()
        factory = dict(device=self.get_base_layer().weight.device, dtype=self.get_base_layer().weight.dtype)
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[adapter_name] = nn.Linear(num_experts * r, self.out_features, bias=False, **factory)
        if num_experts > 1:
            self.lora_router[adapter_name] = nn.Linear(self.in_features, num_experts, bias=False, **factory)
        if init is not False:
            # A and router: Kaiming-uniform (PEFT's LoRA default; 'gaussian': N(0, 1/r) for A);
            # every B_i zero, so the wrapped layer equals the base layer at initialisation.
            if init == "gaussian":
                nn.init.normal_(self.lora_A[adapter_name].weight, std=1 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
            if num_experts > 1:
                nn.init.kaiming_uniform_(self.lora_router[adapter_name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[adapter_name].weight)
        for part in (self.lora_dropout, self.lora_A, self.lora_B, self.lora_router):
            if adapter_name in part:
                part[adapter_name].train(self.training)  # new modules start in train mode
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @property
    def base(self) -> nn.Module:
        """The wrapped frozen linear (``get_base_layer()``)."""
        return self.get_base_layer()

    def _gated(self, x: torch.Tensor, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w ⊗ h, [B_1 … B_M])`` with ``h = A·dropout(x)``: the fused form's two factors.

        ``Σ_i w_i B_i h = [B_1 … B_M] · (w ⊗ h)``; for M = 1 this is just ``(h, B_1)``.
        """
        lora_a, b_cat = self.lora_A[adapter], self.lora_B[adapter].weight
        if adapter not in self.lora_router:
            return lora_a(self.lora_dropout[adapter](x)), b_cat
        # Route before A: backward then runs the A path first, whose fresh dx buffer the
        # router's and the base's dx are added into in place (the other order costs an extra
        # out-of-place (tokens × d_in) add, seen with torch.profiler).
        w = F.softmax(self.lora_router[adapter](x).float(), dim=-1)
        if self.keep_router_probs:
            self.router_probs = w
        h = lora_a(self.lora_dropout[adapter](x))  # (..., r)
        return (w.to(h.dtype).unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2), b_cat  # (..., M·r) = w ⊗ h

    def delta(self, x: torch.Tensor, adapter: str | None = None) -> torch.Tensor:
        """The adapter's contribution ``(alpha/r) Σ_i w_i B_i A dropout(x)`` (fused)."""
        adapter = adapter or self.active_adapters[0]
        gated, b_cat = self._gated(x, adapter)
        return F.linear(gated * self.scaling[adapter], b_cat)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("MoE-LoRA layers do not support mixed-adapter batches (adapter_names=...)")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        y = self.base_layer(x, *args, **kwargs)  # a fresh tensor nothing else refers to
        if self.merged:
            return y
        for adapter in self.active_adapters:
            if adapter in self.lora_A:
                y = self._add_delta(y, x, adapter)
        return y

    def _add_delta(self, y: torch.Tensor, x: torch.Tensor, adapter: str) -> torch.Tensor:
        gated, b_cat = self._gated(x, adapter)
        gated, b_t, s = gated.to(y.dtype), b_cat.to(y.dtype).t(), self.scaling[adapter]
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

    # --- merging: only an adapter without a router (M = 1) is a fixed weight update ---------

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        if self.num_experts[adapter] != 1:
            raise ValueError(
                f"adapter '{adapter}' has {self.num_experts[adapter]} experts and a router: its update depends on "
                "the input, so it cannot be merged into the base weight (only num_experts = 1 can be merged)")
        return self.lora_B[adapter].weight @ self.lora_A[adapter].weight * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        from peft.tuners.tuners_utils import check_adapters_to_merge

        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            self.get_delta_weight(adapter)  # refuses M > 1 before any weight changes
        base = self.get_base_layer()
        for adapter in adapter_names:
            if adapter not in self.lora_A:
                continue
            delta = self.get_delta_weight(adapter).to(base.weight.dtype)
            if safe_merge:
                merged = base.weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs or infs in the merged weights of adapter '{adapter}'")
                base.weight.data = merged
            else:
                base.weight.data += delta
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                base.weight.data -= self.get_delta_weight(adapter).to(base.weight.dtype)

    def __repr__(self) -> str:
        return "moe_lora." + super().__repr__()

    def extra_repr(self) -> str:
        return ", ".join(f"{a}: r={self.r[a]}, num_experts={self.num_experts[a]}, scaling={self.scaling[a]:g}"
                         for a in self.lora_A)
