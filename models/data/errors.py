"""Errors raised on bad or missing input data: each message is one line that names what is wrong
(file, line or row, column) and, where there is one, its fix."""

from __future__ import annotations


class DataError(Exception):
    """Input data that is malformed, missing or cannot be fetched; command lines print the message
    as one line, without a traceback."""


class DataFormatError(DataError, ValueError):
    """A source or prepared file is malformed.

    The message names the file, the 1-based line (text files) or row (Parquet) when there is one,
    the column when there is one, and the reason, e.g. ``ratings.csv line 17: rating 'abc' is not
    a number`` or ``events.parquet row 3, column 'timestamp': -5 is before 1970``.
    """

    def __init__(
        self, file: str, reason: str, line: int | None = None, *, row: int | None = None, column: str | None = None
    ):
        self.file = file
        self.line = line
        self.row = row
        self.column = column
        self.reason = reason
        where = file
        if line is not None:
            where += f" line {line}"
        elif row is not None:
            where += f" row {row}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):
        # Picklable with its fields (the default pickles the message alone, which __init__ cannot take
        # back): a check that fails in a Ray task reaches the driver as this error, not a wrapper.
        return (_format_error, (type(self), self.file, self.reason, self.line, self.row, self.column))


def _format_error(cls, file: str, reason: str, line: int | None, row: int | None, column: str | None):
    return cls(file, reason, line, row=row, column=column)


class DataSourceError(DataError, ValueError):
    """A dataset that cannot be found or read where it was asked for (a missing folder, a needed
    option not given); the message says how to get it."""
