"""The data package's user-facing error."""


class DataError(RuntimeError):
    """Missing, corrupt or mis-specified data; the message is one line that says what to do."""
