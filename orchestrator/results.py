"""Reading and checking what a simulation returned.

A sim's table is accepted only if it is a finite float64 2-D array of the
expected column count (and row count, where known). Anything else raises
:class:`MalformedResult`, whose message names the path and what was wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray

Table = NDArray[np.float64]


class MalformedResult(Exception):
    """A sim's output exists but is not a valid table (or does not exist)."""

    def __init__(self, message: str, *, columns: int | None = None) -> None:
        super().__init__(message)
        self.columns = columns
        """The column count the sim returned, when that count was what was wrong."""


def check_table(table: np.ndarray, *, ncols: int, nrows: int | None = None, source: str = "result") -> Table:
    """Validate shape and values; return the table as float64."""
    if table.ndim != 2:
        raise MalformedResult(f"{source}: expected a 2-D table, got {table.ndim}-D with shape {table.shape}")
    if table.shape[1] != ncols:
        raise MalformedResult(f"{source}: expected {ncols} columns, got {table.shape[1]} (shape {table.shape})",
                              columns=int(table.shape[1]))
    if nrows is not None and table.shape[0] != nrows:
        raise MalformedResult(f"{source}: expected {nrows} rows, got {table.shape[0]}")
    if table.dtype != np.float64:
        raise MalformedResult(f"{source}: expected float64 values, got {table.dtype}")
    bad = ~np.isfinite(table)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise MalformedResult(
            f"{source}: {int(bad.sum())} non-finite value(s), first at row {row}, column {col}: {table[row, col]}"
        )
    return table


def read_table(path: Path, *, ncols: int, nrows: int | None = None) -> Table:
    """Load an .npy result written by simkit and validate it."""
    if not path.exists():
        raise MalformedResult(f"{path}: no result file (the sim exited without writing --out)")
    try:
        table = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        size = path.stat().st_size
        raise MalformedResult(f"{path}: unreadable or truncated .npy ({size} bytes): {exc}") from exc
    return check_table(table, ncols=ncols, nrows=nrows, source=str(path))
