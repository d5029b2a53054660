"""``floe`` command line: a thin layer over the Python API (``floe.jobs`` and friends)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from floe.config import ConfigError, describe, from_dict, load_yaml, merge
from floe.errors import InputError

EPILOG = """Every job reads one YAML file (--config) whose keys mirror the dataclasses of the Python
API; command-line flags override it, and --set a.b=value overrides any key. `floe train
--print-config` prints every key with its default and a one-line description."""


def _layers(text: str) -> list[int] | None:
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


def _parse_set(items: list[str]) -> dict[str, Any]:
    import yaml

    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key.path=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw))
    return tree


# flag → (dotted config key, argparse kwargs). COMMON_FLAGS are shared by every job command.
COMMON_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--model": ("model.name", dict(help="built-in name (smollm2-135m), local folder or hub id")),
    "--dtype": ("model.dtype", dict(help="float32 | bfloat16 | float16 | auto")),
    "--data": ("data.source", dict(help="bigbench:natural_instructions, bigbench:<task>, a JSON/JSONL file or dataset folder")),
    "--max-length": ("data.max_length", dict(type=int, help="longest tokenised example")),
}

TRAIN_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    **COMMON_FLAGS,
    "--max-train-examples": ("data.max_train_examples", dict(type=int, help="cap on training examples")),
    "--max-eval-examples": ("data.max_eval_examples", dict(type=int, help="cap on validation examples")),
    "--fraction": ("data.fraction", dict(type=float, help="share of the training split to use (warm-up: 0.5)")),
    "--layers": ("adapter.layers", dict(type=_layers, help="decoder layers to adapt: 'all' or e.g. '0,3,5-7'")),
    "--r": ("adapter.r", dict(type=int, help="LoRA rank")),
    "--experts": ("adapter.num_experts", dict(type=int, help="number of expert B matrices (1 = plain LoRA)")),
    "--alpha": ("adapter.alpha", dict(type=float, help="LoRA alpha (scaling alpha/r)")),
    "--dropout": ("adapter.dropout", dict(type=float, help="adapter input dropout")),
    "--targets": ("adapter.target_modules", dict(help="comma-separated module names, e.g. gate_proj,up_proj,down_proj")),
    "--steps": ("train.max_steps", dict(type=int, help="optimizer steps (overrides --epochs)")),
    "--epochs": ("train.num_epochs", dict(type=float, help="passes over the training data")),
    "--batch-size": ("train.batch_size", dict(type=int, help="examples per device per step")),
    "--grad-accum": ("train.gradient_accumulation_steps", dict(type=int, help="gradient accumulation steps")),
    "--lr": ("train.learning_rate", dict(type=float, help="peak learning rate")),
    "--seed": ("train.seed", dict(type=int, help="random seed")),
    "--output-dir": ("train.output_dir", dict(help="where checkpoints, logs and the adapter go")),
    "--eval-steps": ("train.eval_steps", dict(type=int, help="evaluate every N steps (0: start and end only)")),
}


def add_job_flags(p: argparse.ArgumentParser, flags: dict[str, tuple[str, dict[str, Any]]]) -> None:
    p.add_argument("--config", "-c", help="YAML config file (flags override it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set train.warmup_ratio=0.1 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print every config key with default and description, then exit")
    for flag, (key, kw) in flags.items():
        p.add_argument(flag, dest=key.replace(".", "__"), default=argparse.SUPPRESS, **kw)


def job_from_args(cls: type, args: argparse.Namespace, flags: dict[str, tuple[str, dict[str, Any]]],
                  other_commands_sections: tuple[str, ...] = ()):
    """Config tree from --config, then flags, then --set; build ``cls`` from it.

    ``other_commands_sections``: top-level sections of a shared config file that belong to
    other commands (e.g. ``train`` for ``floe select``) and are ignored here.
    """
    tree: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for section in other_commands_sections:
        tree.pop(section, None)
    for flag, (key, _) in flags.items():
        dest = key.replace(".", "__")
        if hasattr(args, dest):  # flags the user gave (defaults are suppressed)
            _set_path(tree, key, getattr(args, dest))
    tree = merge(tree, _parse_set(args.set))
    return from_dict(cls, tree)


def _cmd_train(args: argparse.Namespace) -> int:
    from floe.jobs import TrainJob, run_train

    if args.print_config:
        print("\n".join(describe(TrainJob)))
        return 0
    job = job_from_args(TrainJob, args, TRAIN_FLAGS)
    if args.__dict__.get("bf16"):
        job.train.bf16 = True
    if args.__dict__.get("export_peft"):
        job.export_peft = True
    if args.__dict__.get("overwrite"):
        job.train.overwrite = True
    run_train(job)
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage mistakes on one line (argparse prints the whole usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="floe",
        description="FLoE: Fisher-based layer selection and sparse MoE-LoRA fine-tuning of causal LMs.",
        epilog=EPILOG,
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of input errors too (also FLOE_DEBUG=1; accepted anywhere on the line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("train", help="fine-tune MoE-LoRA adapters on chosen layers",
                       description="Fine-tune a causal LM with MoE-LoRA adapters on a chosen set of decoder layers, "
                                   "save the adapter (and optionally export a PEFT LoRA adapter).", epilog=EPILOG)
    add_job_flags(p, TRAIN_FLAGS)
    p.add_argument("--bf16", action="store_true", help="train under bfloat16 autocast")
    p.add_argument("--export-peft", action="store_true", help="also write a PEFT LoRA adapter (needs --experts 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an earlier run in --output-dir (checkpoints, adapter, metrics) and start afresh")
    p.set_defaults(func=_cmd_train)
    for module, adder in (("floe.selection.cli", "add_select_parser"), ("floe.search.cli", "add_search_parser"),
                          ("floe.allocate.cli", "add_allocate_parser"), ("floe.fetch", "add_fetch_parser"),
                          ("floe.pipeline.cli", "add_run_parser"),
                          ("floe.evaluation.cli", "add_eval_parser"),
                          ("floe.adapters.moe_lora.convert", "add_convert_parser")):
        _maybe_add(sub, module, adder)
    return parser


def _maybe_add(sub, module: str, adder: str) -> None:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return  # subcommand not installed in this build
        raise
    getattr(mod, adder)(sub)


def is_input_error(err: BaseException) -> bool:
    """User mistakes (bad config, data, paths, adapters): one line, exit 2. Anything else is a bug."""
    return isinstance(err, (InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError))


def main(argv: list[str] | None = None) -> int:
    """Run one ``floe`` command: the one error path every sub-command shares.

    An input error prints ``floe <command>: error: <what, where, how to fix>`` on one line and
    exits 2; ``--debug`` (anywhere on the line) or ``FLOE_DEBUG=1`` shows its traceback.
    Bugs keep their traceback.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FLOE_DEBUG", "0") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        if debug or not is_input_error(e):
            raise
        print(f"floe {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
