"""The one exception type for user mistakes.

Every input error (a bad config value, a malformed data line, a missing model or file, a
truncated adapter) is an :class:`InputError` or a subclass: the command line prints its
message on one line and exits 2, without a traceback (``--debug`` or ``FLOE_DEBUG=1``
shows it). Anything else is a bug and keeps its traceback. Messages say what was wrong,
where, and how to fix it.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad user input: the message names what, where, and how to fix it."""
