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


def test_accepted_rows_reads_each_new_file_once_and_a_changed_list_whole(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator import store

    for i in range(4):
        np.save(tmp_path / f"d{i}.npy", np.full((i + 1, 2), float(i)))
    loads: list[str] = []
    real_load = np.load
    monkeypatch.setattr(store.np, "load", lambda p, **kw: (loads.append(Path(p).name), real_load(p, **kw))[1])
    rows = store.AcceptedRows(tmp_path, 2)
    assert rows.read([]).shape == (0, 2)
    assert rows.read(["d0.npy", "d1.npy"])[:, 0].tolist() == [0, 1, 1]
    assert rows.read(["d0.npy", "d1.npy", "d2.npy"])[:, 0].tolist() == [0, 1, 1, 2, 2, 2]
    assert loads == ["d0.npy", "d1.npy", "d2.npy"]  # appended: only the new file read
    assert rows.read(["d1.npy", "d2.npy", "d3.npy"])[:, 0].tolist() == [1, 1, 2, 2, 2, 3, 3, 3, 3]  # a window
    assert loads[3:] == ["d1.npy", "d2.npy", "d3.npy"]
