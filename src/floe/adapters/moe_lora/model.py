"""FLoE's helpers around a PEFT model carrying MoE-LoRA (injection, saving and loading are PEFT's).

``apply_moe_lora(model, cfg)`` runs ``peft.get_peft_model`` on ``model`` (which PEFT adapts in
place) after checks with FLoE's error messages, and keeps the ``PeftModel`` with it
(:func:`peft_model`), so code holding the plain model keeps working. Folders are PEFT's
(``adapter_config.json`` + ``adapter_model.safetensors``).
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from floe.adapters.moe_lora.config import MoELoraConfig
from floe.adapters.moe_lora.convert import OLD_CONFIG_NAME
from floe.adapters.moe_lora.layer import MoELoraLinear
from floe.adapters.moe_lora.settings import AdapterSettings
from floe.adapters.naming import SAVE_KWARGS, attach
from floe.arch import decoder_layers
from floe.errors import InputError
from floe.io import atomic_dir

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_ATTR = "_floe_peft_model"


class AdapterError(InputError):
    """An adapter does not fit a model, or an adapter folder is invalid."""


def peft_model(model: nn.Module) -> PeftModel | None:
    """The ``PeftModel`` of ``model``: itself, or the one ``apply_moe_lora``/``load_adapter`` made for it."""
    return model if isinstance(model, PeftModel) else model.__dict__.get(_PEFT_ATTR)


@dataclass(frozen=True)
class MoELoraView:
    """One MoE-LoRA layer seen through its active adapter: ``lora_A`` (``nn.Linear``), ``lora_B``
    (the ``d_out × M·r`` weight ``[B_1 … B_M]``), ``router`` (``nn.Linear`` or None), ``r``, ``num_experts``."""

    layer: MoELoraLinear
    adapter: str

    @property
    def lora_A(self) -> nn.Linear:  # noqa: N802 (PEFT's name)
        return self.layer.lora_A[self.adapter]

    @property
    def lora_B(self) -> nn.Parameter:  # noqa: N802
        return self.layer.lora_B[self.adapter].weight

    @property
    def router(self) -> nn.Linear | None:
        return self.layer.lora_router[self.adapter] if self.adapter in self.layer.lora_router else None

    @property
    def r(self) -> int:
        return self.layer.r[self.adapter]

    @property
    def num_experts(self) -> int:
        return self.layer.num_experts[self.adapter]

    @property
    def scaling(self) -> float:
        return self.layer.scaling[self.adapter]

    @property
    def base(self) -> nn.Module:
        return self.layer.get_base_layer()

    def parameters(self) -> dict[str, nn.Parameter]:
        out = {f"lora_A.{self.adapter}.weight": self.lora_A.weight, f"lora_B.{self.adapter}.weight": self.lora_B}
        if self.router is not None:
            out[f"lora_router.{self.adapter}.weight"] = self.router.weight
        return out


def moe_lora_modules(model: nn.Module) -> dict[str, MoELoraView]:
    """MoE-LoRA layers of ``model`` (with their active adapter) by qualified name, in module order."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, MoELoraLinear):
            active = [a for a in m.active_adapters if a in m.lora_A]
            if active:
                out[name] = MoELoraView(m, active[0])
    return out


def _check_fits(model: nn.Module, config: MoELoraConfig) -> None:
    """FLoE's errors for what would otherwise fail inside PEFT (or not at all)."""
    if moe_lora_modules(model):
        raise AdapterError("model already has MoE-LoRA layers; load a fresh base model to apply a new adapter "
                           "(or add a named adapter with PeftModel.add_adapter)")
    prefix, layers = decoder_layers(model)
    chosen = list(range(len(layers))) if config.layers_to_transform is None else list(config.layers_to_transform)
    bad = [i for i in chosen if not 0 <= i < len(layers)]
    if bad:
        raise AdapterError(f"layer indices {bad} out of range: the model has {len(layers)} decoder layers (0..{len(layers) - 1})")
    if isinstance(config.target_modules, str):
        return  # a regex: PEFT matches it
    linear_leaves = sorted({n.split(".")[-1] for n, m in layers[0].named_modules() if isinstance(m, nn.Linear)})
    missing = sorted(t for t in config.target_modules if t not in linear_leaves)
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


def apply_moe_lora(model: nn.Module, config: MoELoraConfig | AdapterSettings, seed: int | None = None) -> list[str]:
    """Attach MoE-LoRA to ``model`` in place with ``peft.get_peft_model``; freeze everything else.

    ``seed``: draw the adapter's initial weights (A, router) from this seed, leaving the global
    random state untouched, so the same seed gives the same initial adapter; None draws from
    the global generator. The ``PeftModel`` is kept with ``model`` (:func:`peft_model`).
    Returns the qualified names of the wrapped modules. Raises ``AdapterError`` when a target
    name matches nothing (listing the linear modules that exist), when a layer index is out of
    range, when the rank exceeds a target's ``min(d_in, d_out)``, or when the model already
    carries MoE-LoRA.
    """
    if isinstance(config, AdapterSettings):
        config = config.to_peft()
    if isinstance(model, PeftModel):
        raise AdapterError("apply_moe_lora takes the base model; to add an adapter to a PeftModel use "
                           "model.add_adapter(name, MoELoraConfig(...))")
    _check_fits(model, config)
    modes = {n: m.training for n, m in model.named_modules()}
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        with warnings.catch_warnings():  # PEFT 0.21 asks transformers 5 a deprecated name; not the user's concern
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            wrapper = attach(model, config)  # get_peft_model, keeping the base model's name
    wrapped = list(moe_lora_modules(model))
    for name, m in model.named_modules():  # new modules start in train mode; keep the model's mode
        if isinstance(m, MoELoraLinear):
            m.train(modes.get(name, model.training))
            m.keep_router_probs = config.router_aux_loss_coef > 0
    model.__dict__[_PEFT_ATTR] = wrapper
    return wrapped


