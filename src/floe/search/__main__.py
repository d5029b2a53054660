"""``python -m floe.search [flags]`` runs ``floe search [flags]``."""
import sys

from floe.search.cli import main

sys.exit(main())
