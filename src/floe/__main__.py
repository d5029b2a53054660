"""``python -m floe``: the same as the ``floe`` command."""
import sys

from floe.cli import main

if __name__ == "__main__":
    sys.exit(main())
