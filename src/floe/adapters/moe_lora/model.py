"""Injection of MoE-LoRA into a causal LM, saving/loading, and export to PEFT LoRA."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from floe.adapters.moe_lora.config import MoELoraConfig
from floe.adapters.moe_lora.layer import MoELoraLinear
from floe.arch import decoder_layers
from floe.errors import InputError
from floe.io import atomic_dir

ADAPTER_CONFIG_NAME = "floe_adapter_config.json"
ADAPTER_WEIGHTS_NAME = "floe_adapter.safetensors"
FORMAT = "floe-moe-lora/1"
_CONFIG_ATTR = "floe_moe_lora_config"


class AdapterError(InputError):
    """An adapter does not fit a model, or an adapter folder is invalid."""


def moe_lora_modules(model: nn.Module) -> dict[str, MoELoraLinear]:
    """All MoE-LoRA layers of ``model`` by qualified name (in module order)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoELoraLinear)}


def _set_child(root: nn.Module, qualified: str, new: nn.Module) -> None:
    parent_name, _, leaf = qualified.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def apply_moe_lora(model: nn.Module, config: MoELoraConfig, seed: int | None = None) -> list[str]:
    """Wrap ``config.target_modules`` of the chosen decoder layers; freeze everything else.

    ``seed``: draw the adapter's initial weights (A, router) from this seed, leaving the global
    random state untouched, so the same seed gives the same initial adapter; None draws from
    the global generator. Returns the qualified names of the wrapped modules. Raises
    ``AdapterError`` when a target name matches nothing (listing the linear modules that
    exist), when a layer index is out of range, when the rank exceeds a target's
    ``min(d_in, d_out)``, or when the model already carries MoE-LoRA.
    """
    if seed is None:
        return _apply(model, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _apply(model, config)


def _apply(model: nn.Module, config: MoELoraConfig) -> list[str]:
    if moe_lora_modules(model):
        raise AdapterError("model already has MoE-LoRA layers; load a fresh base model to apply a new adapter")
    prefix, layers = decoder_layers(model)
    chosen = list(range(len(layers))) if config.layers is None else list(config.layers)
    bad = [i for i in chosen if not 0 <= i < len(layers)]
    if bad:
        raise AdapterError(f"layer indices {bad} out of range: the model has {len(layers)} decoder layers (0..{len(layers) - 1})")
    linear_leaves = sorted({n.split(".")[-1] for n, m in layers[0].named_modules() if isinstance(m, nn.Linear)})
    missing = [t for t in config.target_modules if t not in linear_leaves]
    if missing:
        raise AdapterError(
            f"target_modules {missing} match no nn.Linear in {type(layers[0]).__name__}; "
            f"linear modules in each decoder layer: {linear_leaves}"
        )
    targets = {n: m for n, m in layers[0].named_modules()
               if n.split(".")[-1] in config.target_modules and isinstance(m, nn.Linear)}
    max_rank = min(min(m.in_features, m.out_features) for m in targets.values())
    if config.r > max_rank:
        small = [f"{n} ({m.in_features}->{m.out_features})" for n, m in targets.items()
                 if config.r > min(m.in_features, m.out_features)]
        raise AdapterError(f"rank r={config.r} exceeds min(d_in, d_out) of target module(s) {small}: "
                           f"use r <= {max_rank} or drop those targets")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped: list[str] = []
    for i in chosen:
        for name, module in list(layers[i].named_modules()):
            if name.split(".")[-1] in config.target_modules and isinstance(module, nn.Linear):
                new = MoELoraLinear(module, config.r, config.num_experts, config.alpha, config.dropout)
                new.keep_router_probs = config.router_aux_loss_coef > 0
                new.train(module.training)  # a fresh nn.Module is in train mode; keep the model's mode (eval → no dropout)
                _set_child(layers[i], name, new)
                wrapped.append(f"{prefix}.{i}.{name}")
    setattr(model, _CONFIG_ATTR, config)
    return wrapped


def adapter_config(model: nn.Module) -> MoELoraConfig:
    cfg = getattr(model, _CONFIG_ATTR, None)
    if cfg is None:
        raise AdapterError("model has no MoE-LoRA adapter: call apply_moe_lora or load_adapter first")
    return cfg


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights only: ``<module>.lora_A.weight``, ``<module>.lora_B``, ``<module>.router.weight``."""
    out: dict[str, torch.Tensor] = {}
    for name, m in moe_lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = m.lora_A.weight
        out[f"{name}.lora_B"] = m.lora_B
        if m.router is not None:
            out[f"{name}.router.weight"] = m.router.weight
    return out


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model: every MoE-LoRA layer passes its input through the frozen base only."""
    mods = list(moe_lora_modules(model).values())
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m, b in zip(mods, before):
            m.enabled = b


def router_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Switch-Transformer load-balancing loss averaged over layers, ``M · Σ_i f_i · P_i``.

    ``P_i`` is the mean routing probability of expert i over the tokens of the last forward,
    ``f_i`` the share of tokens whose largest weight is expert i. Equals 1 for a uniform
    router; larger when a few experts take most tokens. None when nothing was recorded.
    """
    losses = []
    for m in moe_lora_modules(model).values():
        w = m.router_probs
        if w is None:
            continue
        w = w.reshape(-1, w.shape[-1])
        f = torch.bincount(w.argmax(-1), minlength=w.shape[-1]).to(w.dtype) / w.shape[0]
        losses.append(w.shape[-1] * (f * w.mean(0)).sum())
        m.router_probs = None
    return torch.stack(losses).mean() if losses else None



def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Save the adapter (JSON config + safetensors weights) atomically into ``directory``."""
    cfg = adapter_config(model)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    meta = {"format": FORMAT, **cfg.to_dict()}
    if meta.get("base_model_name_or_path") is None:
        meta["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None)

    def write(tmp: Path) -> None:
        (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        save_file(weights, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})

    atomic_dir(directory, write)
    return Path(directory)


def read_adapter_config(directory: str | os.PathLike) -> MoELoraConfig:
    """Read an adapter folder's config, with a clear error when it is not one."""
    path = Path(directory) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        hint = " (it looks like a PEFT adapter: load it with peft.PeftModel.from_pretrained)" if (
            Path(directory) / "adapter_config.json").is_file() else ""
        raise AdapterError(f"{directory} is not a FLoE adapter folder: {ADAPTER_CONFIG_NAME} not found{hint}")
    try:
        meta = json.loads(path.read_text())
        return MoELoraConfig.from_dict(meta)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise AdapterError(f"{path}: invalid adapter config: {e}") from e


def load_adapter(model: nn.Module, directory: str | os.PathLike, trainable: bool = False) -> MoELoraConfig:
    """Attach (if needed) and load a saved adapter into ``model``.

    A model without MoE-LoRA gets the saved configuration applied first; a model that has
    one must match it. Shape or key mismatches (an adapter for another model) raise
    ``AdapterError`` naming the offending tensors. Adapter weights are frozen unless
    ``trainable``.
    """
    cfg = read_adapter_config(directory)
    if moe_lora_modules(model):
        _check_same_hyperparameters(adapter_config(model), cfg, directory)
        _load_weights(model, cfg, directory, trainable)
        return cfg
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_moe_lora(model, cfg)
    try:
        _load_weights(model, cfg, directory, trainable)
    except BaseException:
        _remove_moe_lora(model, requires_grad)  # leave the model as it was given
        raise
    return cfg


def _check_same_hyperparameters(current: MoELoraConfig, saved: MoELoraConfig, directory) -> None:
    """Weights of equal shape but another alpha would silently change the output: refuse."""
    diff = [f"{k}: saved {getattr(saved, k)!r} vs model {getattr(current, k)!r}"
            for k in ("r", "num_experts", "alpha") if getattr(saved, k) != getattr(current, k)]
    if diff:
        raise AdapterError(
            f"adapter in {directory} was trained with other hyperparameters than the model's MoE-LoRA layers ("
            + "; ".join(diff) + "). Load it into a fresh base model instead."
        )


def _remove_moe_lora(model: nn.Module, requires_grad: dict[str, bool]) -> None:
    """Undo ``apply_moe_lora``: put the base linears back and restore ``requires_grad`` flags."""
    for name, m in moe_lora_modules(model).items():
        _set_child(model, name, m.base)
    if hasattr(model, _CONFIG_ATTR):
        delattr(model, _CONFIG_ATTR)
    for n, p in model.named_parameters():
        p.requires_grad_(requires_grad.get(n, p.requires_grad))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a missing, truncated or corrupt file is an ``AdapterError`` naming it."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise AdapterError(f"{path} not found: the adapter folder is incomplete; copy or re-train it") from None
    except Exception as e:  # safetensors raises its own SafetensorError (not an OSError) for a cut file
        raise AdapterError(f"{path} is truncated or corrupt ({' '.join(str(e).split())}); "
                           "copy it again or re-train the adapter") from None


def _load_weights(model: nn.Module, cfg: MoELoraConfig, directory, trainable: bool) -> None:
    own = adapter_state_dict(model)
    saved = read_weights(Path(directory) / ADAPTER_WEIGHTS_NAME)
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or unexpected:
        raise AdapterError(
            f"adapter in {directory} does not match the model's MoE-LoRA layers: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}. Was it trained on another model or layer set?"
        )
    wrong = [f"{k}: saved {tuple(saved[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items() if v.shape != saved[k].shape]
    if wrong:
        raise AdapterError(
            f"adapter in {directory} has shapes that do not fit this model (trained on "
            f"{cfg.base_model_name_or_path!r}?): " + "; ".join(wrong[:5])
        )
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(saved[k].to(v.dtype))
            v.requires_grad_(trainable)


def export_peft(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write a standard PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    Only plain LoRA (M = 1) has an exact PEFT equivalent; M > 1 is refused.
    """
    cfg = adapter_config(model)
    mods = moe_lora_modules(model)
    if cfg.num_experts != 1:
        raise AdapterError(
            f"export_peft needs a plain LoRA adapter (num_experts = 1), this one has {cfg.num_experts} experts "
            "and a router, which PEFT's LoRA format cannot express. Train with num_experts: 1 to export, "
            "or keep the FLoE format (save_adapter)."
        )
    prefix, layers = decoder_layers(model)
    layer_ids = sorted({int(n[len(prefix) + 1:].split(".")[0]) for n in mods})
    weights: dict[str, torch.Tensor] = {}
    for name, m in mods.items():
        weights[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous()
        weights[f"base_model.model.{name}.lora_B.weight"] = m.lora_B[0].detach().cpu().contiguous()
    peft_cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": cfg.base_model_name_or_path
        or getattr(getattr(model, "config", None), "_name_or_path", None),
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": list(cfg.target_modules),
        "layers_to_transform": layer_ids,
        "layers_pattern": prefix.split(".")[-1],
        "rank_pattern": {name: cfg.r for name in mods},
        "alpha_pattern": {},
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }

    def write(tmp: Path) -> None:
        (tmp / "adapter_config.json").write_text(json.dumps(peft_cfg, indent=2) + "\n")
        save_file(weights, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})

    atomic_dir(directory, write)
    return Path(directory)
