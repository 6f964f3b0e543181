"""The one exception type of the data package."""

from bigjax.errors import UserError


class DataError(UserError):
    """Bad data or data config (a missing file, an empty split, an unknown field, ...): one message that names the
    path or key and what to do. The CLI prints it as `error: ...` and exits 2."""
