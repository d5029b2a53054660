"""``python -m floe``: the same as the ``floe`` command."""
import sys

from floe.cli import main

sys.exit(main())
