"""Results of existing codes: declared output files and user parsers.

A sim that cannot link simkit writes its own files. loop.yml says which file
and which columns (:class:`~orchestrator.config.OutputFile`), or names a
Python function ``module:function(run_dir) -> rows`` (looked for next to
loop.yml first). Either way the table is checked exactly as a simkit result
(:func:`~orchestrator.results.check_table`); anything missing, unreadable or
of the wrong shape raises :class:`~orchestrator.results.MalformedResult`
with one line, and the run counts as failed (and is retried) as any other.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.config import OutputFile
from orchestrator.errors import ConfigError
from orchestrator.results import MalformedResult, Table, check_table
from orchestrator.userref import import_module

Parser = Callable[[Path], Any]
PARSER_LOG = "stderr.log"
"""A raising parser's traceback is appended to the run's stderr log."""


def file_format(spec: OutputFile) -> str:
    """The format of a declared output: as given, or from the file's suffix."""
    if spec.format != "auto":
        return spec.format
    suffix = Path(spec.path).suffix.lower()
    return {".npy": "npy", ".csv": "csv"}.get(suffix, "columns")


def _load_text(path: Path, spec: OutputFile, delimiter: str | None) -> tuple[np.ndarray, list[str] | None]:
    """Numbers of a text table (and its header names for csv with named columns)."""
    names = None
    lines = path.read_text(errors="replace").splitlines()[spec.skip_rows:]
    lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if spec.columns is not None and any(isinstance(c, str) for c in spec.columns):
        if not lines:
            raise MalformedResult(f"{path}: empty; expected a header line with column names")
        names = [n.strip() for n in lines[0].split(delimiter)]
        lines = lines[1:]
    if not lines:
        raise MalformedResult(f"{path}: no data rows")
    try:
        table = np.loadtxt(lines, delimiter=delimiter, ndmin=2, dtype=np.float64)
    except ValueError as exc:
        raise MalformedResult(f"{path}: not a table of numbers: {str(exc).splitlines()[0]}") from exc
    return table, names


def _take(table: np.ndarray, columns: Sequence[int | str] | None, names: list[str] | None, path: Path) -> Table:
    if columns is None:
        return table
    index: list[int] = []
    for col in columns:
        if isinstance(col, str):
            if names is None or col not in names:
                raise MalformedResult(f"{path}: no column named {col!r} (header: {', '.join(names or [])})")
            index.append(names.index(col))
        else:
            index.append(col)
    if max(index) >= table.shape[1]:
        raise MalformedResult(f"{path}: has {table.shape[1]} columns; loop.yml takes column {max(index)} "
                              f"(0-based; columns: {list(columns)})")
    return np.ascontiguousarray(table[:, index])


def read_output(run_dir: Path, spec: OutputFile, *, ncols: int, nrows: int | None) -> Table:
    """Read and check a declared output file of one run."""
    path = run_dir / spec.path
    if not path.is_file():
        raise MalformedResult(f"{path}: no output file (the sim exited 0 without writing it)")
    fmt = file_format(spec)
    names: list[str] | None = None
    if fmt == "npy":
        try:
            table = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise MalformedResult(f"{path}: unreadable or truncated .npy: {exc}") from exc
        if table.ndim == 1:
            table = table.reshape(1, -1)
    else:
        table, names = _load_text(path, spec, "," if fmt == "csv" else None)
    if table.ndim == 2 and table.dtype != np.float64 and np.issubdtype(table.dtype, np.number):
        table = table.astype(np.float64)
    table = _take(table, spec.columns, names, path) if table.ndim == 2 else table
    return check_table(table, ncols=ncols, nrows=nrows, source=str(path))


def load_parser(ref: str, base: Path, key: str) -> Parser:
    """The function ``module:function``; a missing module or name is one ConfigError line."""
    module_name, _, func_name = ref.partition(":")
    try:
        module = import_module(module_name, [base])
    except Exception as exc:
        raise ConfigError(f"{key}: cannot import {module_name!r} (looked in {base} and on sys.path): "
                          f"{type(exc).__name__}: {exc}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(f"{key}: {module_name!r} has no function {func_name!r}")
    return func  # type: ignore[no-any-return]


def run_parser(parser: Parser, ref: str, run_dir: Path, *, ncols: int, nrows: int | None) -> Table:
    """Call a user's parser on a run directory; its failure is a MalformedResult, its traceback in the log."""
    try:
        rows = parser(run_dir)
    except Exception as exc:
        log_path = run_dir / PARSER_LOG
        with log_path.open("a") as f:
            f.write(f"\n--- parser {ref} raised:\n{traceback.format_exc()}")
        raise MalformedResult(f"parser {ref} raised {type(exc).__name__}: {exc} (traceback in {log_path})") from exc
    try:
        table = np.asarray(rows, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MalformedResult(f"parser {ref} returned something that is not a table of numbers: {exc}") from exc
    if table.ndim == 1:
        table = table.reshape(1, -1)
    return check_table(table, ncols=ncols, nrows=nrows, source=f"parser {ref} on {run_dir}")
