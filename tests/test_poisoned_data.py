"""Data that would poison the surrogate: refused at acceptance, and a diverging training is one
failed round, not the end of the campaign.

The generate sim here is an existing code (a script, no simkit) that evaluates sin on its
window; on the run chosen by the test it returns one finite but huge value (1e300), as a
broken solver does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchestrator.runlog import EventKind
from orchestrator.store import read_events
from tests.conftest import REPO, fast_loop, write_loop

pytestmark = pytest.mark.integration

HUGE = 1e300

POISONER = f"""#!{sys.executable}
# sin on [lo, hi]; on run POISON_RUN one row says HUGE (finite: the NaN/Inf check passes it)
import math, os, sys
lo, hi, seed, run_id, poison = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
n = 64
with open("out.txt", "w") as f:
    for i in range(n):
        x = lo + (hi - lo) * ((i * 7919 + seed) % n) / (n - 1)
        y = {HUGE!r} if str(run_id) in poison.split(",") and i == 5 else math.sin(x)
        f.write(f"{{x!r}} {{y!r}}\\n")
"""


def poisoned_project(tmp_path: Path, poison_runs: str, **overrides: Any) -> Path:
    code = tmp_path / "poisoner"
    code.write_text(POISONER)
    code.chmod(0o755)
    cfg = fast_loop(**overrides)
    cfg["sims"]["generate"] = {"binary": str(code), "args": ["{lo}", "{hi}", "{seed}", "{run_id}", poison_runs],
                               "ranks": 1, "output": {"path": "out.txt"}, "retries": 2, "backoff_s": 0.0}
    return write_loop(tmp_path, cfg)


def run(loop: Path, work: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", "run", str(loop), "--workdir", str(work),
                           "--no-live", *extra], capture_output=True, text=True, cwd=REPO, timeout=400)


def test_a_huge_value_is_refused_at_acceptance_and_the_campaign_meets_its_target(tmp_path: Path) -> None:
    loop = poisoned_project(tmp_path, "1,2,3")  # the first launches (generates among them); retries are clean
    work = tmp_path / "runs"
    proc = run(loop, work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    run_dir = next(work.glob("sine-*"))
    events = read_events(run_dir)
    refused = [e for e in events if e.kind is EventKind.SIM_END and e.get("refused_rows")]
    assert refused, [e.get("message") for e in events if e.kind is EventKind.SIM_END]
    assert all(e["refused_rows"] == 1 and "y=1e+300" in e["refused"] for e in refused), refused
    assert "1e+300" in proc.stderr and "rows refused" in proc.stderr
    data = np.concatenate([np.load(f) for f in (run_dir / "data").glob("*.npy")])
    assert np.abs(data[:, 1]).max() <= 1.0 + 1e-12
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "target_met"


def test_a_diverging_training_is_one_failed_round_per_line_then_one_line_stop(tmp_path: Path) -> None:
    # every rule off: the huge value is accepted and every training on it diverges
    loop = poisoned_project(tmp_path, "1,2,3", **{"acceptance.outlier_k": None, "acceptance.max_abs": 1e308})
    work = tmp_path / "runs"
    proc = run(loop, work)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Compute Failed" not in proc.stderr, proc.stderr[-3000:]
    run_dir = next(work.glob("sine-*"))
    events = read_events(run_dir)
    failed = [e for e in events if e.kind is EventKind.TRAIN_FAILED]
    assert [e["in_a_row"] for e in failed] == [1, 2, 3], failed
    # a failed round is not the end: the next training starts after it
    kinds = [e.kind for e in events if e.kind in (EventKind.TRAIN_START, EventKind.TRAIN_FAILED)]
    assert kinds[:4] == [EventKind.TRAIN_START, EventKind.TRAIN_FAILED, EventKind.TRAIN_START,
                         EventKind.TRAIN_FAILED], kinds
    assert sum("training round 1 failed: training diverged" in ln for ln in proc.stderr.splitlines()) == 3
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged 3 rounds in a row") and "acceptance" in last, last


def test_a_declared_range_refuses_rows_outside_it(tmp_path: Path) -> None:
    loop = poisoned_project(tmp_path, "", **{"acceptance.ranges": {"y": [-0.5, 0.5]}, "target.max_rounds": 1,
                                             "target.successes": 1, "target.tolerance": 10.0})
    work = tmp_path / "runs"
    proc = run(loop, work)
    assert proc.returncode in (0, 3), proc.stderr[-3000:]
    run_dir = next(work.glob("sine-*"))
    data = np.concatenate([np.load(f) for f in (run_dir / "data").glob("*.npy")])
    assert np.abs(data[:, 1]).max() <= 0.5 and len(data) > 0
    refused = [e for e in read_events(run_dir) if e.kind is EventKind.SIM_END and e.get("refused_rows")]
    assert refused and all("outside its declared range [-0.5, 0.5]" in e["refused"] for e in refused), refused
