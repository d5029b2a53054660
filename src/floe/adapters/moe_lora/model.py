"""FLoE's helpers around a PEFT model carrying MoE-LoRA (injection, saving and loading are PEFT's).

``apply_moe_lora(model, cfg)`` is ``peft.get_peft_model`` after checks with FLoE's error
messages; like it, it adapts ``model`` in place and returns the ``PeftModel``, the object to
train, save and evaluate. ``load_adapter`` is ``PeftModel.from_pretrained`` with FLoE's checks;
``save_adapter`` is ``save_pretrained`` into an atomic folder (``adapter_config.json`` +
``adapter_model.safetensors``).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from floe.adapters.moe_lora.config import MoELoraConfig
from floe.adapters.moe_lora.convert import OLD_CONFIG_NAME
from floe.adapters.moe_lora.layer import MoELoraLinear
from floe.adapters.naming import SAVE_KWARGS, attach
from floe.arch import decoder_layers, unwrapped
from floe.errors import InputError
from floe.io import atomic_dir

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterError(InputError):
    """An adapter does not fit a model, or an adapter folder is invalid."""


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
    """MoE-LoRA layers of ``model`` (with their active adapter) by qualified name in the base model (the same
    names for a ``PeftModel`` and the model it wraps), in module order."""
    out = {}
    for name, m in unwrapped(model).named_modules():
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
    linear_leaves = sorted({n.split(".")[-1] for n, m in layers[0].named_modules() if isinstance(m, nn.Linear)})
    if isinstance(config.target_modules, str):  # a regex, which PEFT full-matches against each module's name
        linear = [n for n, m in unwrapped(model).named_modules() if isinstance(m, nn.Linear)]
        try:
            found = any(re.fullmatch(config.target_modules, n) for n in linear)
        except re.error as e:
            raise AdapterError(f"target_modules {config.target_modules!r} is read as a regex and is not one: {e}") from e
        if not found:
            hint = " (a comma-separated string is one regex: give a list of names instead)" \
                if "," in config.target_modules else ""
            raise AdapterError(f"target_modules regex {config.target_modules!r} full-matches no nn.Linear module "
                               f"name{hint}; linear modules in each decoder layer: {linear_leaves}, full names "
                               f"like {linear[0]!r}")
        return
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


def apply_moe_lora(model: nn.Module, config: MoELoraConfig, seed: int | None = None) -> PeftModel:
    """``peft.get_peft_model(model, config)``: MoE-LoRA on ``model`` (adapted in place), everything else frozen.

    ``seed``: draw the adapter's initial weights (A, router) from this seed, leaving the global
    random state untouched, so the same seed gives the same initial adapter; None draws from
    the global generator. Returns the ``PeftModel``. Raises ``AdapterError`` when a target
    name matches nothing (listing the linear modules that exist), when a layer index is out of
    range, when the rank exceeds a target's ``min(d_in, d_out)``, or when the model already
    carries an adapter.
    """
    if isinstance(model, PeftModel):
        raise AdapterError("apply_moe_lora takes the base model; to add an adapter to a PeftModel use "
                           "model.add_adapter(name, MoELoraConfig(...))")
    _check_fits(model, config)
    modes = {n: m.training for n, m in model.named_modules()}
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        peft = attach(model, config)  # get_peft_model, keeping the base model's name
    _keep_modes(model, modes, config)
    return peft


def _keep_modes(model: nn.Module, modes: dict[str, bool], config: MoELoraConfig) -> None:
    """New modules start in train mode: keep the model's mode; record router weights when the aux loss is on."""
    for name, m in model.named_modules():
        if isinstance(m, MoELoraLinear):
            m.train(modes.get(name, model.training))
            m.keep_router_probs = config.router_aux_loss_coef > 0


def adapter_config(model: PeftModel) -> MoELoraConfig:
    """The active adapter's config."""
    config = model.peft_config.get(model.active_adapter) if isinstance(model, PeftModel) else None
    if not isinstance(config, MoELoraConfig):
        raise AdapterError("model has no MoE-LoRA adapter: pass the PeftModel that apply_moe_lora or load_adapter "
                           "returned (or peft.get_peft_model with a floe.MoELoraConfig)")
    return config


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The active adapter's live parameters (A, expert B, router) by their names in the base model."""
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


def save_adapter(model: PeftModel, directory: str | os.PathLike) -> Path:
    """``model.save_pretrained(directory)`` (PEFT's folder: ``adapter_config.json`` +
    ``adapter_model.safetensors``), written atomically: a failed save leaves the old folder as it was."""
    if not isinstance(model, PeftModel):
        raise AdapterError(f"save_adapter takes the PeftModel that apply_moe_lora or load_adapter returned, "
                           f"got {type(model).__name__}")
    atomic_dir(directory, lambda tmp: model.save_pretrained(str(tmp), **SAVE_KWARGS))
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


