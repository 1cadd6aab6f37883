"""User-facing errors.

Every mistake a user can make (a wrong path, an unknown name, a checkpoint that does not fit) raises
:class:`DaqkdError` with a one-line message that names the fix; the CLI prints it as
``daqkd: error: ...`` and exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations


class DaqkdError(Exception):
    """An error caused by the user's input, with a one-line message that says how to fix it."""
