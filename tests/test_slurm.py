"""The coordinator as a pilot job, on the real 3-node test cluster.

Each test starts its own ``salloc`` (as a user would) and runs the coordinator,
or a small driver from this module, inside it. A wrapper then probes the
allocation before it ends: which steps Slurm still lists, and whether any
``slurmstepd`` of the job is still alive. Allocations are not exclusive, so the
tests can share the cluster with other users.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest

from orchestrator.runlog import EventKind, LoggedEvent
from orchestrator.store import read_events
from tests.conftest import REPO, fast_loop, pids_of, sim, write_loop
from tests.slurm_cluster import slurm_client_env

pytestmark = [pytest.mark.slurm, pytest.mark.integration]

MPI_ENV = {"MPIR_CVAR_CH4_NETMOD": "ofi"}
"""The sims' MPI environment for multi-node steps on the fake nodes. With the default UCX netmod,
MPICH 5.0.2 (the wheel) exchanges large UCX addresses through Slurm 22.05's mpi/pmi2 server, which
garbles them for some command lines ("mpi/pmi2: value not properly terminated in client request",
then "Assertion `*addr_version == UCP_OBJECT_VERSION_V2' failed" or a hang in MPI_Init);
deterministic per argv/environment. The ofi netmod's small addresses avoid it."""

LIMIT_S = 240
"""A command inside an allocation is ended after this (``timeout`` inside salloc: see platform facts)."""

WRAPPER = """
echo "$SLURM_JOB_ID" > "$ORCH_PROBE/job"
timeout --kill-after=10 "$ORCH_LIMIT" "$@"; rc=$?
"$ORCH_PYTHON" -c 'from tests.test_slurm import probe; probe()'
exit $rc
"""


