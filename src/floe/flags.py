"""What every ``floe`` job command shares: its flags, ``--config``/``--set``/``--print-config``,
and the way a job dataclass is built from a YAML file, flags and ``--set`` (in that order).

A job command declares a flag table, ``flag → (dotted config key, argparse kwargs)``, registers
itself with :func:`add_job_command` and builds its job with :func:`job_from_args`. Flags that
mean the same key in several commands are declared once here (:data:`SHARED_FLAGS`).
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

from floe.config import ConfigError, from_dict, load_yaml, merge, renamed_keys

FlagTable = dict[str, tuple[str, dict[str, Any]]]
"""flag (aliases separated by spaces, e.g. ``"--output -o"``) → (dotted config key, argparse kwargs)."""

EPILOG = """Every job reads one YAML file (--config) whose keys mirror the dataclasses of the Python
API; command-line flags override it, and --set a.b=value overrides any key. `floe train
--print-config` prints every key with its value (the defaults, or as the file, flags and --set
resolve it) and a one-line description."""


def parse_names(text: str) -> list[str]:
    """'gate_proj, up_proj' → ['gate_proj', 'up_proj'] (a list: PEFT reads a single string as a regex)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated module names like 'gate_proj,up_proj', got {text!r}")
    return names


def parse_layers(text: str) -> list[int] | None:
    """'all' → None; '0,3,5-7' → [0, 3, 5, 6, 7]. Empty text, empty parts and empty ranges are errors."""
    expected = "'all' or layer indices like '0,3,5-7' (ranges ascending)"
    if text.strip().lower() == "all":
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            a, dash, b = part.strip().partition("-")
            lo, hi = int(a), int(b) if dash else int(a)
            if lo < 0 or hi < lo:
                raise ValueError
            out += range(lo, hi + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    return sorted(set(out))


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{k}' is not a section")
    node[keys[-1]] = value


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[x, y]"]`` → ``{"a": {"b": 1}, "c": ["x", "y"]}`` (values read as YAML)."""
    import yaml

    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key.path=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw))
    return tree


# Flags that mean the same config key in more than one command (a declared table of flags).
SHARED_FLAGS: FlagTable = {
    "--model": ("model.name", dict(help="built-in name (smollm2-135m), local folder or hub id")),
    "--dtype": ("model.dtype", dict(help="float32 | bfloat16 | float16 | auto")),
    "--data": ("data.source", dict(help="bigbench:natural_instructions, bigbench:<task>, a JSON/JSONL file or dataset folder")),
    "--max-length": ("data.max_length", dict(type=int, help="longest tokenised example")),
    "--fraction": ("data.fraction", dict(type=float, help="share of the training split to use (the paper's warm-up sample: 0.5)")),
    "--max-train-examples": ("data.max_train_examples", dict(type=int, help="cap on training examples")),
    "--max-eval-examples": ("data.max_eval_examples", dict(type=int, help="cap on validation examples")),
    "--layers": ("adapter.layers_to_transform", dict(type=parse_layers, help="decoder layers to adapt: 'all' or e.g. '0,3,5-7'")),
    "--r": ("adapter.r", dict(type=int, help="LoRA rank")),
    "--experts": ("adapter.num_experts", dict(type=int, help="number of expert B matrices (1 = plain LoRA)")),
    "--alpha": ("adapter.lora_alpha", dict(type=float, help="LoRA alpha (scaling alpha/r)")),
    "--targets": ("adapter.target_modules", dict(type=parse_names,
                                                 help="comma-separated module names, e.g. gate_proj,up_proj,down_proj")),
    "--steps": ("train.max_steps", dict(type=int, help="optimizer steps")),
    "--batch-size": ("train.batch_size", dict(type=int, help="examples per device per step")),
    "--lr": ("train.learning_rate", dict(type=float, help="peak learning rate")),
}


def shared(*flags: str, **helps: str) -> FlagTable:
    """The named :data:`SHARED_FLAGS`; ``helps`` rewords some (keyword: the flag without dashes,
    ``-`` as ``_``, e.g. ``steps="training steps per trial"``)."""
    out: FlagTable = {}
    for flag in flags:
        key, kw = SHARED_FLAGS[flag]
        text = helps.get(flag.lstrip("-").replace("-", "_"))
        out[flag] = (key, {**kw, "help": text} if text else kw)
    return out


COMMON_FLAGS: FlagTable = shared("--model", "--dtype", "--data", "--max-length")
"""The flags of every job command: which model, which data, how long an example may be."""


def add_job_flags(p: argparse.ArgumentParser, flags: FlagTable) -> None:
    """``--config``, ``--set``, ``--print-config`` and the flags of ``flags`` (defaults suppressed, so
    that :func:`job_from_args` knows which ones the user gave)."""
    p.add_argument("--config", "-c", help="YAML config file (flags override it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set train.warmup_ratio=0.1 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print every config key as resolved (defaults, file, flags, --set) with its description, then exit")
    for flag, (key, kw) in flags.items():
        names = flag.split()
        if not {"action", "choices", "metavar"} & set(kw):  # usage says --budget-rank BUDGET_RANK, not the dest
            kw = {**kw, "metavar": names[0].lstrip("-").replace("-", "_").upper()}
        p.add_argument(*names, dest=key.replace(".", "__"), default=argparse.SUPPRESS, **kw)


def add_job_command(subparsers, name: str, flags: FlagTable, func: Callable[[argparse.Namespace], int], *,
                    help: str, description: str, epilog: str = EPILOG, **kwargs: Any) -> argparse.ArgumentParser:
    """Register ``floe <name>``: a sub-parser with the job flags of ``flags``, run by ``func(args)``."""
    p = subparsers.add_parser(name, help=help, description=description, epilog=epilog, **kwargs)
    add_job_flags(p, flags)
    p.set_defaults(func=func)
    return p


def config_tree(args: argparse.Namespace, flags: FlagTable, other_commands_sections: tuple[str, ...] = (),
                moved_keys: dict[str, str] | None = None, cls: type | None = None) -> dict[str, Any]:
    """The config tree of a job: ``--config``, then the flags the user gave, then ``--set``.

    ``other_commands_sections``: top-level sections of a shared config file that belong to other
    commands (e.g. ``train`` for ``floe select``) and are ignored here. ``moved_keys``: older
    dotted keys of the file → the keys they now live at (the older spelling keeps working).
    ``cls``: the job class, whose renamed keys (``RENAMED``) are read under their new names in
    the file and in ``--set`` before the flags go on top, so a flag wins over an old-named key.
    """
    tree: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for section in other_commands_sections:
        tree.pop(section, None)
    for old, new in (moved_keys or {}).items():
        section, _, key = old.rpartition(".")
        node = tree.get(section) if section else tree
        if isinstance(node, dict) and key in node:
            _set_path(tree, new, node.pop(key))
    given = parse_set(args.set)
    if cls is not None:
        tree, given = renamed_keys(cls, tree), renamed_keys(cls, given)
    for key, _ in flags.values():
        dest = key.replace(".", "__")
        if hasattr(args, dest):  # flags the user gave (defaults are suppressed)
            _set_path(tree, key, getattr(args, dest))
    return merge(tree, given)


def job_from_args(cls: type, args: argparse.Namespace, flags: FlagTable, other_commands_sections: tuple[str, ...] = (),
                  moved_keys: dict[str, str] | None = None):
    """Build job dataclass ``cls`` from :func:`config_tree` (bad keys and values: ``ConfigError``)."""
    return from_dict(cls, config_tree(args, flags, other_commands_sections, moved_keys, cls))
