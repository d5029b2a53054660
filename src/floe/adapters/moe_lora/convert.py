"""``floe convert-adapter OLD NEW``: turn an adapter folder of FLoE's own early format
(``floe_adapter_config.json`` + ``floe_adapter.safetensors``) into a PEFT adapter folder.

Old tensors per wrapped module ``<m>``: ``<m>.lora_A.weight`` (r × d_in), ``<m>.lora_B``
(M × d_out × r), ``<m>.router.weight`` (M × d_in). New (PEFT's names):
``base_model.model.<m>.lora_A.weight``, ``….lora_B.weight`` = ``[B_1 … B_M]`` (d_out × M·r),
``….lora_router.weight``. The computed function is unchanged.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

OLD_CONFIG_NAME = "floe_adapter_config.json"
OLD_WEIGHTS_NAME = "floe_adapter.safetensors"


def convert_adapter(old: str | os.PathLike, new: str | os.PathLike) -> Path:
    """Write the PEFT folder ``new`` for the old-format adapter folder ``old`` (left untouched)."""
    from safetensors.torch import save_file  # imported here: building the CLI parser stays cheap

    from floe.adapters.moe_lora.config import RENAMED, MoELoraConfig
    from floe.adapters.moe_lora.model import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, AdapterError, read_weights
    from floe.io import atomic_dir

    old, new = Path(old), Path(new)
    if not (old / OLD_CONFIG_NAME).is_file():
        hint = " (it already is a PEFT adapter folder)" if (old / ADAPTER_CONFIG_NAME).is_file() else ""
        raise AdapterError(f"{old} is not an old-format FLoE adapter folder: {OLD_CONFIG_NAME} not found{hint}")
    if new.resolve() == old.resolve():
        raise AdapterError("convert-adapter writes a new folder: give NEW different from OLD")
    try:
        meta = json.loads((old / OLD_CONFIG_NAME).read_text())
        meta = {k: v for k, v in meta.items() if k not in ("format", "floe_version")}
        config = MoELoraConfig(**{RENAMED.get(k, k): v for k, v in meta.items()})
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise AdapterError(f"{old / OLD_CONFIG_NAME}: invalid adapter config: {e}") from e
    saved = read_weights(old / OLD_WEIGHTS_NAME)
    weights = {}
    for key, t in saved.items():
        if key.endswith(".lora_A.weight"):
            weights[f"base_model.model.{key}"] = t
        elif key.endswith(".lora_B"):
            m, d_out, r = t.shape
            weights[f"base_model.model.{key[:-len('.lora_B')]}.lora_B.weight"] = t.permute(1, 0, 2).reshape(d_out, m * r)
        elif key.endswith(".router.weight"):
            weights[f"base_model.model.{key[:-len('.router.weight')]}.lora_router.weight"] = t
        else:
            raise AdapterError(f"{old / OLD_WEIGHTS_NAME}: unexpected tensor {key!r}")

    def write(tmp: Path) -> None:
        config.save_pretrained(str(tmp))
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / ADAPTER_WEIGHTS_NAME),
                  metadata={"format": "pt"})

    atomic_dir(new, write)
    return new


def add_convert_parser(sub) -> None:
    p = sub.add_parser("convert-adapter", help="convert an old-format FLoE adapter folder to a PEFT adapter folder",
                       description="Convert an adapter folder of FLoE's old format (floe_adapter_config.json + "
                                   "floe_adapter.safetensors) into a PEFT adapter folder (adapter_config.json + "
                                   "adapter_model.safetensors) that PeftModel.from_pretrained loads after `import floe`.")
    p.add_argument("old", help="old-format adapter folder (read only)")
    p.add_argument("new", help="folder to write (replaced if it exists)")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args) -> int:
    out = convert_adapter(args.old, args.new)
    print(f"[floe] wrote PEFT adapter {out} (adapter_config.json, adapter_model.safetensors)")
    return 0
