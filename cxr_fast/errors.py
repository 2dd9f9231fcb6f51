"""The error types at the bottom of the package.

`CxrFastError`: bad user input; the CLI prints its message and exits with code 2, no traceback. `BadInput`: one input
image that cannot be used, with the file and the reason (one bad input is one skipped entry or one error row).
"""

from __future__ import annotations

from pathlib import Path


class CxrFastError(Exception):
    """A problem the user can fix (bad file, bad flag, missing data); the message says what to fix."""


class BadInput(Exception):
    """An input image that cannot be read; carries the file and the reason."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason

    def __reduce__(self):  # exceptions cross the process pool by pickle; the default would lose `reason`
        return BadInput, (self.path, self.reason)