def load_adapter(model: nn.Module, directory: str | os.PathLike, trainable: bool = False) -> PeftModel:
    """``PeftModel.from_pretrained(model, directory)`` with FLoE's checks and error messages; returns the PeftModel.

    ``model`` is a base model (adapted in place, as PEFT does), or a ``PeftModel`` carrying
    MoE-LoRA of the same hyperparameters, whose adapter gets the saved weights (a resume).
    Everything is checked before a weight is loaded: an adapter that does not fit (another model,
    layer set, rank or scaling) raises ``AdapterError`` naming the offending tensors, and leaves a
    base model as it was given. Adapter weights are frozen unless ``trainable``.
    """
    directory = Path(directory)
    cfg = read_adapter_config(directory)
    saved = weight_shapes(directory / ADAPTER_WEIGHTS_NAME)
    if isinstance(model, PeftModel):
        _check_same_hyperparameters(adapter_config(model), cfg, directory)
        _check_fits_saved(model, saved, cfg, directory)
        _load_into(model, directory, trainable)
        for p in adapter_state_dict(model).values():
            p.requires_grad_(trainable)
        return model
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise AdapterError("model already has adapter layers: pass the PeftModel that apply_moe_lora or "
                           "load_adapter returned, or load into a fresh base model")
    _check_fits(model, cfg)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    cfg.inference_mode = not trainable  # PEFT's from_pretrained: frozen adapter unless trainable
    peft = attach(model, cfg)  # from_pretrained's first half (the injection), keeping the saved name
    try:
        _check_fits_saved(peft, saved, cfg, directory)
        _load_into(peft, directory, trainable)  # its second half
    except BaseException:  # leave the model as it was given
        peft.unload()
        model.__dict__.pop("peft_config", None)  # PEFT's mark on the model it adapted
        for n, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(n, p.requires_grad))
        raise
    _keep_modes(model, modes, cfg)
    return peft


def _load_into(peft: PeftModel, directory: Path, trainable: bool) -> None:
    """PEFT's ``load_adapter`` into the active adapter (the shapes are checked already)."""
    with warnings.catch_warnings():  # PEFT 0.21 asks transformers 5 a deprecated name; not the user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft.load_adapter(str(directory), adapter_name=peft.active_adapter, is_trainable=trainable,
                          torch_device=str(next(peft.parameters()).device))


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of a safetensors file, from its header (nothing is loaded); a missing,
    truncated or corrupt file is an ``AdapterError`` naming it."""
    from safetensors import safe_open

    if not path.is_file():
        raise AdapterError(f"{path} not found: the adapter folder is incomplete; copy or re-train it")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception as e:  # safetensors raises its own SafetensorError (not an OSError) for a cut file
        raise AdapterError(f"{path} is truncated or corrupt ({' '.join(str(e).split())}); "
                           "copy it again or re-train the adapter") from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (an old-format adapter, a full fine-tuning's weights), with the errors of
    :func:`weight_shapes`."""
    from safetensors.torch import load_file

    weight_shapes(path)
    return load_file(str(path))


def _check_fits_saved(peft: PeftModel, saved: dict[str, tuple[int, ...]], cfg: MoELoraConfig, directory) -> None:
    """The saved tensors must be exactly the adapter's own, shape for shape (PEFT would only warn)."""
    own = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft, **SAVE_KWARGS).items()}
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or unexpected:
        raise AdapterError(
            f"adapter in {directory} does not match the model's MoE-LoRA layers: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}. Was it trained on another model or layer set?"
        )
    wrong = [f"{k}: saved {saved[k]} vs model {v}" for k, v in own.items() if v != saved[k]]
    if wrong:
        raise AdapterError(f"adapter in {directory} has shapes that do not fit this model (trained on "
                           f"{cfg.base_model_name_or_path!r}?): " + "; ".join(wrong[:5]))


def _check_same_hyperparameters(current: MoELoraConfig, saved: MoELoraConfig, directory) -> None:
    """Weights of equal shape but another alpha would silently change the output: refuse."""
    diff = [f"{k}: saved {getattr(saved, k)!r} vs model {getattr(current, k)!r}"
            for k in ("r", "num_experts", "lora_alpha", "use_rslora") if getattr(saved, k) != getattr(current, k)]
    if diff:
        raise AdapterError(
            f"adapter in {directory} was trained with other hyperparameters than the model's MoE-LoRA layers ("
            + "; ".join(diff) + "). Load it into a fresh base model instead."
        )
