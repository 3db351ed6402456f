"""Nothing lost: faults provoked for real (crashing and hanging sims, signals, a killed
Dask worker, a sim kind that always fails), then the run directory audited."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchestrator import store
from orchestrator.runlog import EventKind, LoggedEvent
from tests.conftest import dask_worker_processes, fast_loop, pids_of, write_loop

pytestmark = pytest.mark.integration


def start(loop: Path, work: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", str(loop), "--workdir", str(work), "--no-live", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def run_dir_of(work: Path) -> Path | None:
    dirs = [d for d in work.glob("sine-*") if d.is_dir()] if work.exists() else []
    return dirs[0] if dirs else None


def read_events(run_dir: Path) -> list[LoggedEvent]:
    return store.read_events(run_dir)


def wait_for_event(work: Path, pred: Any, proc: subprocess.Popen[str], timeout: float = 120,
                   skip: int = 0) -> dict[str, Any]:
    """Watch events.jsonl until an event after the first ``skip`` satisfies pred
    (the coordinator must still be running)."""
    deadline = time.monotonic() + timeout
    seen = skip
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"coordinator ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}"
        run_dir = run_dir_of(work)
        if run_dir is not None:
            events = read_events(run_dir)
            for e in events[seen:]:
                if pred(e):
                    return e
            seen = len(events)
        time.sleep(0.05)
    raise AssertionError("event never came")


def audit(run_dir: Path) -> dict[str, Any]:
    """Every accepted generate run (and check row) is on disk, nothing else is, and the counters agree."""
    events = read_events(run_dir)
    accepted = [e for e in events if e.kind is EventKind.DATA_ACCEPTED]
    files = sorted((run_dir / "data").glob("*.npy"))
    assert sorted(Path(e["path"]).name for e in accepted) == [f.name for f in files]
    state = json.loads((run_dir / "state.json").read_text())
    for role, counter in (("generate", "data_points"), ("check", "check_rows")):
        rows = sum(np.load(f).shape[0] for f in files if f.name.startswith(f"{role}-"))
        assert rows == sum(e["rows"] for e in accepted if e["role"] == role)
        assert state[counter] == rows
    assert not list((run_dir / "data").glob(".*tmp*")), "temporary files left in data/"
    return state


def test_crashing_and_hanging_sims_do_not_stop_the_campaign(tmp_path: Path) -> None:
    cfg = fast_loop()
    cfg["sims"]["generate"] = {
        "binary": "sim-faulty",
        "args": ["--points-per-rank", "32", "--lo", "{lo}", "--hi", "{hi}", "--seed", "{seed}",
                 "--fault-seed", "{run_id}", "--crash-prob", "0.2", "--hang-prob", "0.05"],
        "ranks": 4, "timeout_s": 3, "retries": 5, "backoff_s": 0.05,
    }
    cfg["policy"]["max_inflight"] = 3
    cfg["policy"]["generates_per_round"] = 2
    cfg["target"]["successes"] = 8
    loop = write_loop(tmp_path, cfg)
    work = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(loop), "--workdir", str(work),
                           "--no-live", "--set", "seed=3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = run_dir_of(work)
    assert run_dir is not None
    events = read_events(run_dir)
    ends = [e for e in events if e.kind is EventKind.SIM_END and e["role"] == "generate"]
    failures = [e for e in ends if e["outcome"] != "ok"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sims_failed"] == len(failures) == len([e for e in events if e.kind is EventKind.SIM_END
                                                            and e["outcome"] not in ("ok", "cancelled")])
    assert {e["outcome"] for e in failures} <= {"failed", "timeout"}
    # the fault seed is the launch id: recompute which runs were meant to fail
    assert failures, "with 20% crashes some generate runs must fail"
    for e in failures:
        stderr = (run_dir / "sims" / e["run_id"] / "stderr.log").read_text()
        assert "injected segfault" in stderr or "injected hang" in stderr
    audit(run_dir)
    assert pids_of(str(run_dir)) == [], "processes left behind"


def test_sigterm_at_three_moments_then_resume_loses_nothing(tmp_path: Path) -> None:
    cfg = fast_loop()
    cfg["sims"]["generate"]["args"] += ["--work-ms", "600"]
    cfg["policy"]["checks_per_round"] = 2
    loop = write_loop(tmp_path, cfg)
    work = tmp_path / "runs"
    moments = [
        ("a generate sim in flight", lambda e: e.kind is EventKind.SIM_START and e["role"] == "generate"),
        ("a training in flight", lambda e: e.kind is EventKind.TRAIN_START),
        ("checks done", lambda e: e.kind is EventKind.CHECK),
    ]
    before: dict[str, Any] = {}
    for what, pred in moments:
        existing = run_dir_of(work)
        skip = len(read_events(existing)) if existing else 0
        proc = start(loop, work)
        wait_for_event(work, pred, proc, skip=skip)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 75, f"{what}: {err[-2000:]}"
        assert "resume with: python -m orchestrator run --resume" in out
        run_dir = run_dir_of(work)
        assert run_dir is not None
        state = audit(run_dir)
        assert state["status"] == "interrupted" and state["stop_reason"] == "SIGTERM"
        assert pids_of(str(run_dir)) == [], f"{what}: processes left behind"
        # nothing accepted earlier went missing
        assert state["data_points"] >= before.get("data_points", 0)
        assert state["model_version"] >= before.get("model_version", 0)
        assert state["successes"] >= before.get("successes", 0)
        assert set(before.get("data_files", [])) <= set(state["data_files"])
        before = state
    # a plain `run` finds the unfinished run and resumes it to the target
    proc = start(loop, work)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "found an unfinished run" in err
    run_dir = run_dir_of(work)
    assert run_dir is not None and len(list(work.glob("sine-*"))) == 1
    state = audit(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["target_met"] and summary["data_points"] == state["data_points"]
    starts = [e for e in read_events(run_dir) if e.kind is EventKind.CAMPAIGN_START]
    assert [e["resumed"] for e in starts] == [False, True, True, True]
    ids = [e["run_id"] for e in read_events(run_dir) if e.kind is EventKind.SIM_START]
    assert len(ids) == len(set(ids)), "run ids must stay unique across resumes"


def test_killed_dask_worker_does_not_fail_the_campaign(tmp_path: Path) -> None:
    cfg = fast_loop()
    # A long first training, so the worker can be killed in the middle of it.
    cfg["training"]["hparams"] = {"epochs": 4000, "lbfgs_iters": 300}
    loop = write_loop(tmp_path, cfg)
    work = tmp_path / "runs"
    proc = start(loop, work)
    wait_for_event(work, lambda e: e.kind is EventKind.TRAIN_START, proc)
    time.sleep(0.5)
    workers = dask_worker_processes(proc.pid)
    assert workers, "no Dask worker process found"
    for w in workers:
        os.kill(w, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    run_dir = run_dir_of(work)
    assert run_dir is not None
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["target_met"]
    audit(run_dir)


def test_sim_kind_that_always_fails_stops_with_its_name_and_stderr(tmp_path: Path) -> None:
    cfg = fast_loop()
    cfg["sims"]["generate"] = {"binary": "sim-faulty", "args": ["--exit-prob", "1", "--fault-seed", "{run_id}"],
                               "ranks": 2, "retries": 1, "backoff_s": 0.01, "max_consecutive_failures": 4}
    loop = write_loop(tmp_path, cfg)
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(loop), "--workdir",
                           str(tmp_path / "runs"), "--no-live"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "sim kind 'generate' (sim-faulty) failed 4 times in a row" in last
    assert "injected exit 9" in last
    run_dir = run_dir_of(tmp_path / "runs")
    assert run_dir is not None
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["sims_failed"] == 4


HELD_START = """
import asyncio, os, signal, sys
from orchestrator.procs import enter_program, guardian, start

