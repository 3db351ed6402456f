"""What a resume or a step finds on disk is checked before it is used: a data file of the wrong
shape, a garbage checkpoint in models/, a stray .npy in data/ (provoked for real on run dirs of
real campaigns)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, fast_loop, write_loop
from tests.fault_chain import read_events, run_dirs, start, wait_for_event

pytestmark = pytest.mark.integration


def test_steps_train_with_data_of_the_wrong_columns_is_one_line_exit_2(tmp_path: Path) -> None:
    loop = write_loop(tmp_path, fast_loop())
    bad = tmp_path / "three.npy"
    np.save(bad, np.zeros((16, 3)))
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(loop), "--workdir", str(tmp_path / "w"),
                           "--steps", "train", "--data", str(bad), "--no-live"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(bad) in lines[0] and "3 columns" in lines[0] and "2 (x, y)" in lines[0], lines[0]


def test_garbage_checkpoint_and_stray_npy_on_resume(tmp_path: Path) -> None:
    # a target it cannot meet: the resume goes on training to max_rounds
    loop = write_loop(tmp_path, fast_loop(**{"name": "gc", "target.tolerance": 1e-12, "target.max_rounds": 4}))
    work = tmp_path / "runs"
    proc = start(loop, work)
    try:
        wait_for_event(work, "gc", lambda e: e["event"] == "train_end" and e["version"] >= 2, proc, 0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-2000:]
    run_dir = run_dirs(work, "gc")[0]
    state = json.loads((run_dir / "state.json").read_text())
    garbage = run_dir / state["model_file"]
    garbage.write_bytes(b"\x00garbage, not a checkpoint" * 40)
    np.save(run_dir / "data" / "generate-999999.npy", np.full((8, 2), np.nan))  # a launch id, NaN rows
    np.save(run_dir / "data" / "stray.npy", np.arange(5.0))  # 1-D
    accepted_before = list(state["data_files"])

    resumed = subprocess.run([sys.executable, "-m", "orchestrator", "run", "--resume", str(run_dir), "--no-live"],
                             capture_output=True, text=True, cwd=REPO, timeout=400)
    assert resumed.returncode == 3, resumed.stderr[-3000:]  # stopped at max_rounds, as a clean run
    assert "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    assert f"{garbage}" in resumed.stderr and "unreadable checkpoint" in resumed.stderr, resumed.stderr[-3000:]
    assert "generate-999999.npy" in resumed.stderr and "stray.npy" in resumed.stderr
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "stopped" and state["model_version"] == 4, state
    names = {Path(f).name for f in state["data_files"]}
    assert "generate-999999.npy" not in names and "stray.npy" not in names
    assert set(accepted_before) <= set(state["data_files"])
    rows = sum(int(np.load(run_dir / f).shape[0]) for f in state["data_files"])
    assert rows == state["data_points"] + state["check_rows"]  # generate rows and check rows (issue 22)
    assert sorted(p.name for p in (run_dir / "data").glob("*.npy")) == sorted(names)  # the strays moved aside
    after = read_events(run_dir)[next(i for i, e in enumerate(read_events(run_dir))
                                      if e["event"] == "campaign_start" and e["resumed"]):]
    assert [e["version"] for e in after if e["event"] == "train_end"], "the resume trained no model"
