"""The one exception type for errors a user can fix.

Everything below the CLI raises `UserError` for bad input (a malformed file, an
impossible config, a wrong flag); the CLI prints its one-line message and exits 2.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem with the user's input, described in one line.

    The message reads `file:line: field: what is wrong`, with the parts that are known.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ):
        self.file, self.line, self.field, self.detail = file, line, field, message
        where = ""
        if file is not None:
            where = f"{file}:{line}: " if line is not None else f"{file}: "
        if field is not None:
            where += f"{field}: "
        super().__init__(where + message)