async def main():
    guardian.start(hold=True)
    assert enter_program() is not None, "orch-enter is not installed beside the interpreter"
    proc = await start(["sleep", "60"], env=dict(os.environ), stdout=None, stderr=None)
    print(proc.pid, flush=True)
    try:
        await start(["no-such-program-here"], env=dict(os.environ), stdout=None, stderr=None)
    except FileNotFoundError:
        print("not found", flush=True)
    sys.stdin.readline()  # the test SIGKILLs us here

asyncio.run(main())
"""


def test_a_held_process_is_started_through_orch_enter_and_ends_with_its_coordinator() -> None:
    """The vfork path (sims/orch-enter.c): the process sits in its own session and cgroup, a missing
    program is still a FileNotFoundError at start, and a SIGKILLed starter leaves nothing behind."""
    starter = subprocess.Popen([sys.executable, "-c", HELD_START], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    try:
        assert starter.stdout is not None
        pid = int(starter.stdout.readline())
        assert starter.stdout.readline().strip() == "not found"
        assert os.getsid(pid) == pid
        own = Path(f"/proc/{pid}/cgroup").read_text()
        if Path("/sys/fs/cgroup/cgroup.controllers").exists() or "orchestrator-" in own:  # a cgroup v2 to hold it
            assert f"/p{pid}\n" in own, own
        deadline = time.monotonic() + 10
        while (argv0 := Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]) != b"sleep":
            assert time.monotonic() < deadline, f"orch-enter did not exec sleep as given: {argv0!r}"
            time.sleep(0.01)
    finally:
        starter.kill()
        starter.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists(), "the held process outlived its SIGKILLed starter"
