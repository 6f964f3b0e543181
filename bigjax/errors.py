"""The one base class of the errors meant for the user.

Every module's own error (ConfigError, DataError, CheckpointError, ...) derives from `UserError`, so the command
line catches this one class and prints `error: MESSAGE` (one line, exit status 2) instead of a traceback. Raise one
only where the message says what was wrong and what to do about it; a bug should stay a traceback.

This module imports nothing of bigjax, so any module can import it.
"""


class UserError(Exception):
    """A problem the user can fix (a bad config, a refused resume, a missing file): its message names the fix."""


# The OS reasons a write fails for, as the OS or a library (tensorstore) words them, and what the user can do about
# each: a failed checkpoint save and a failed metrics write give the same advice for the same reason.
_REMEDIES = (
    (("No space left on device", "File too large", "Disk quota exceeded"), "free disk space"),
    (("Permission denied", "Read-only file system", "Operation not permitted"), "make the directory writable"),
    (("Is a directory", "Not a directory", "File exists"), "move the file or directory in the way aside"),
)


def remedy(reason: str) -> str:
    """What to do about a failed write, by the OS reason found in its text (not a guess at the disk)."""
    for reasons, advice in _REMEDIES:
        if any(known in reason for known in reasons):
            return advice
    return "fix the cause above"
