"""The one exception type for bad user input: the CLI prints its message and exits with code 2, no traceback."""


class CxrFastError(Exception):
    """A problem the user can fix (bad file, bad flag, missing data); the message says what to fix."""