def adapter_config(model: nn.Module) -> MoELoraConfig:
    """The active adapter's config."""
    pm = peft_model(model)
    if pm is None or not isinstance(pm.peft_config.get(pm.active_adapter), MoELoraConfig):
        raise AdapterError("model has no MoE-LoRA adapter: call apply_moe_lora or load_adapter first "
                           "(or peft.get_peft_model with a floe.MoELoraConfig)")
    return pm.peft_config[pm.active_adapter]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The active adapter's live parameters (A, expert B, router) by their names in ``model``."""
    return {f"{name}.{k}": p for name, v in moe_lora_modules(model).items() for k, p in v.parameters().items()}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model: every adapter layer passes its input through the frozen base only.

    Unlike ``PeftModel.disable_adapter()`` this leaves ``requires_grad`` as it is."""
    with modules_disabled([m for m in model.modules() if isinstance(m, BaseTunerLayer)]):
        yield


@contextlib.contextmanager
def modules_disabled(mods: list[nn.Module]) -> Iterator[None]:
    """The adapter layers ``mods`` (PEFT tuner layers) pass their input through the frozen base only; restored after."""
    before = [m._disable_adapters for m in mods]
    for m in mods:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, b in zip(mods, before):
            m._disable_adapters = b


def router_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Switch-Transformer load-balancing loss averaged over layers, ``M · Σ_i f_i · P_i``.

    ``P_i`` is the mean routing probability of expert i over the tokens of the last forward,
    ``f_i`` the share of tokens whose largest weight is expert i. Equals 1 for a uniform
    router; larger when a few experts take most tokens. None when nothing was recorded.
    """
    losses = []
    for m in model.modules():
        w = getattr(m, "router_probs", None) if isinstance(m, MoELoraLinear) else None
        if w is None:
            continue
        w = w.reshape(-1, w.shape[-1])
        f = torch.bincount(w.argmax(-1), minlength=w.shape[-1]).to(w.dtype) / w.shape[0]
        losses.append(w.shape[-1] * (f * w.mean(0)).sum())
        m.router_probs = None
    return torch.stack(losses).mean() if losses else None


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Save the active adapter as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``),
    atomically. ``PeftModel.from_pretrained(base, directory)`` loads it (after ``import floe``)."""
    pm = peft_model(model)
    if pm is None:
        raise AdapterError("model has no adapter to save: call apply_moe_lora or load_adapter first")
    name = pm.active_adapter
    state = get_peft_model_state_dict(pm, adapter_name=name, **SAVE_KWARGS)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}

    def write(tmp: Path) -> None:
        pm.peft_config[name].save_pretrained(str(tmp))
        save_file(weights, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})

    atomic_dir(directory, write)
    return Path(directory)


def read_adapter_config(directory: str | os.PathLike) -> MoELoraConfig:
    """An adapter folder's config (MoE-LoRA, or plain PEFT LoRA as M = 1), with a clear error when it is not one."""
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG_NAME
    if not path.is_file():
        if (directory / OLD_CONFIG_NAME).is_file():
            raise AdapterError(f"{directory} holds an adapter in FLoE's old format ({OLD_CONFIG_NAME}); convert it "
                               f"once with: floe convert-adapter {directory} NEW_FOLDER")
        raise AdapterError(f"{directory} is not an adapter folder: {ADAPTER_CONFIG_NAME} not found")
    try:
        return MoELoraConfig.from_peft_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise AdapterError(f"{path}: invalid adapter config: {e}") from e


def load_adapter(model: nn.Module, directory: str | os.PathLike, trainable: bool = False) -> MoELoraConfig:
    """Attach (if needed) and load a saved adapter into ``model`` (a base model, or one with MoE-LoRA).

    A model without MoE-LoRA gets the saved configuration applied first (as ``apply_moe_lora``);
    a model that has one must match it. Shape or key mismatches (an adapter for another model)
    raise ``AdapterError`` naming the offending tensors, leaving the model as it was. Adapter
    weights are frozen unless ``trainable``. For a model of your own,
    ``PeftModel.from_pretrained(model, directory)`` does the same.
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
            for k in ("r", "num_experts", "lora_alpha", "use_rslora") if getattr(saved, k) != getattr(current, k)]
    if diff:
        raise AdapterError(
            f"adapter in {directory} was trained with other hyperparameters than the model's MoE-LoRA layers ("
            + "; ".join(diff) + "). Load it into a fresh base model instead."
        )


def _remove_moe_lora(model: nn.Module, requires_grad: dict[str, bool]) -> None:
    """Undo ``apply_moe_lora``: put the base linears back and restore ``requires_grad`` flags."""
    pm = model.__dict__.pop(_PEFT_ATTR, None)
    if pm is not None:
        pm.unload()
    model.__dict__.pop("peft_config", None)  # PEFT's mark on the model it adapted
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
    pm = peft_model(model)
    name = pm.active_adapter
    own = get_peft_model_state_dict(pm, adapter_name=name, **SAVE_KWARGS)
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
            v.copy_(saved[k].to(v.dtype))  # state-dict tensors share storage with the parameters
    for p in adapter_state_dict(model).values():
        p.requires_grad_(trainable)
