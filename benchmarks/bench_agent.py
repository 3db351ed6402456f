"""Benchmark: many one-rank sims through the node agent vs one plain srun step each.

One allocation on the test cluster (``salloc -N3 --ntasks-per-node=8``); inside it,
``COUNT`` one-rank ``sim-noop`` runs are placed by the real ``SlotPool`` over the 3 fake
nodes (every slot kept busy) and run through
:class:`~orchestrator.launchers.agent.NodeAgentLauncher` (with the sim's MPI, detected as
a campaign does: a one-rank MPICH run is a singleton, no mpiexec) and through
:class:`~orchestrator.launchers.srun.SrunLauncher`, in ``CHUNKS`` alternating chunks
(agent, srun, agent, ...) so that a busy machine slows both alike. Figures: the
throughput ratio (agent sims/s over srun sims/s; goal >= 3) and the srun steps the
agent path created, counted by Slurm itself: the job's step ids before and after each
agent chunk (goal: the node count).

    python benchmarks/run.py agent
    python benchmarks/bench_agent.py --count 300      # a smaller count, same method
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.cluster import cluster_env, noop_sim  # noqa: E402

COUNT = 2000
CHUNKS = 4
NODES = 3
PER_NODE = 8


def last_step_id() -> int:
    """The id Slurm gives a new step of this job now (a probe step, which counts itself)."""
    out = subprocess.run(["srun", "--overlap", "-N1", "-n1", "-c1", "--mpi=none", "bash", "-c", "echo $SLURM_STEP_ID"],
                         capture_output=True, text=True, timeout=60, check=True)
    return int(out.stdout.split()[-1])


async def _through(launcher: object, count: int, work: Path, tag: str, first: int = 0,
                   env: dict[str, str] | None = None) -> float:
    from orchestrator.allocation import Allocation, SlotPool
    from orchestrator.launchers.base import Launcher, LaunchRequest, Outcome

    assert isinstance(launcher, Launcher)
    alloc = Allocation.detect()
    pool = SlotPool(alloc.nodes)
    binary = noop_sim()

    async def one(i: int) -> None:
        placement = await pool.acquire(1)
        try:
            req = LaunchRequest(run_id=f"{tag}-{i:05d}", role="bench", binary=binary, args=[], ranks=1, env=env or {},
                                workdir=work / tag / f"{i:05d}", timeout_s=120, ncols=2, nrows=1,
                                placement=placement)
            result = await launcher.run(req)
        finally:
            pool.release(placement)
        if result.outcome is not Outcome.OK:
            raise RuntimeError(f"{tag} run {i}: {result.outcome.value}: {result.message}")

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(first, first + count)))
    return time.perf_counter() - t0


async def _measure(count: int, work: Path) -> dict[str, float]:
    from orchestrator.allocation import Allocation
    from orchestrator.launchers.agent import NodeAgentLauncher
    from orchestrator.launchers.srun import SrunLauncher
    from orchestrator.mpi import mpi_for

    alloc = Allocation.detect()
    mpi = mpi_for(noop_sim())
    agent = NodeAgentLauncher(alloc, mpi=mpi, log_dir=work / "agents")
    same_env = mpi.local_env(1)  # the srun arm gets the UCX settings the agent gives its singletons
    srun = SrunLauncher(alloc)
    agent_s = srun_s = 0.0
    agent_steps = 0
    per_chunk = count // CHUNKS
    try:
        for chunk in range(CHUNKS):
            first = chunk * per_chunk
            before = last_step_id()
            agent_s += await _through(agent, per_chunk, work, "agent", first)
            agent_steps += last_step_id() - before - 1  # the probe counts itself
            srun_s += await _through(srun, per_chunk, work, "srun", first, same_env)
    finally:
        await agent.close()
    count = per_chunk * CHUNKS
    return {"agent_s": agent_s, "srun_s": srun_s, "agent_steps": agent_steps,
            "agent_started": agent.steps_started, "count": count, "nodes": len(alloc.nodes),
            "job": float(alloc.job_id or 0)}


def inside(out: Path, count: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_agent_") as tmp:
        data = asyncio.run(_measure(count, Path(tmp)))
    out.write_text(json.dumps(data))


def run(record: Callable[[str, float, str], None], count: int = COUNT) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_agent_") as tmp:
        out = Path(tmp) / "out.json"
        argv = ["salloc", f"-N{NODES}", f"--ntasks-per-node={PER_NODE}", "-t", "30", "-J", "bench-agent",
                "timeout", "1700", sys.executable, str(Path(__file__).resolve()), "--inside", str(out),
                "--count", str(count)]
        env = {**cluster_env(), "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800, check=False)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-2000:]}")
        d = json.loads(out.read_text())
    how = (f"{d['count']} one-rank sim-noop (MPICH singletons via the agent; the srun arm with the same "
           f"node-local UCX settings) over {d['nodes']} fake nodes x "
           f"{PER_NODE} slots, {CHUNKS} alternating chunks per path (job {int(d['job'])})")
    record(f"agent_sims_per_s_{count}", d["count"] / d["agent_s"], f"through the node agent; {how}")
    record(f"srun_sims_per_s_{count}", d["count"] / d["srun_s"], f"one srun step each; {how}")
    record("agent_throughput_ratio", d["srun_s"] / d["agent_s"], f"agent sims/s over srun sims/s; goal >= 3; {how}")
    record(f"srun_steps_agent_{count}", d["agent_steps"],
           f"steps Slurm created for the agent path (step ids); goal = node count ({d['nodes']}); {how}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inside", type=Path, help="measure in the current allocation, write JSON here")
    parser.add_argument("--count", type=int, default=COUNT)
    args = parser.parse_args(argv)
    if args.inside is not None:
        inside(args.inside, args.count)
        return 0
    run(lambda key, value, note="": print(f"{key:32s} {value:12.4g}   {note}"), args.count)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
