"""User-facing errors.

Every mistake a user can make (a wrong path, an unknown name, a checkpoint that does not fit) raises
:class:`DaqkdError` with a one-line message that names the fix; the CLI prints it as
``daqkd: error: ...`` and exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations


class DaqkdError(Exception):
    """An error caused by the user's input, with a one-line message that says how to fix it."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first message line (at most ``limit`` characters) for a one-line error, or its
    type's name when it has no message."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
