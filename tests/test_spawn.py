"""The spawn launcher with real sims, real spawn agents, real MPI_Comm_spawn (and a real Slurm)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchestrator.allocation import Allocation, Node, Placement
from orchestrator.launchers.base import LaunchRequest, Outcome, SimResult
from orchestrator.launchers.mpiexec import MpiexecLauncher
from orchestrator.launchers.spawn import WRAPPER, SpawnLauncher
from orchestrator.runlog import EventKind
from orchestrator.store import read_events
from tests.conftest import fast_loop, pids_of, sim, write_loop
from tests.slurm_cluster import slurm_client_env

pytestmark = pytest.mark.integration

FAULTY = ["--points-per-rank", "4", "--seed", "1", "--fault-seed", "1"]


def request(tmp_path: Path, binary: str, args: list[str], ranks: int, *, run_id: str = "s-000001",
            nrows: int | None = None, timeout: float = 30, placement: Placement | None = None) -> LaunchRequest:
    return LaunchRequest(run_id=run_id, role="test", binary=sim(binary), args=args, ranks=ranks,
                         workdir=tmp_path / run_id, timeout_s=timeout, ncols=2, nrows=nrows, placement=placement)


def procs_in(path: Path) -> list[int]:
    """Processes working in ``path`` (spawned ranks) or naming it (their wrappers)."""
    found = set(pids_of(str(path)))
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.readlink(d / "cwd").startswith(str(path)):
                    found.add(int(d.name))
            except OSError:
                continue
    return sorted(found)


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


async def run_and_close(launcher: SpawnLauncher, *reqs: LaunchRequest) -> list[SimResult]:
    try:
        return list(await asyncio.gather(*(launcher.run(r) for r in reqs)))
    finally:
        await launcher.close()


# ------------------------------------------------------------------ commands as data


def test_golden_commands_local(tmp_path: Path) -> None:
    launcher = SpawnLauncher(Allocation.local(), python="/py")
    req = LaunchRequest(run_id="check-000003", role="check", binary=Path("/x/sim-cheap"), args=["--x", "0.5"],
                        ranks=4, workdir=tmp_path / "r", timeout_s=5, ncols=2, env={"OMP_NUM_THREADS": "1"})
    spawn = [launcher._env_tool, "OMP_NUM_THREADS=1", "SIMKIT_EXPECT_RANKS=4", "/bin/sh", "-c", WRAPPER, "sh",
             str(tmp_path / "r/stdout.log"), str(tmp_path / "r/stderr.log"), "/x/sim-cheap", "--x", "0.5"]
    assert launcher.spawn_argv(req) == spawn
    assert launcher.spawn_info(req) == {"wdir": str(tmp_path / "r")}
    assert launcher.command(req) == ["/py", "-m", "orchestrator.launchers.spawn_agent", "--mode", "local",
                                     "MPI_Comm_spawn", "maxprocs=4", f"info:wdir={tmp_path / 'r'}", *spawn]
    env = launcher.agent_env()
    assert env["HYDRA_LAUNCHER"] == "fork"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)  # hydra's mpiexec


def test_golden_commands_in_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_NNODES", "3")
    monkeypatch.setenv("SLURM_DISTRIBUTION", "cyclic")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    alloc = Allocation(nodes=(Node("n1", 8), Node("n2", 8), Node("n3", 8)), in_slurm=True, job_id="77")
    launcher = SpawnLauncher(alloc, python="/py")
    req = LaunchRequest(run_id="g-1", role="generate", binary=Path("/x/sim-expensive"), args=[], ranks=4,
                        workdir=tmp_path / "g", timeout_s=5, ncols=2, placement=Placement((("n2", 3), ("n3", 1))))
    assert launcher.agent_argv() == ["srun", "--mpi=pmi2", "-N1", "-n1", "--overlap", "-u", "--nodelist=n1",
                                     "--job-name=spawn-agent", "/py", "-m", "orchestrator.launchers.spawn_agent",
                                     "--mode", "slurm"]
    assert launcher.spawn_info(req) == {"wdir": str(tmp_path / "g"), "host": "n2,n2,n2,n3"}
    env = launcher.agent_env()  # becomes the environment of every spawned srun
    assert env["SLURM_JOB_ID"] == "77" and "SLURM_NNODES" not in env
    assert env["SLURM_OVERLAP"] == "1" and env["SLURM_DISTRIBUTION"] == "arbitrary"


# ------------------------------------------------------------------ results


def test_tables_with_several_sims_in_flight(tmp_path: Path) -> None:
    expensive = ["--points-per-rank", "32", "--lo", "-1", "--hi", "2", "--seed", "5"]
    reqs = [request(tmp_path, "sim-cheap", ["--x", "0.5"], 4, run_id="c1", nrows=1),
            request(tmp_path, "sim-expensive", expensive, 8, run_id="e1", nrows=256),
            request(tmp_path, "sim-cheap", ["--x", "-3.0"], 4, run_id="c2", nrows=1)]
    launcher = SpawnLauncher(Allocation.local())

    async def go() -> tuple[list[SimResult], SimResult]:
        try:
            together = list(await asyncio.gather(*(launcher.run(r) for r in reqs)))
            again = await launcher.run(request(tmp_path, "sim-noop", [], 4, run_id="n1", nrows=1))
            return together, again
        finally:
            await launcher.close()

    (c1, e1, c2), again = asyncio.run(go())
    for r in (c1, e1, c2, again):
        assert r.outcome is Outcome.OK, r.message
        assert r.returncode == 0 and r.info["remote_size"] == r.request.ranks
    assert c1.table is not None and c2.table is not None and e1.table is not None
    assert c1.table[0, 0] == 0.5 and abs(c1.table[0, 1] - math.sin(0.5)) < 1e-12
    assert c2.table[0, 0] == -3.0 and abs(c2.table[0, 1] - math.sin(-3.0)) < 1e-12
    assert e1.table.shape == (256, 2) and np.allclose(e1.table[:, 1], np.sin(e1.table[:, 0]), atol=1e-15)
    assert len(np.unique(e1.table[:, 0])) == 256
    agents = {r.info["pid"] for r in (c1, e1, c2)}
    assert len(agents) == 3, "one agent per sim in flight"
    assert again.info["pid"] in agents, "a finished agent is reused"
    assert again.table is not None and again.table[0, 0] == 4, "sim-noop reports its world size"
    # the same binary under mpiexec gives the same rows
    ref = asyncio.run(MpiexecLauncher().run(request(tmp_path, "sim-expensive", expensive, 8, run_id="m1")))
    assert ref.table is not None and np.array_equal(ref.table, e1.table)
    assert not [pid for pid in agents if running(pid)], "agents survived close()"
    assert procs_in(tmp_path) == []


@pytest.mark.parametrize(("name", "binary", "args", "outcome", "text"), [
    ("crash", "sim-faulty", [*FAULTY, "--crash-prob", "1"], Outcome.FAILED, "injected segfault on rank 2"),
    ("exit", "sim-faulty", [*FAULTY, "--exit-prob", "1"], Outcome.FAILED, "injected exit 9"),
    ("abort", "sim-cheap", ["--x", "1", "--terms", "0"], Outcome.FAILED, "--terms must be in 1..200"),
    ("usage", "sim-cheap", ["--x", "1", "--bogus", "1"], Outcome.FAILED, "unknown option '--bogus'"),
    ("hang", "sim-faulty", [*FAULTY, "--hang-prob", "1"], Outcome.TIMEOUT, "timed out after 2 s"),
])
def test_failures_leave_no_process(tmp_path: Path, name: str, binary: str, args: list[str], outcome: Outcome,
                                   text: str) -> None:
    launcher = SpawnLauncher(Allocation.local())
    bad = request(tmp_path, binary, args, 3, run_id=name, timeout=2 if name == "hang" else 30)
    after = request(tmp_path, "sim-noop", [], 2, run_id="after", nrows=1)

    async def go() -> tuple[SimResult, list[int], SimResult]:
        try:
            t0 = time.monotonic()
            failed = await launcher.run(bad)
            assert time.monotonic() - t0 < 15
            left = procs_in(bad.workdir)  # checked before anything else runs
            return failed, left, await launcher.run(after)
        finally:
            await launcher.close()

    failed, left, ok = asyncio.run(go())
    assert failed.outcome is outcome, failed.message
    assert text in failed.message
    assert failed.table is None
    assert left == [], f"processes of the {name} run survived it"
    assert not running(failed.info["pid"]), "a failed agent is replaced, not reused"
    assert ok.outcome is Outcome.OK and ok.info["pid"] != failed.info["pid"]
    assert procs_in(tmp_path) == []


def test_an_agent_killed_while_idle_is_replaced(tmp_path: Path) -> None:
    launcher = SpawnLauncher(Allocation.local())

    async def go() -> tuple[SimResult, set[tuple[int, int]], SimResult]:
        try:
            first = await launcher.run(request(tmp_path, "sim-noop", [], 2, run_id="n1", nrows=1))
            agent, = launcher._idle
            below = set(agent.known)  # hydra's mpiexec and proxy, the ranks of n1
            os.kill(agent.pid, signal.SIGKILL)
            second = await launcher.run(request(tmp_path, "sim-noop", [], 2, run_id="n2", nrows=1))
            return first, below, second
        finally:
            await launcher.close()

    first, below, second = asyncio.run(go())
    assert first.ok and second.ok, second.message
    assert second.info["pid"] != first.info["pid"]
    assert below and not [pid for pid, _ in below if running(pid)], "the dead agent's hydra was left behind"


@pytest.mark.parametrize(("fault", "message"), [("nan", "non-finite value"),
                                                ("wrong-shape", "expected 2 columns, got 3")])
def test_malformed_rows_are_rejected(tmp_path: Path, fault: str, message: str) -> None:
    r, = asyncio.run(run_and_close(SpawnLauncher(Allocation.local()),
                                   request(tmp_path, "sim-faulty", [*FAULTY, f"--{fault}-prob", "1"], 2)))
    assert r.outcome is Outcome.MALFORMED
    assert message in r.message and str(tmp_path) in r.message
    assert r.table is None


@pytest.mark.parametrize("fault", ["nan", "wrong-shape"])
def test_no_rank_exits_before_its_parent_has_the_rows(tmp_path: Path, fault: str) -> None:
    """Ranks that sent their rows and exited while the parent was still inside MPI_Comm_spawn made
    the spawn fail (UCX: shmat of a gone child's segment), so on a loaded box a malformed run read
    as FAILED. simkit now holds every rank until the parent acknowledges the rows: with the agent
    frozen right after the ranks appear, they are all still there, and the run is MALFORMED."""
    from orchestrator.procs import all_processes, find_ranks, wait_gone

    launcher = SpawnLauncher(Allocation.local())
    # 0.5 s of work before the rows: on a loaded box the whole run must not fit between two looks.
    req = request(tmp_path, "sim-faulty", [*FAULTY, f"--{fault}-prob", "1", "--work-ms", "500"], 2)

    async def go() -> tuple[SimResult, bool]:
        try:
            run = asyncio.ensure_future(launcher.run(req))
            ranks: list[tuple[int, int]] = []
            while len(ranks) < 2:  # both ranks exist (the agent is in, or just past, MPI_Comm_spawn)
                assert not run.done(), run.result().message
                await asyncio.sleep(0.002)
                ranks = [(p.pid, p.start) for p in find_ranks(all_processes(), str(req.workdir.absolute()),
                                                                  str(req.binary.absolute()))]
            agent = next(iter(launcher._busy))
            pid = int(agent.ready["pid"])
            os.kill(pid, signal.SIGSTOP)
            try:  # a sim's whole run is milliseconds: 2 s is ample time to exit if it could
                exited = await asyncio.to_thread(wait_gone, ranks, 2.0)
            finally:
                os.kill(pid, signal.SIGCONT)
            return await run, exited
        finally:
            await launcher.close()

    r, exited = asyncio.run(go())
    assert not exited, "the ranks exited while their parent did not have their rows yet"
    assert r.outcome is Outcome.MALFORMED, r.message


def test_cancellation_kills_the_ranks(tmp_path: Path) -> None:
    launcher = SpawnLauncher(Allocation.local())
    req = request(tmp_path, "sim-faulty", [*FAULTY, "--hang-prob", "1"], 2, run_id="cx")

    async def go() -> None:
        task = asyncio.ensure_future(launcher.run(req))
        for _ in range(100):
            if len(procs_in(req.workdir)) >= 2:
                break
            await asyncio.sleep(0.05)
        assert len(procs_in(req.workdir)) >= 2, "the sim should be running"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await launcher.close()

    asyncio.run(go())
    assert procs_in(req.workdir) == []


# ------------------------------------------------------------------ whole campaigns


def spawn_loop(tmp_path: Path) -> Path:
    cfg = fast_loop(**{"sims.check.launcher": "spawn", "sims.generate.launcher": "spawn"})
    return write_loop(tmp_path, cfg)


def check_campaign(proc: subprocess.CompletedProcess[str], work: Path) -> list[dict[str, Any]]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    run_dir = next(d for d in work.iterdir() if d.is_dir() and d.name.startswith("sine-"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["target_met"] is True and summary["successes"] == 5
    assert summary["sims_failed"] == 0
    events = read_events(run_dir)
    starts = [e for e in events if e.kind is EventKind.SIM_START]
    ranks = {e["run_id"]: e["ranks"] for e in starts}
    ends = [e for e in events if e.kind is EventKind.SIM_END]
    assert ends and all(e["launcher"] == "spawn" and e["outcome"] == "ok" for e in ends)
    assert all(e["remote_size"] == ranks[e["run_id"]] for e in ends), "world size = ranks asked for"
    assert all("MPI_Comm_spawn" in e["argv"] for e in starts)
    assert procs_in(run_dir) == [], "sims left running"
    return starts


def test_reference_campaign_with_spawn(tmp_path: Path) -> None:
    work = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(spawn_loop(tmp_path)), "--workdir",
                           str(work), "--no-live"], capture_output=True, text=True, timeout=240)
    starts = check_campaign(proc, work)
    assert all("--mode" in e["argv"] and "local" in e["argv"] for e in starts)


SALLOC = ["salloc", "-N3", "--ntasks-per-node=4", "--immediate=60", "-t", "4", "-J", "test-spawn"]
"""Three fake nodes, 4 slots each; salloc itself gives up (and cancels its request) if the shared
test cluster stays busy, so no pending job outlives the test."""


def salloc(argv: list[str], slurm_env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*SALLOC, "timeout", str(int(timeout)), *argv], capture_output=True, text=True,
                          timeout=timeout + 150, env=slurm_client_env(slurm_env))
    if proc.returncode != 0 and "Unable to allocate resources" in proc.stderr:
        pytest.skip(f"the Slurm test cluster had no room for salloc -N3 within 60 s: {proc.stderr.strip()[-300:]}")
    return proc


@pytest.mark.slurm
def test_reference_campaign_with_spawn_under_salloc(tmp_path: Path, slurm_env: dict[str, str]) -> None:
    work = tmp_path / "runs"
    proc = salloc([sys.executable, "-m", "orchestrator", "run", str(spawn_loop(tmp_path)), "--workdir", str(work),
                   "--no-live"], slurm_env)
    starts = check_campaign(proc, work)
    for e in starts:  # every spawn carries its placement as the host info key
        hosts = [name for name, count in e["placement"] for _ in range(count)]
        assert e["argv"][0] == "srun" and f"info:host={','.join(hosts)}" in e["argv"]


INSIDE = textwrap.dedent("""
    import asyncio, json, os, sys
    from pathlib import Path
    from orchestrator.allocation import Allocation, Placement
    from orchestrator.launchers.base import LaunchRequest
    from orchestrator.launchers.spawn import SpawnLauncher

    work, binary, faulty, out = (Path(a) for a in sys.argv[1:5])

    def nodes(wdir):
        found = []
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and os.readlink(d / "cwd") == str(wdir):
                    env = (d / "environ").read_bytes().split(b"\\0")
                    found += [e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"SLURMD_NODENAME=")]
            except OSError:
                pass
        return sorted(found)

    async def main():
        launcher = SpawnLauncher(Allocation.detect())
        placed = LaunchRequest(run_id="placed", role="t", binary=binary, args=["--work-ms", "2000"], ranks=4,
                               workdir=work / "placed", timeout_s=60, ncols=2, nrows=1,
                               placement=Placement((("n2", 3), ("n3", 1))))
        hang = LaunchRequest(run_id="hang", role="t", binary=faulty, args=["--hang-prob", "1", "--fault-seed", "1"],
                             ranks=3, workdir=work / "hang", timeout_s=2, ncols=2,
                             placement=Placement((("n1", 2), ("n3", 1))))
        try:
            task = asyncio.ensure_future(launcher.run(placed))
            seen = []
            for _ in range(300):
                seen = nodes(placed.workdir)
                if len(seen) == 4 or task.done():
                    break
                await asyncio.sleep(0.02)
            ok = await task
            timed_out = await launcher.run(hang)
        finally:
            await launcher.close()
        out.write_text(json.dumps({"placed": [ok.outcome.value, ok.message, ok.info.get("remote_size"), seen],
                                   "hang": [timed_out.outcome.value, timed_out.message, nodes(hang.workdir)]}))

    asyncio.run(main())
