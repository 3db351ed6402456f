"""Walltime-aware placement: parsers and estimates as data, then a real short salloc and a resume."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.loop.walltime import Durations, WalltimeGuard, allocation_end, parse_scontrol_end, parse_slurm_time
from tests.conftest import fast_loop, write_loop

END = "2026-12-01T23:15:04"


def test_slurm_times_parse_or_are_unknown() -> None:
    assert parse_slurm_time(END) == pytest.approx(time.mktime(time.strptime(END, "%Y-%m-%dT%H:%M:%S")))
    for unknown in ("N/A", "Unknown", "UNLIMITED", "", "garbage"):
        assert parse_slurm_time(unknown) is None
    text = f"JobId=46 JobName=x\n   RunTime=00:00:01 TimeLimit=00:01:00\n   StartTime=x EndTime={END} Deadline=N/A"
    assert parse_scontrol_end(text) == parse_slurm_time(END)
    assert parse_scontrol_end("JobId=46") is None


def test_allocation_end_from_the_environment() -> None:
    assert allocation_end({}) is None  # not in Slurm
    assert allocation_end({"SLURM_JOB_ID": "7", "SLURM_JOB_END_TIME": "1800000000"}) == 1.8e9


def test_estimates_follow_each_kind_and_notice_a_slowdown() -> None:
    d = Durations()
    assert d.expected("generate") is None
    for s in (10.0, 10.0, 10.0):
        d.observe("generate", s)
    d.observe("check", 1.0)
    assert d.expected("generate") == pytest.approx(10.0) and d.expected("check") == 1.0
    d.observe("generate", 30.0)
    assert d.expected("generate") == 30.0  # the last run, above the mean
    assert Durations.from_json(json.loads(json.dumps(d.to_json()))).expected("generate") == 30.0


def test_guard_starts_only_what_ends_before_the_exit_time() -> None:
    guard = WalltimeGuard(end=1000.0, signal_lead_s=120.0, safety_s=10.0)
    assert guard.exit_at == 870.0
    assert guard.fits("generate", now=0.0)  # unknown kind: its first run starts the estimate
    guard.durations.observe("generate", 100.0)
    guard.durations.observe("check", 5.0)
    assert guard.fits("generate", now=770.0) and not guard.fits("generate", now=771.0)
    assert guard.fits("check", now=860.0) and not guard.fits("check", now=870.0)
    assert not guard.fits("unknown", now=870.0)


# ---------------------------------------------------------------- a real allocation that ends soon

LEAD_S = 80.0
SAFETY_S = 10.0
"""With ``salloc -t 2`` (120 s) the campaign must be out 30 s after the allocation starts."""


def _session(slurm_env: dict[str, str], tmp_path: Path, name: str, argv: list[str]) -> tuple[int, dict[str, Any]]:
    from tests.test_slurm import in_allocation

    proc, probed = in_allocation(slurm_env, tmp_path / name, argv,
                                 salloc=["salloc", "-N1", "--ntasks-per-node=3", "-t", "2"])
    assert proc.returncode in (0, 3, 75), proc.stderr[-4000:]
    assert probed["steps"] == [] and probed["stepds"] == []
    return proc.returncode, probed


@pytest.mark.slurm
@pytest.mark.integration
def test_campaign_stops_long_sims_before_the_allocation_ends_and_resumes(
    slurm_env: dict[str, str], tmp_path: Path
) -> None:
    from tests.test_slurm import events, only_run_dir

    cfg = fast_loop(**{"sims.generate.ranks": 1, "sims.check.ranks": 1, "policy.max_inflight": 3,
                       "policy.generates_per_round": 3, "training.backend": "local",
                       "target.tolerance": 1e-9, "target.max_rounds": 1000,  # never met: runs till walltime
                       "walltime.signal_lead_s": LEAD_S, "walltime.safety_s": SAFETY_S})
    cfg["sims"]["generate"]["args"] += ["--work-ms", "5000"]
    loop = write_loop(tmp_path, cfg)
    work = tmp_path / "runs"
    run = [sys.executable, "-m", "orchestrator", "run", str(loop), "--workdir", str(work), "--no-live"]
    rc, _ = _session(slurm_env, tmp_path, "first", run)
    assert rc == 75  # resumable: the sbatch template requeues on it
    run_dir = only_run_dir(work)
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "interrupted" and state["stop_reason"] == "walltime"
    first = events(run_dir)
    start = next(e for e in first if e["event"] == "campaign_start")
    exit_at = start["exit_at"]
    assert start["allocation_end"] - exit_at == pytest.approx(LEAD_S + SAFETY_S)
    ends = [e for e in first if e["event"] == "sim_end" and e["role"] == "generate"]
    assert len(ends) >= 1 and all(e["outcome"] == "ok" for e in ends)
    assert not [e for e in first if e["event"] == "sim_end" and e["outcome"] != "ok"], "a sim was killed"
    assert all(e["t"] <= exit_at for e in ends), "a sim ran past the exit time"
    assert any(e["event"] == "walltime_skip" for e in first), "nothing was held back"
    campaign_end = next(e for e in first if e["event"] == "campaign_end")
    assert campaign_end["t"] <= start["allocation_end"] - LEAD_S, "exited after the warning signal"
    assert state["sim_durations"]["mean"]["generate"] >= 5.0
    kept = state["data_points"]
    assert kept == 32 * len(ends)

    rc, _ = _session(slurm_env, tmp_path, "second",
                     [sys.executable, "-m", "orchestrator", "run", "--resume", str(run_dir), "--no-live"])
    assert rc == 75
    resumed = json.loads((run_dir / "state.json").read_text())
    assert resumed["status"] == "interrupted" and resumed["stop_reason"] == "walltime"
    # Nothing lost (how much is added depends on how soon the Dask worker is up on a loaded box).
    assert resumed["data_points"] >= kept
    assert set(state["data_files"]) <= set(resumed["data_files"])
    starts = [e for e in events(run_dir) if e["event"] == "campaign_start"]
    assert len(starts) == 2 and starts[1]["resumed"] is True
