"""Errors raised on bad input data."""

from __future__ import annotations


class DataFormatError(ValueError):
    """A source or prepared file is malformed.

    The message names the file, the 1-based line (when there is one) and the reason,
    e.g. ``ratings.csv line 17: rating 'abc' is not a number``.
    """

    def __init__(self, file: str, reason: str, line: int | None = None):
        self.file = file
        self.line = line
        self.reason = reason
        where = f"{file} line {line}" if line is not None else file
        super().__init__(f"{where}: {reason}")