def in_allocation(
    slurm_env: dict[str, str], probe_dir: Path, argv: Sequence[str], *, nodes: int = 3, per_node: int = 5,
    extra_env: dict[str, str] | None = None, salloc: Sequence[str] | None = None,
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``salloc -N nodes --ntasks-per-node per_node`` (or ``salloc`` as given) running argv, then
    :func:`probe` inside it."""
    probe_dir.mkdir(parents=True, exist_ok=True)
    env = {**slurm_client_env(slurm_env), "ORCH_PROBE": str(probe_dir), "ORCH_LIMIT": str(LIMIT_S),
           "ORCH_PYTHON": sys.executable, "PYTHONPATH": str(REPO), **(extra_env or {})}
    head = list(salloc) if salloc else ["salloc", "-N", str(nodes), f"--ntasks-per-node={per_node}", "-t", "10"]
    cmd = [*head, "-J", "orch-test", "bash", "-c", WRAPPER, "wrapper", *argv]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=LIMIT_S + 300)
    probed = probe_dir / "probe.json"
    assert probed.exists(), f"salloc exited {proc.returncode} before the probe ran: {proc.stderr[-3000:]}"
    return proc, json.loads(probed.read_text())


def live_stepds(job: str) -> list[str]:
    """Command lines of this job's slurmstepd processes that are alive (not zombies)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X") and cmd.startswith(f"slurmstepd: [{job}."):
            found.append(cmd)
    return found


def ranks(binary: str, pattern: str) -> list[int]:
    """Sim ranks (not srun) whose command line contains pattern."""
    found = []
    for pid in pids_of(pattern):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode() == binary:
                found.append(pid)
        except OSError:
            continue
    return found


def listed_steps(job: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-s", "-j", job, "-o", "%i|%j"], capture_output=True, text=True,
                         timeout=30, check=False)
    return out.stdout.split()


def probe() -> None:
    """Run inside the allocation after the command: steps still listed, live slurmstepds."""
    out = Path(os.environ["ORCH_PROBE"])
    job = (out / "job").read_text().strip()
    steps = listed_steps(job)  # at once: the coordinator must not leave any step behind
    deadline = time.monotonic() + 10  # a finished step's slurmstepd may take a moment to exit
    while (stepds := live_stepds(job)) and time.monotonic() < deadline:
        time.sleep(0.2)
    (out / "probe.json").write_text(json.dumps({"job": job, "steps": steps, "stepds": stepds}))


def events(run_dir: Path) -> list[LoggedEvent]:
    return read_events(run_dir)


def only_run_dir(workdir: Path) -> Path:
    dirs = [d for d in workdir.iterdir() if d.is_dir() and d.name.startswith("sine-")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def wait_gone(pattern: str, timeout: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout
    while (pids := pids_of(pattern)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return pids


# ---------------------------------------------------------------- a whole campaign in salloc


def test_campaign_in_allocation_spreads_sims_and_trains_on_allocation_workers(
    slurm_env: dict[str, str], tmp_path: Path
) -> None:
    cfg = fast_loop(**{"sims.generate.ranks": 6, "policy.max_inflight": 2, "training.backend": "allocation",
                       "training.workers": 1})
    cfg["sims"]["generate"]["args"] += ["--work-ms", "500"]  # no MPI_ENV: the launcher's multi-node default
    loop = write_loop(tmp_path, cfg)
    work = tmp_path / "runs"
    proc, probed = in_allocation(slurm_env, tmp_path / "probe", [
        sys.executable, "-m", "orchestrator", "run", str(loop), "--workdir", str(work), "--no-live"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    job = probed["job"]
    run_dir = only_run_dir(work)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["target_met"] is True and summary["sims_failed"] == 0
    ev = events(run_dir)

    # exactly the allocation: 5 slots per node, one kept for the Dask worker on the last node
    start = next(e for e in ev if e.kind is EventKind.CAMPAIGN_START)
    assert start["sim_slots"] == {"n1": 5, "n2": 5, "n3": 4}

    # every sim an srun step of this job, with --exact and its run id as step name
    starts = {e["run_id"]: e for e in ev if e.kind is EventKind.SIM_START}
    ends = {e["run_id"]: e for e in ev if e.kind is EventKind.SIM_END}
    assert starts.keys() == ends.keys() and len(ends) == summary["sims_launched"]
    for run_id, e in starts.items():
        argv = e["argv"]
        assert argv[:3] == ["srun", "--exact", "--mpi=pmi2"], argv
        assert argv[argv.index("--job-name") + 1] == run_id
    steps = [e["step_id"] for e in ends.values()]
    assert len(set(steps)) == len(steps) and all(s.startswith(f"{job}.") for s in steps)

    # generate sims spread over n1..n3, multi-node steps among them, laid out as placed
    gens = [e for e in ends.values() if e["role"] == "generate"]
    assert {n for e in gens for n in e["nodes"]} == {"n1", "n2", "n3"}
    assert any(len(e["nodes"]) > 1 for e in gens)
    for e in ends.values():
        assert sorted(map(tuple, e["tasks_per_node"])) == sorted(map(tuple, starts[e["run_id"]]["placement"]))

    # at least two steps ran at the same time, and Slurm never made one wait for another
    spans = [(starts[r]["mono"], ends[r]["mono"]) for r in ends]
    assert any(a0 < b1 and b0 < a1 for (a0, a1), (b0, b1) in combinations(spans, 2)), spans
    for log in run_dir.glob("sims/*/srun.log"):
        assert "step creation temporarily disabled" not in log.read_text(), log

    # training ran on Dask workers started as a step of this allocation, on the kept slot
    backend = next(e for e in ev if e.kind is EventKind.TRAINING_BACKEND)
    assert backend["backend"] == "allocation" and backend["tls"] is True  # even on loopback
    assert backend["step_id"].startswith(f"{job}.") and backend["nodes"] == ["n3"]
    assert len(backend["workers"]) == 1 and backend["scheduler"].startswith("tls://127.0.0.1:")
    assert any(e.kind is EventKind.TRAIN_END for e in ev)

    # nothing left: no step listed, no slurmstepd of the job alive, no sim or worker process
    assert probed["steps"] == [] and probed["stepds"] == []
    assert pids_of(str(run_dir)) == []


def test_readme_slurm_line_runs_the_sine_example(slurm_env: dict[str, str], tmp_path: Path) -> None:
    """The README's salloc line, then its `run` of the sine example, exactly as a user types them."""
    readme = (REPO / "README.md").read_text()
    line = re.search(r"`(salloc [^`]+)` then the same `run`", readme)
    assert line, "the README no longer shows its salloc line where this test looks"
    work = tmp_path / "runs"
    proc, probed = in_allocation(slurm_env, tmp_path / "probe", [
        sys.executable, "-m", "orchestrator", "run", "examples/sine/loop.yml", "--workdir", str(work), "--no-live"],
        salloc=shlex.split(line.group(1)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((only_run_dir(work) / "summary.json").read_text())
    assert summary["target_met"] is True and summary["registered_model"] is not None
    assert probed["steps"] == [] and probed["stepds"] == []


# ---------------------------------------------------------------- a hung sim


async def _hang_and_cancel(work: Path) -> dict[str, Any]:
    """Driver (inside salloc): a hung 3-rank sim over two nodes, ended by its timeout, then by cancel."""
    from orchestrator.allocation import Allocation, Placement
    from orchestrator.launchers.base import LaunchRequest
    from orchestrator.launchers.srun import SrunLauncher, steps_named

    alloc = Allocation.detect()
    assert alloc.job_id is not None
    launcher = SrunLauncher(alloc)
    placement = Placement(((alloc.nodes[0].name, 2), (alloc.nodes[1].name, 1)))
    args = ["--points-per-rank", "4", "--seed", "1", "--fault-seed", "1", "--hang-prob", "1"]

    def request(run_id: str, timeout: float) -> LaunchRequest:
        return LaunchRequest(run_id=run_id, role="test", binary=sim("sim-faulty"), args=args, ranks=3,
                             workdir=work / run_id, timeout_s=timeout, ncols=2, placement=placement, env=MPI_ENV)

    t0 = time.monotonic()
    hung = await launcher.run(request("hang-000001", 2.0))
    report: dict[str, Any] = {
        "outcome": hung.outcome.value, "message": hung.message, "info": hung.info,
        "elapsed": time.monotonic() - t0, "left": pids_of(str(work / "hang-000001")),
        "steps": listed_steps(alloc.job_id),
    }
    binary = str(sim("sim-faulty"))
    task = asyncio.ensure_future(launcher.run(request("hang-000002", 120.0)))
    deadline = time.monotonic() + 60
    while not (await steps_named(alloc.job_id, "hang-000002") and len(ranks(binary, "hang-000002")) == 3):
        assert not task.done(), f"the second hung sim ended early: {task.result().message}"
        assert time.monotonic() < deadline, "the second hung sim never started"
        await asyncio.sleep(0.1)
    report["running_before_cancel"] = len(ranks(binary, "hang-000002"))
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        report["cancelled"] = True
    report["left_after_cancel"] = pids_of(str(work / "hang-000002"))
    report["steps_after_cancel"] = listed_steps(alloc.job_id)
    return report


def hang_driver() -> None:
    work = Path(os.environ["ORCH_WORK"])
    report = asyncio.run(_hang_and_cancel(work))
    (work / "report.json").write_text(json.dumps(report))


def test_hung_sim_is_ended_by_its_timeout_with_nothing_left(slurm_env: dict[str, str], tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    proc, probed = in_allocation(
        slurm_env, tmp_path / "probe", [sys.executable, "-c", "from tests.test_slurm import hang_driver as d; d()"],
        nodes=2, per_node=2, extra_env={"ORCH_WORK": str(work)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((work / "report.json").read_text())
    assert report["outcome"] == "timeout", report
    assert report["elapsed"] < 30, report
    assert report["info"]["step_id"].startswith(f"{probed['job']}.")
    assert sorted(c for _, c in report["info"]["tasks_per_node"]) == [1, 2]  # both nodes, as placed
    assert report["left"] == [], "sim-faulty ranks or srun survived the timeout"
    assert report["steps"] == [], "the timed-out step is still listed"
    assert report["running_before_cancel"] == 3 and report["cancelled"] is True
    assert report["left_after_cancel"] == [] and report["steps_after_cancel"] == []
    assert probed["steps"] == [] and probed["stepds"] == []
    assert pids_of(str(work)) == []


# ---------------------------------------------------------------- TLS on the allocation backend


async def _tls_workers(work: Path) -> dict[str, Any]:
    """Driver (inside salloc): the allocation backend forced onto its network path (TLS)."""
    import operator

    from orchestrator.allocation import Allocation, Node
    from orchestrator.config import TrainingConfig
    from orchestrator.errors import TrainingError
    from orchestrator.training import slurm as ts

    ts.plan_listen = lambda *a, **k: ts.ListenPlan("127.0.0.1", tls=True)  # every fake node is this host
    alloc = Allocation.detect()
    backend = ts.AllocationBackend(TrainingConfig(backend="allocation", workers=2), allocation=alloc,
                                   nodes=[Node(n.name, 1) for n in alloc.nodes], run_dir=work / "sine-tls")
    try:
        client = await backend.start()
        total = await client.submit(operator.add, 40, 2)
        info = backend.describe()
        ports = await asyncio.to_thread(_dask_ports, str(work / "sine-tls"))
        answers = await asyncio.to_thread(_http_answers, ports)
    finally:
        await backend.close()
    modes = sorted(oct(p.stat().st_mode & 0o777) for p in (work / "sine-tls" / "dask" / "tls").iterdir())
    assert alloc.job_id is not None
    report = {"total": total, "info": info, "modes": modes, "steps": listed_steps(alloc.job_id),
              "left": pids_of(str(work / "sine-tls")), "ports": ports, "http_answers": answers}

    # a worker step Slurm refuses (a node outside the allocation) fails start() at once, with srun's reason
    outside = sorted({"n1", "n2", "n3"} - set(alloc.node_names))[0]
    bad = ts.AllocationBackend(TrainingConfig(backend="allocation", workers=1), allocation=alloc,
                               nodes=[Node(outside, 1)], run_dir=work / "sine-bad")
    t0 = time.monotonic()
    try:
        await bad.start()
    except TrainingError as exc:
        report["refused"] = str(exc)
    finally:
        await bad.close()
    report["refused_s"] = time.monotonic() - t0
    return report


def _dask_ports(marker: str) -> list[int]:
    """TCP ports on which this process (the scheduler) and the srun'd workers and nannies (``marker`` in their
    command lines) listen."""
    import psutil

    pids = {os.getpid()}
    for pid in pids_of(marker):  # srun and the nannies; the workers are the nannies' children
        try:
            pids |= {pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))}
        except psutil.NoSuchProcess:
            continue
    return sorted({c.laddr.port for c in psutil.net_connections("inet")
                   if c.pid in pids and c.status == psutil.CONN_LISTEN})


def _http_answers(ports: list[int]) -> list[str]:
    """``port path: status line`` for every port that answers plain HTTP or TLS without a client certificate."""
    import ssl

    answered = []
    for port in ports:
        for tls in (False, True):
            for path in ("/health", "/info/main/workers.html"):
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                        ctx = ssl.create_default_context()
                        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                        conn = ctx.wrap_socket(raw) if tls else raw
                        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                        line = conn.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace")
                except (OSError, ssl.SSLError):
                    continue
                if line.startswith("HTTP/"):
                    answered.append(f"{port} {path} tls={tls}: {line}")
    return answered


def tls_driver() -> None:
    work = Path(os.environ["ORCH_WORK"])
    (work / "report.json").write_text(json.dumps(asyncio.run(_tls_workers(work))))


def test_allocation_backend_over_tls(slurm_env: dict[str, str], tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    proc, probed = in_allocation(
        slurm_env, tmp_path / "probe", [sys.executable, "-c", "from tests.test_slurm import tls_driver as d; d()"],
        nodes=2, per_node=1, extra_env={"ORCH_WORK": str(work)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((work / "report.json").read_text())
    info = report["info"]
    assert report["total"] == 42
    assert info["tls"] is True and info["scheduler"].startswith("tls://127.0.0.1:")
    assert len(info["workers"]) == 2 and all(w.startswith("tls://") for w in info["workers"])
    assert len(info["nodes"]) == 2 and info["step_id"].startswith(f"{probed['job']}.")
    assert report["modes"] == ["0o600"] * 3
    # scheduler, two workers and their nannies listen, and none answers HTTP (plain, or TLS without the certificate)
    assert len(report["ports"]) >= 5 and report["http_answers"] == [], report
    assert report["steps"] == [] and report["left"] == []
    assert probed["stepds"] == []
    assert "Unable to create step" in report["refused"] and report["refused_s"] < 20, report


# ---------------------------------------------------------------- jobqueue


def test_campaign_with_jobqueue_workers(slurm_env: dict[str, str], tmp_path: Path) -> None:
    loop = write_loop(tmp_path, fast_loop(**{"training.backend": "jobqueue", "training.workers": 1,
                                             "training.jobqueue": {"walltime": "00:05:00"}}))
    work = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", str(loop), "--workdir", str(work), "--no-live"],
        env=slurm_client_env(slurm_env), cwd=REPO, capture_output=True, text=True, timeout=LIMIT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = only_run_dir(work)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["target_met"] is True
    ev = events(run_dir)
    backend = next(e for e in ev if e.kind is EventKind.TRAINING_BACKEND)
    assert backend["backend"] == "jobqueue" and backend["tls"] is True  # even on loopback
    assert len(backend["jobs"]) == 1 and len(backend["workers"]) == 1
    assert any(e.kind is EventKind.TRAIN_END for e in ev)
    # closing the cluster cancelled the worker job, and its processes went with it
    out = subprocess.run(["squeue", "-h", "-j", ",".join(backend["jobs"]), "-o", "%i %T"],
                         env={**os.environ, **slurm_env}, capture_output=True, text=True, timeout=30)
    assert "RUNNING" not in out.stdout and "PENDING" not in out.stdout, out.stdout
    assert wait_gone(backend["scheduler"]) == [], "a dask worker of the campaign is still running"
    assert pids_of(str(run_dir)) == []
