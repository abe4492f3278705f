"""The one base class of expected user errors.

An exception that derives from :class:`UserError` is something the user can fix (a bad
config value, a missing data file, a checkpoint that is not there): the command line prints
its message as one line on stderr and exits with code 2. Anything else is a bug and keeps its
traceback. ``moetrain --debug ...`` shows the traceback of user errors too.

Library error classes mix it in (``class DataError(UserError, ValueError)``), so library code
raises its own, specific exceptions and never imports the command line.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """An error in what the user asked for: printed as one line, exit code 2."""
