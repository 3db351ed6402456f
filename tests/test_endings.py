"""How a campaign ends, as a user reads it: why it stopped, and no retries that cannot help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.runlog import EventKind
from orchestrator.store import RunStore
from tests.conftest import REPO, fast_loop, write_loop

pytestmark = pytest.mark.integration


def run(tmp_path: Path, cfg: dict[str, object]) -> tuple[subprocess.CompletedProcess[str], Path]:
    loop = write_loop(tmp_path, cfg)
    work = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(loop), "--workdir", str(work),
                           "--no-live"], cwd=REPO, capture_output=True, text=True, timeout=300)
    return proc, next(work.glob("sine-*"))


def test_columns_that_never_fit_stop_the_campaign_after_two_runs_with_one_line(tmp_path: Path) -> None:
    # loop.yml declares two outputs; the sims return one (x, y): every run would fail the same way
    proc, run_dir = run(tmp_path, fast_loop(outputs=["y", "z"]))
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "returns 2 columns but loop.yml declares 3 (x, y, z): fix `inputs`/`outputs` or the sim" in errors[0]
    ends = [e for e in RunStore.open(run_dir).read_events() if e.kind is EventKind.SIM_END
            and e.get("outcome") == "malformed"]
    assert 2 <= len(ends) <= 4  # two of one kind; the other kind may have had one or two in flight
    for e in ends:  # each failure is printed once, not also as a log warning
        assert proc.stderr.count(f"sim {e['run_id']} malformed") == 1


def test_a_time_budget_ending_says_so(tmp_path: Path) -> None:
    cfg = fast_loop(**{"target.time_budget_s": 4, "policy.max_inflight": 1})
    cfg["sims"]["generate"]["args"] += ["--work-ms", "30000"]  # no data before the budget is spent
    cfg["sims"]["generate"]["timeout_s"] = 60
    proc, _ = run(tmp_path, cfg)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stdout.startswith("stopped (target.time_budget_s used up): 0 training round(s)")
