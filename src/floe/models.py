"""Loading causal LMs: built-in names, local folders and Hugging Face hub ids.

``load_model`` is offline by default (it sets ``HF_HUB_OFFLINE=1``); pass
``online=True`` or set ``FLOE_ONLINE=1`` to let transformers reach the hub. Built-in
names (``smollm2-135m``, the default) are models shipped inside pinned PyPI wheels and
converted once into the cache: see :mod:`floe.builtin_models`.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers

from floe.builtin_models import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    ModelUnavailableError,
    _unknown_name_error,
    ensure_builtin,
)
from floe.cache import remember_user_hub_offline
from floe.errors import InputError

__all__ = ["load_model", "load_tokenizer", "parse_dtype"]  # the built-in registry is floe.builtin_models

# ----------------------------------------------------------------------------- dtype

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """Normalise a dtype spelling to a ``torch.dtype``, or the string ``"auto"``.

    Accepts ``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``
    (case-insensitive, optional ``torch.`` prefix), ``auto`` (the checkpoint's
    own dtype), a floating ``torch.dtype``, or ``None`` (float32).
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise InputError(f"dtype must be a floating-point type, got {dtype}.")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key == "auto":
            return "auto"
        if key in _DTYPES:
            return _DTYPES[key]
    raise InputError(
        f"unknown dtype {dtype!r}. Use one of: float32 (fp32), bfloat16 (bf16), float16 (fp16), "
        f"auto, or a torch.dtype."
    )


# ----------------------------------------------------------------------------- online / offline

def _resolve_online(online: bool | None) -> bool:
    if online is not None:
        return bool(online)
    return os.environ.get("FLOE_ONLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _apply_offline_mode(online: bool) -> None:
    """Offline unless the caller opted in (the opt-in wins over an inherited HF_HUB_OFFLINE).

    The env vars cover subprocesses; huggingface_hub reads HF_HUB_OFFLINE once, at import,
    so its module constant is set too for this process.
    """
    import huggingface_hub.constants as hub_constants

    remember_user_hub_offline()  # the user's own HF_HUB_OFFLINE still turns pip downloads off
    flag = "0" if online else "1"
    os.environ["HF_HUB_OFFLINE"] = flag
    os.environ["TRANSFORMERS_OFFLINE"] = flag
    hub_constants.HF_HUB_OFFLINE = not online


# ----------------------------------------------------------------------------- public API

def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
    online: bool | None = None,
    trust_remote_code: bool = False,
) -> tuple[transformers.PreTrainedModel, Any]:
    """Load a causal LM and its tokenizer, in eval mode.

    ``name_or_path`` is a built-in name (see ``BUILTIN_MODELS``), a local folder
    written by ``save_pretrained``, or a hub id (``owner/name``; offline it must
    already be in the Hugging Face cache). ``device``: ``None`` keeps the model on
    CPU, ``"auto"`` picks CUDA when available. The tokenizer always has a pad
    token (falling back to EOS) and keeps the checkpoint's chat template.
    Raises ``ModelUnavailableError`` with a fix when the model cannot be had.
    """
    torch_dtype = parse_dtype(dtype)
    source, online, kwargs = _prepare(name_or_path, online, trust_remote_code)
    try:
        # adapter_kwargs: transformers 5.23 does not pass local_files_only on to its PEFT-adapter lookup.
        model = transformers.AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, adapter_kwargs={"local_files_only": not online}, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as err:
        raise _load_error(str(name_or_path), source, online, err) from err
    _ensure_pad_token(model, tokenizer)
    if device is not None:
        model.to(_resolve_device(device))
    model.eval()
    return model, tokenizer


def load_tokenizer(name_or_path: str = DEFAULT_MODEL, online: bool | None = None,
                   trust_remote_code: bool = False) -> tuple[Any, Any]:
    """The tokenizer (with a pad token, as :func:`load_model` gives it) and the transformers config of a
    model, without loading its weights: what a job needs before its first stage that runs the model."""
    source, online, kwargs = _prepare(name_or_path, online, trust_remote_code)
    try:
        config = transformers.AutoConfig.from_pretrained(source, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as err:
        raise _load_error(str(name_or_path), source, online, err) from err
    _ensure_pad_token(None, tokenizer)
    return tokenizer, config


# ----------------------------------------------------------------------------- resolution

def _prepare(name_or_path: str, online: bool | None, trust_remote_code: bool) -> tuple[str, bool, dict[str, Any]]:
    """(what ``from_pretrained`` takes, whether the hub may be reached, its keyword arguments); sets the
    offline mode."""
    online = _resolve_online(online)
    _apply_offline_mode(online)
    source = _resolve_source(str(name_or_path), online)
    return source, online, {"trust_remote_code": trust_remote_code, "local_files_only": not online}


def _looks_like_path(name: str) -> bool:
    """True for names only a filesystem path could mean; "owner/name" stays a hub id."""
    return (
        name.startswith((".", "/", "~", "\\")) or "\\" in name or name.count("/") > 1
        or (len(name) > 1 and name[1] == ":")  # Windows drive letter
    )


def _resolve_source(name: str, online: bool) -> str:
    """Map a built-in name / folder / hub id to what ``from_pretrained`` takes."""
    if name in BUILTIN_MODELS:
        return str(ensure_builtin(name))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelUnavailableError(
                f"{path} is a file, not a model folder. Fix: pass the folder that holds config.json "
                f"and the weights (as written by save_pretrained)."
            )
        if not (path / "config.json").is_file():
            raise ModelUnavailableError(
                f"{path} is not a Hugging Face model folder: it has no config.json. Fix: pass the "
                f"folder written by model.save_pretrained(...) (config.json + *.safetensors + tokenizer)."
            )
        return str(path)
    if _looks_like_path(name):
        raise ModelUnavailableError(
            f"local model folder {str(path)!r} does not exist. Fix: check the path, pass a local "
            f"folder saved with save_pretrained, or a built-in name ({', '.join(sorted(BUILTIN_MODELS))})."
        )
    return name  # a hub id (or a bare name that may be a legacy hub id)


def _load_error(name: str, source: str, online: bool, err: Exception) -> ModelUnavailableError:
    if Path(source).is_dir():
        return ModelUnavailableError(
            f"could not load the model folder {source}: {err}. Fix: make sure it was written by "
            f"save_pretrained and holds the weights and tokenizer files."
        )
    if "/" not in name:
        return _unknown_name_error(name)
    if not online:
        return ModelUnavailableError(
            f"hub model {name!r} is not in the local Hugging Face cache, and FLoE is offline by "
            f"default (HF_HUB_OFFLINE=1). Fix: set FLOE_ONLINE=1 (or pass online=True) to allow "
            f"the hub, or pass a local folder saved with save_pretrained."
        )
    return ModelUnavailableError(
        f"could not fetch hub model {name!r}: {err}. Fix: check the id and your network access to "
        f"the Hugging Face hub (HF_HUB_OFFLINE must not be set when Python starts), or pass a local folder."
    )


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _ensure_pad_token(model: transformers.PreTrainedModel | None, tokenizer: Any) -> None:
    """Give the tokenizer a pad token (EOS when it has none) and tell the model (when given) its id."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            warnings.warn("the tokenizer has neither a pad nor an EOS token; batched padding will fail.")
            return
        tokenizer.pad_token = tokenizer.eos_token
    if model is None:
        return
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id


