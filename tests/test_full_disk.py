"""A real full disk in the middle of a real campaign: the run dir sits on a small tmpfs, which the
test fills once the first data file is in. The coordinator must end with one line naming the
full disk and what to do (exit 75, resumable), leave no temporary file and no torn
state.json or events.jsonl, and, once space is freed, `--resume` must finish with every row
accounted for."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.errors import ExitCode
from tests.conftest import REPO, fast_loop, pids_of, write_loop
from tests.fault_chain import run_dirs, start, wait_for_event

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")]

DISK_MB = 64


def fill(disk: Path) -> Path:
    """Write a file until the disk says ENOSPC; what is left is (almost) nothing."""
    filler = disk / "filler"
    chunk = b"\0" * (1 << 20)
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    small = chunk[:4096]
    with filler.open("ab", buffering=0) as f:  # the last partial pages too
        try:
            while True:
                f.write(small)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def rows_on_disk(run_dir: Path) -> int:
    """Generate rows on disk (check rows, data/check-N.npy, are counted apart)."""
    return sum(int(np.load(f).shape[0]) for f in (run_dir / "data").glob("generate-*.npy"))


def stray_files(run_dir: Path) -> list[str]:
    """Temporary files (ours: .NAME.tmp.PID, .NAME.tmp, .NAME.cap) and empty data files."""
    out = [str(p) for p in run_dir.rglob(".*") if ".tmp" in p.name or p.name.endswith(".cap")]
    out += [str(p) for p in (run_dir / "data").glob("*") if p.stat().st_size == 0]
    return out


def test_full_disk_mid_campaign_stops_resumably_and_resume_finishes(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m,mode=0700", "tmpfs", str(disk)], check=True)
    try:
        cfg = fast_loop(**{"target.successes": 2})
        loop = write_loop(tmp_path, cfg)
        work = disk / "runs"
        proc = start(loop, work)
        try:
            wait_for_event(work, cfg["name"], lambda e: e["event"] == "data_accepted", proc, 0)
            filler = fill(disk)
            _, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        run_dir, = run_dirs(work, cfg["name"])
        lines = err.strip().splitlines()
        assert proc.returncode == ExitCode.INTERRUPTED, err[-3000:]
        assert "Traceback" not in err and "WARNING" not in err, err[-3000:]
        assert lines[-1].startswith(f"error: the disk holding {run_dir} is full (No space left on device"), err[-3000:]
        assert f"then resume with: python -m orchestrator run --resume {run_dir}" in lines[-1]
        assert pids_of(str(run_dir)) == [], "a process of the run outlived the coordinator"
        assert stray_files(run_dir) == []
        state = json.loads((run_dir / "state.json").read_text())  # whole: the atomic write held
        assert state["status"] in ("running", "interrupted")
        for line in (run_dir / "events.jsonl").read_text().splitlines():
            json.loads(line)  # not one torn line
        rows_before = rows_on_disk(run_dir)
        assert rows_before >= state["data_points"] > 0

        filler.unlink()  # space again
        done = subprocess.run([sys.executable, "-m", "orchestrator", "run", "--resume", str(run_dir), "--no-live"],
                              capture_output=True, text=True, cwd=REPO, timeout=300)
        assert done.returncode == ExitCode.OK, done.stderr[-3000:]
        state = json.loads((run_dir / "state.json").read_text())
        summary = json.loads((run_dir / "summary.json").read_text())
        assert state["status"] == "target_met" and summary["target_met"]
        assert rows_on_disk(run_dir) == state["data_points"] == summary["data_points"]
        assert rows_on_disk(run_dir) >= rows_before
        assert stray_files(run_dir) == []
    finally:
        if subprocess.run(["umount", str(disk)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], check=False)
