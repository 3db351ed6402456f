"""simkit output reading: good, truncated, NaN/Inf, wrong shape, missing — real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from orchestrator.results import MalformedResult, read_table


def save(tmp_path: Path, arr: np.ndarray) -> Path:
    path = tmp_path / "result.npy"
    np.save(path, arr)
    return path


def test_good_table(tmp_path: Path) -> None:
    arr = np.arange(8, dtype=np.float64).reshape(4, 2)
    assert np.array_equal(read_table(save(tmp_path, arr), ncols=2, nrows=4), arr)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MalformedResult, match="no result file"):
        read_table(tmp_path / "result.npy", ncols=2)


def test_truncated_file(tmp_path: Path) -> None:
    path = save(tmp_path, np.ones((100, 2)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MalformedResult, match="truncated"):
        read_table(path, ncols=2)


def test_header_only_garbage(tmp_path: Path) -> None:
    path = tmp_path / "result.npy"
    path.write_bytes(b"not an npy file at all")
    with pytest.raises(MalformedResult, match="unreadable or truncated"):
        read_table(path, ncols=2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite(tmp_path: Path, bad: float) -> None:
    arr = np.zeros((5, 2))
    arr[3, 1] = bad
    with pytest.raises(MalformedResult, match=r"1 non-finite value\(s\), first at row 3, column 1"):
        read_table(save(tmp_path, arr), ncols=2)


def test_wrong_columns(tmp_path: Path) -> None:
    with pytest.raises(MalformedResult, match="expected 2 columns, got 3"):
        read_table(save(tmp_path, np.zeros((4, 3))), ncols=2)


def test_wrong_rows(tmp_path: Path) -> None:
    with pytest.raises(MalformedResult, match="expected 1 rows, got 2"):
        read_table(save(tmp_path, np.zeros((2, 2))), ncols=2, nrows=1)


def test_wrong_ndim(tmp_path: Path) -> None:
    with pytest.raises(MalformedResult, match="expected a 2-D table, got 1-D"):
        read_table(save(tmp_path, np.zeros(4)), ncols=2)


def test_wrong_dtype(tmp_path: Path) -> None:
    with pytest.raises(MalformedResult, match="expected float64 values, got float32"):
        read_table(save(tmp_path, np.zeros((2, 2), dtype=np.float32)), ncols=2)