""")


@pytest.mark.slurm
def test_placement_across_nodes_and_timeout_in_slurm(tmp_path: Path, slurm_env: dict[str, str]) -> None:
    script = tmp_path / "inside.py"
    script.write_text(INSIDE)
    out = tmp_path / "out.json"
    proc = salloc([sys.executable, str(script), str(tmp_path), str(sim("sim-noop")), str(sim("sim-faulty")),
                   str(out)], slurm_env, timeout=120)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["placed"][:3] == ["ok", "ok", 4]
    assert data["placed"][3] == ["n2", "n2", "n2", "n3"], "ranks run where the slot pool placed them"
    assert data["hang"][0] == "timeout" and data["hang"][2] == []
    assert procs_in(tmp_path) == []


DIES_IN_INIT = textwrap.dedent("""
    import asyncio, json, sys, time
    from pathlib import Path
    from orchestrator.allocation import Allocation, Placement
    from orchestrator.launchers.base import LaunchRequest
    from orchestrator.launchers.spawn import SpawnLauncher

    work, binary, out = (Path(a) for a in sys.argv[1:4])

    async def main():
        launcher = SpawnLauncher(Allocation.detect())
        # A PMI channel that is not there: the ranks' MPI_Init fails in PMI, as pmi2's "invalid client
        # request" does, and MPI_Comm_spawn in the agent would wait for them until the timeout.
        req = LaunchRequest(run_id="init", role="t", binary=binary, args=[], ranks=2, workdir=work / "init",
                            timeout_s=60, ncols=2, nrows=1, placement=Placement((("n2", 2),)),
                            env={"PMI_FD": "1000"})
        t0 = time.monotonic()
        try:
            r = await launcher.run(req)
        finally:
            await launcher.close()
        out.write_text(json.dumps({"outcome": r.outcome.value, "message": r.message, "s": time.monotonic() - t0}))

    asyncio.run(main())
""")


@pytest.mark.slurm
def test_ranks_dying_in_mpi_init_are_noticed_at_once_not_at_the_timeout(tmp_path: Path,
                                                                        slurm_env: dict[str, str]) -> None:
    script = tmp_path / "inside.py"
    script.write_text(DIES_IN_INIT)
    out = tmp_path / "out.json"
    proc = salloc([sys.executable, str(script), str(tmp_path), str(sim("sim-noop")), str(out)], slurm_env, timeout=120)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["outcome"] == "failed", data
    assert "exited before MPI_Init was done" in data["message"] and "PMI_Init" in data["message"], data
    assert data["s"] < 30, f"noticed after {data['s']:.1f} s (the timeout is 60 s)"
    assert procs_in(tmp_path) == []
