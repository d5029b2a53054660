"""``python -m floe.search [flags]`` runs ``floe search [flags]`` (through the one ``floe`` error handler)."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """``floe search`` with ``argv`` (default: this process's arguments)."""
    from floe.cli import main as floe_main

    return floe_main(["search", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
