"""The real C sims through the real mpiexec launcher: results, checks, failures."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from orchestrator import shm
from orchestrator.launchers.base import LaunchRequest, Outcome, SimResult
from orchestrator.launchers.mpiexec import MpiexecLauncher
from tests.conftest import MALFORMED_FAULTS, faulty_args, leaked_segments, pids_of, sim

pytestmark = pytest.mark.integration


def request(tmp_path: Path, binary: str, args: list[str], ranks: int, *, ncols: int = 2,
            nrows: int | None = None, timeout: float = 30, run_id: str = "t-000001") -> LaunchRequest:
    return LaunchRequest(run_id=run_id, role="test", binary=sim(binary), args=args, ranks=ranks,
                         workdir=tmp_path / run_id, timeout_s=timeout, ncols=ncols, nrows=nrows)


def run(req: LaunchRequest) -> SimResult:
    return asyncio.run(MpiexecLauncher().run(req))


def test_golden_mpiexec_argv(tmp_path: Path) -> None:
    launcher = MpiexecLauncher(mpiexec="/opt/mpi/bin/mpiexec", isolate=False)
    req = LaunchRequest(run_id="check-000003", role="check", binary=Path("/x/sim-cheap"), args=["--x", "0.5"],
                        ranks=4, workdir=tmp_path / "r", timeout_s=5, ncols=2)
    assert launcher.command(req) == ["/opt/mpi/bin/mpiexec", "-n", "4", "/x/sim-cheap", "--x", "0.5",
                                     "--out", str(tmp_path / "r" / "result.npy")]
    isolated = MpiexecLauncher(mpiexec="/opt/mpi/bin/mpiexec", isolate=True).command(req)
    assert isolated == ["unshare", "--map-current-user", "--net", "--", *launcher.command(req)]
    assert launcher.environment(req)["SIMKIT_EXPECT_RANKS"] == "4"


@pytest.mark.parametrize("ranks", [1, 3, 4])
def test_sim_cheap_is_exact_on_the_whole_domain(tmp_path: Path, ranks: int) -> None:
    for i, x in enumerate([-math.pi, -3.0, -1.0, 0.0, 0.3, 2.5, math.pi]):
        r = run(request(tmp_path, "sim-cheap", ["--x", repr(x)], ranks, nrows=1, run_id=f"c{ranks}-{i}"))
        assert r.outcome is Outcome.OK, r.message
        assert r.table is not None
        assert r.table[0, 0] == x
        assert abs(r.table[0, 1] - math.sin(x)) < 1e-12


def test_sim_cheap_reduces_out_of_range_inputs(tmp_path: Path) -> None:
    r = run(request(tmp_path, "sim-cheap", ["--x", "10.0"], 2, nrows=1))
    assert r.table is not None and abs(r.table[0, 1] - math.sin(10.0)) < 1e-12


def test_sim_expensive_rows_seeded_and_in_range(tmp_path: Path) -> None:
    args = ["--points-per-rank", "32", "--lo", "-1", "--hi", "2", "--seed", "5"]
    a = run(request(tmp_path, "sim-expensive", args, 8, run_id="a"))
    b = run(request(tmp_path, "sim-expensive", args, 8, run_id="b"))
    c = run(request(tmp_path, "sim-expensive", [*args[:-1], "6"], 8, run_id="c"))
    assert a.table is not None and b.table is not None and c.table is not None
    assert a.table.shape == (256, 2)
    assert np.array_equal(a.table, b.table), "same seed, same data"
    assert not np.array_equal(a.table, c.table), "another seed, other data"
    assert a.table[:, 0].min() >= -1 and a.table[:, 0].max() < 2
    assert np.allclose(a.table[:, 1], np.sin(a.table[:, 0]), atol=1e-15)
    assert len(np.unique(a.table[:, 0])) == 256, "ranks draw distinct streams"


def test_misswired_launch_fails_loudly(tmp_path: Path) -> None:
    """Four singletons ('rank 0 of 1' each) instead of one 4-rank job: exit 3, not 4 partial answers."""
    env = {**os.environ, "SIMKIT_EXPECT_RANKS": "4"}
    proc = subprocess.run([str(sim("sim-noop")), "--out", str(tmp_path / "o.npy")], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3
    assert "started as rank 0 of 1 but 4 ranks were expected" in proc.stderr
    assert not (tmp_path / "o.npy").exists()


def test_usage_error_is_a_failed_run(tmp_path: Path) -> None:
    r = run(request(tmp_path, "sim-cheap", ["--x", "1", "--bogus", "2"], 2))
    assert r.outcome is Outcome.FAILED
    assert "exit code 2" in r.message and "unknown option '--bogus'" in r.message


def faulty(tmp_path: Path, fault: str, *, timeout: float = 30, ranks: int = 2) -> SimResult:
    args = faulty_args(fault)
    return run(request(tmp_path, "sim-faulty", args, ranks, timeout=timeout, run_id=fault))


def test_segfault_is_a_failed_run_and_leaves_no_shared_memory(tmp_path: Path) -> None:
    before = shm.snapshot()
    r = faulty(tmp_path, "crash", ranks=3)
    assert r.outcome is Outcome.FAILED
    assert "injected segfault" in r.message
    assert r.table is None
    assert r.info.get("shm_removed"), "the killed ranks' segment should have been swept"
    assert leaked_segments(before) == set()


def test_hung_sim_is_killed_at_its_timeout_with_no_process_left(tmp_path: Path) -> None:
    before = shm.snapshot()
    t0 = time.monotonic()
    r = faulty(tmp_path, "hang", timeout=2.0, ranks=3)
    assert r.outcome is Outcome.TIMEOUT
    assert time.monotonic() - t0 < 10
    assert pids_of(str(tmp_path / "hang")) == [], "ranks of the hung sim survived"
    assert leaked_segments(before) == set(), "the killed ranks' shared memory was left in /dev/shm"


@pytest.mark.parametrize(("fault", "message"), MALFORMED_FAULTS)
def test_malformed_output_is_rejected(tmp_path: Path, fault: str, message: str) -> None:
    r = faulty(tmp_path, fault)
    assert r.outcome is Outcome.MALFORMED
    assert message in r.message and str(tmp_path) in r.message
    assert r.table is None


def test_exit_without_output(tmp_path: Path) -> None:
    r = faulty(tmp_path, "exit")
    assert r.outcome is Outcome.FAILED and "exit code 9" in r.message


def test_timeout_cancellation_kills_the_tree(tmp_path: Path) -> None:
    async def go() -> None:
        args = ["--points-per-rank", "4", "--hang-prob", "1", "--fault-seed", "3"]
        task = asyncio.ensure_future(MpiexecLauncher().run(request(tmp_path, "sim-faulty", args, 2, run_id="cx")))
        await asyncio.sleep(1.0)
        assert pids_of(str(tmp_path / "cx")), "the sim should be running"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert pids_of(str(tmp_path / "cx")) == []
