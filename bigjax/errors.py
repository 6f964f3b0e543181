"""The one base class of the errors meant for the user.

Every module's own error (ConfigError, DataError, CheckpointError, ...) derives from `UserError`, so the command
line catches this one class and prints `error: MESSAGE` (one line, exit status 2) instead of a traceback. Raise one
only where the message says what was wrong and what to do about it; a bug should stay a traceback.

This module imports nothing of bigjax, so any module can import it.
"""


class UserError(Exception):
    """A problem the user can fix (a bad config, a refused resume, a missing file): its message names the fix."""
