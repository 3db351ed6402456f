"""The node-agent launcher: the same failure tests as the other launchers, then on the real cluster.

Outside Slurm the agent is a local child process; the sims are real C MPI programs
started by the agent's node-local mpiexec.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from orchestrator import shm
from orchestrator.allocation import Allocation, Node, Placement
from orchestrator.launchers.agent import NodeAgentLauncher, StepRate, agent_srun_argv
from orchestrator.launchers.base import LaunchRequest, Outcome, SimResult
from tests.conftest import MALFORMED_FAULTS, faulty_args, leaked_segments, pids_of, sim

pytestmark = pytest.mark.integration

T = TypeVar("T")
LOCAL = Allocation(nodes=(Node("local", 4),), in_slurm=False, job_id=None)


def request(tmp_path: Path, binary: str, args: list[str], ranks: int, *, timeout: float = 30,
            run_id: str = "t-000001", nrows: int | None = None) -> LaunchRequest:
    return LaunchRequest(run_id=run_id, role="test", binary=sim(binary), args=args, ranks=ranks,
                         workdir=tmp_path / run_id, timeout_s=timeout, ncols=2, nrows=nrows)


def with_launcher(tmp_path: Path, body: Callable[[NodeAgentLauncher], Awaitable[T]]) -> T:
    async def go() -> T:
        launcher = NodeAgentLauncher(LOCAL, log_dir=tmp_path / "agents")
        try:
            return await body(launcher)
        finally:
            await launcher.close()

    return asyncio.run(go())


def faulty(tmp_path: Path, fault: str, *, timeout: float = 30, ranks: int = 2) -> SimResult:
    args = faulty_args(fault)
    return with_launcher(tmp_path, lambda la: la.run(request(tmp_path, "sim-faulty", args, ranks, timeout=timeout,
                                                             run_id=fault)))


def test_golden_agent_step_argv() -> None:
    assert agent_srun_argv("n2") == [
        "srun", "--overlap", "--mpi=none", "-N1", "-n1", "-c1", "--nodelist", "n2", "--job-name", "orch-agent-n2",
        "--kill-on-bad-exit=1", sys.executable, "-m", "orchestrator.node_agent"]


def test_results_come_back_and_one_agent_serves_every_sim(tmp_path: Path) -> None:
    async def body(la: NodeAgentLauncher) -> list[SimResult]:
        reqs = [request(tmp_path, "sim-cheap", ["--x", str(0.1 * i)], 2, nrows=1, run_id=f"c-{i}") for i in range(6)]
        return list(await asyncio.gather(*(la.run(r) for r in reqs)))

    results = with_launcher(tmp_path, body)
    assert all(r.outcome is Outcome.OK for r in results), [r.message for r in results]
    assert all(r.table is not None and r.table.shape == (1, 2) for r in results)
    assert len({r.info["agent_pid"] for r in results}) == 1
    assert not Path(f"/proc/{results[0].info['agent_pid']}").exists(), "the agent outlived close()"


def test_one_rank_mpich_sims_run_as_singletons_and_a_hung_one_is_ended(tmp_path: Path) -> None:
    """Issue 25: no mpiexec for a one-rank MPICH run; MPICH starts as a singleton of world size 1
    (sim-noop reports it), and a hung singleton is still ended at its timeout with nothing left."""
    from orchestrator.mpi import mpi_for

    hang = ["--points-per-rank", "4", "--hang-prob", "1", "--fault-seed", "3"]

    async def go() -> list[SimResult]:
        la = NodeAgentLauncher(LOCAL, mpi=mpi_for(sim("sim-noop")), log_dir=tmp_path / "agents")
        try:
            runs = [request(tmp_path, "sim-noop", [], 1, nrows=1, run_id=f"n-{i}") for i in range(3)]
            runs.append(request(tmp_path, "sim-faulty", hang, 1, timeout=2.0, run_id="hang"))
            assert all(la.command(r)[0] == str(r.binary.absolute()) for r in runs), "mpiexec in a singleton run"
            return list(await asyncio.gather(*(la.run(r) for r in runs)))
        finally:
            await la.close()

    *noop, hung = asyncio.run(go())
    assert all(r.outcome is Outcome.OK and r.table is not None and r.table.tolist() == [[1.0, 0.0]] for r in noop)
    assert hung.outcome is Outcome.TIMEOUT and pids_of(str(tmp_path / "hang")) == []


def test_crash_is_a_failed_run_with_its_stderr(tmp_path: Path) -> None:
    before = shm.snapshot()
    r = faulty(tmp_path, "crash", ranks=3)
    assert r.outcome is Outcome.FAILED and "injected segfault" in r.message and r.table is None
    assert leaked_segments(before) == set()


def test_hung_sim_is_killed_at_its_timeout_with_no_process_left(tmp_path: Path) -> None:
    before = shm.snapshot()
    t0 = time.monotonic()
    r = faulty(tmp_path, "hang", timeout=2.0, ranks=3)
    assert r.outcome is Outcome.TIMEOUT and "timed out after 2 s" in r.message
    assert time.monotonic() - t0 < 15
    assert pids_of(str(tmp_path / "hang")) == [], "ranks of the hung sim survived"
    assert leaked_segments(before) == set()


@pytest.mark.parametrize(("fault", "message"), MALFORMED_FAULTS)
def test_malformed_output_is_rejected(tmp_path: Path, fault: str, message: str) -> None:
    r = faulty(tmp_path, fault)
    assert r.outcome is Outcome.MALFORMED and message in r.message and r.table is None


def test_cancel_ends_the_tree_and_the_agent_stays_usable(tmp_path: Path) -> None:
    args = ["--points-per-rank", "4", "--hang-prob", "1", "--fault-seed", "3"]

    async def body(la: NodeAgentLauncher) -> SimResult:
        task = asyncio.ensure_future(la.run(request(tmp_path, "sim-faulty", args, 2, run_id="cx")))
        deadline = time.monotonic() + 30
        while len(pids_of(str(tmp_path / "cx" / "result.npy"))) < 3:  # mpiexec and 2 ranks
            assert time.monotonic() < deadline and not task.done(), "the sim never ran"
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pids_of(str(tmp_path / "cx")) == []
        return await la.run(request(tmp_path, "sim-cheap", ["--x", "0.5"], 1, nrows=1, run_id="after"))

    after = with_launcher(tmp_path, body)
    assert after.outcome is Outcome.OK


def test_the_node_local_mpiexec_listens_on_no_port_of_the_node(tmp_path: Path) -> None:
    """Issue 24: hydra's control port listens on every interface; through the agent, as through the
    mpiexec launcher, it lives in a private network namespace that no other account can reach."""
    import psutil

    from orchestrator.launchers.mpiexec import can_isolate

    if not can_isolate():
        pytest.skip("this box does not let an unprivileged process unshare a network namespace")
    args = ["--points-per-rank", "4", "--hang-prob", "1", "--fault-seed", "3"]

    async def body(la: NodeAgentLauncher) -> list[Any]:
        task = asyncio.ensure_future(la.run(request(tmp_path, "sim-faulty", args, 2, run_id="net")))
        deadline = time.monotonic() + 30
        while len(pids_of(str(tmp_path / "net" / "result.npy"))) < 3:  # mpiexec and 2 ranks
            assert time.monotonic() < deadline and not task.done(), "the sim never ran"
            await asyncio.sleep(0.05)
        tree = {p.pid for pid in pids_of(str(tmp_path / "net" / "result.npy")) for p in
                [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]}
        listening = [c for c in psutil.net_connections(kind="inet")
                     if c.pid in tree and c.status == psutil.CONN_LISTEN]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return listening

    assert with_launcher(tmp_path, body) == []


def test_a_dead_agent_is_a_failed_run_not_a_hang(tmp_path: Path) -> None:
    args = ["--points-per-rank", "4", "--hang-prob", "1", "--fault-seed", "3"]

    async def body(la: NodeAgentLauncher) -> SimResult:
        task = asyncio.ensure_future(la.run(request(tmp_path, "sim-faulty", args, 1, run_id="lost")))
        agent = await la.pool.agent("local")
        agent.proc.terminate()  # the agent ends its runs and exits
        return await task

    r = with_launcher(tmp_path, body)
    assert r.outcome is Outcome.FAILED and "node agent on local exited" in r.message
    assert pids_of(str(tmp_path / "lost")) == []


def test_step_rate_spaces_creations() -> None:
    async def go() -> float:
        rate = StepRate(50.0)
        t0 = time.monotonic()
        for _ in range(6):
            await rate.wait()
        return time.monotonic() - t0

    assert asyncio.run(go()) >= 5 / 50.0 - 1e-3
    with pytest.raises(ValueError):
        StepRate(0)


# ---------------------------------------------------------------- the real cluster


async def _on_cluster(work: Path) -> dict[str, Any]:
    from orchestrator.launchers.srun import steps_named
    from tests.test_slurm import listed_steps

    alloc = Allocation.detect()
    assert alloc.job_id is not None
    la = NodeAgentLauncher(alloc, log_dir=work / "agents")
    report: dict[str, Any] = {}
    try:
        reqs = [LaunchRequest(run_id=f"noop-{i}", role="test", binary=sim("sim-noop"), args=[], ranks=1,
                              workdir=work / f"noop-{i}", timeout_s=60, ncols=2, nrows=1,
                              placement=Placement(((alloc.nodes[i % 3].name, 1),))) for i in range(12)]
        results = await asyncio.gather(*(la.run(r) for r in reqs))
        report["outcomes"] = [r.outcome.value for r in results]
        report["nodes"] = sorted({r.info["node"] for r in results})
        report["agent_steps"] = [s for n in alloc.node_names for s in await steps_named(alloc.job_id,
                                                                                           f"orch-agent-{n}")]
        args = ["--points-per-rank", "4", "--seed", "1", "--fault-seed", "1", "--hang-prob", "1"]
        hung = await la.run(LaunchRequest(run_id="hang", role="test", binary=sim("sim-faulty"), args=args, ranks=2,
                                          workdir=work / "hang", timeout_s=2.0, ncols=2,
                                          placement=Placement(((alloc.nodes[1].name, 2),))))
        report["hang"] = hung.outcome.value
        report["hang_left"] = pids_of(str(work / "hang"))
        report["steps_started"] = la.steps_started
    finally:
        await la.close()
    report["steps_after_close"] = listed_steps(alloc.job_id)
    return report


def cluster_driver() -> None:
    work = Path(os.environ["ORCH_WORK"])
    (work / "report.json").write_text(json.dumps(asyncio.run(_on_cluster(work))))


@pytest.mark.slurm
def test_agents_on_the_cluster_one_step_per_node(slurm_env: dict[str, str], tmp_path: Path) -> None:
    from tests.test_slurm import in_allocation

    work = tmp_path / "work"
    work.mkdir()
    proc, probed = in_allocation(
        slurm_env, tmp_path / "probe",
        [sys.executable, "-c", "from tests.test_agent_launcher import cluster_driver as d; d()"],
        nodes=3, per_node=2, extra_env={"ORCH_WORK": str(work)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((work / "report.json").read_text())
    assert report["outcomes"] == ["ok"] * 12 and report["nodes"] == ["n1", "n2", "n3"]
    assert len(report["agent_steps"]) == 3 and report["steps_started"] == 3  # one step per node, 13 sims
    assert report["hang"] == "timeout" and report["hang_left"] == []
    assert report["steps_after_close"] == []
    assert probed["steps"] == [] and probed["stepds"] == []
