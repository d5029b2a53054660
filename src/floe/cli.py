"""``floe`` command line: the entry point. It registers every sub-command and holds the one error
handler they share (:func:`main`). The flags, config files and ``--set`` parsing every job command
shares are in :mod:`floe.flags`; each command lives beside the code it drives (``floe/<area>/cli.py``).
"""
from __future__ import annotations

import argparse
import os
import sys

from floe.adapters.moe_lora.convert import add_convert_parser
from floe.allocate.cli import add_allocate_parser
from floe.errors import InputError
from floe.evaluation.cli import add_eval_parser
from floe.fetch import add_fetch_parser
from floe.flags import EPILOG
from floe.pipeline.cli import add_run_parser
from floe.search.cli import add_search_parser
from floe.selection.cli import add_select_parser
from floe.train_cli import add_train_parser

# The sub-commands, in the order `floe --help` lists them (each adds its own sub-parser(s)).
COMMANDS = (add_train_parser, add_select_parser, add_search_parser, add_allocate_parser, add_fetch_parser,
            add_run_parser, add_eval_parser, add_convert_parser)


class _Parser(argparse.ArgumentParser):
    """Usage mistakes on one line (argparse prints the whole usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``floe`` parser with every sub-command of :data:`COMMANDS`."""
    parser = _Parser(
        prog="floe",
        description="FLoE: Fisher-based layer selection and sparse MoE-LoRA fine-tuning of causal LMs.",
        epilog=EPILOG,
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of input errors too (also FLOE_DEBUG=1; accepted anywhere on the line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


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


if __name__ == "__main__":  # `torchrun -m floe.cli ...` (docs/training.md); `python -m floe` is the same
    sys.exit(main())
