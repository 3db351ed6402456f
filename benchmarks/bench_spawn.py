"""Benchmark: launch-to-result latency of a 4-rank ``sim-noop`` under each launcher.

From one run:

* ``spawn``: :class:`orchestrator.launchers.spawn.SpawnLauncher` (its whole
  ``run``: request to the warm spawn agent, ``MPI_Comm_spawn``, rows over the
  intercommunicator, ``Disconnect``, the table back and checked);
* ``bare spawn``: the floor for that, a tiny mpi4py script in one process doing
  ``Spawn`` + ``Recv`` + ``Disconnect`` of the same binary in a loop (this file
  with ``--bare``);
* ``mpiexec``: :class:`orchestrator.launchers.mpiexec.MpiexecLauncher`;
* ``srun``: :class:`orchestrator.launchers.srun.SrunLauncher` inside ``salloc``
  on the throwaway test cluster (this file with ``--inside-srun``), skipped with
  a note when the cluster cannot start.

Spawn, bare spawn and mpiexec are measured in alternating blocks so drift in the
machine's load (other work shares these 2 cores) hits all three alike. Records
the medians and ``launch_ratio_spawn`` = spawn / bare spawn (target <= 1.2).

    python benchmarks/run.py spawn
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.cluster import cluster_env  # noqa: E402

RANKS = 4
BLOCKS = 4
PER_BLOCK = 6  # BLOCKS * PER_BLOCK = 24 samples per launcher
WARMUP = 2
SRUN_SAMPLES = 24
TAG_HEADER, TAG_ROWS = 7701, 7702


def _noop() -> Path:
    path = Path(sys.executable).parent / "sim-noop"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `make setup` to build the sims")
    return path


# ---------------------------------------------------------------- the floor: bare mpi4py spawn


def bare(binary: str, ranks: int, iterations: int, out: Path) -> None:
    """Spawn + Recv + Disconnect in a loop, in this process; write the latencies (s) as JSON."""
    import numpy as np
    from mpi4py import MPI

    MPI.COMM_WORLD.Get_attr(MPI.UNIVERSE_SIZE)  # singleton init (starts hydra) before timing
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        comm = MPI.COMM_SELF.Spawn(binary, [], maxprocs=ranks)
        header = np.empty(2, dtype=np.int64)
        comm.Recv(header, source=0, tag=TAG_HEADER)
        rows = np.empty((int(header[0]), int(header[1])))
        comm.Recv(rows, source=0, tag=TAG_ROWS)
        comm.Disconnect()
        times.append(time.perf_counter() - t0)
        if rows.shape != (1, 2) or rows[0, 0] != ranks:
            raise RuntimeError(f"bare spawn got {rows!r}")
    out.write_text(json.dumps(times))


def _bare_block(iterations: int, tmp: Path) -> list[float]:
    from orchestrator.launchers.mpiexec import find_mpiexec

    out = tmp / "bare.json"
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(find_mpiexec()).parent), env.get("PATH", "")])
    env["HYDRA_LAUNCHER"] = "fork"
    argv = [sys.executable, str(Path(__file__).resolve()), "--bare", str(_noop()), str(RANKS), str(iterations),
            str(out)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bare spawn exited {proc.returncode}: {proc.stderr[-2000:]}")
    times: list[float] = json.loads(out.read_text())
    return times[WARMUP:]


# ---------------------------------------------------------------- our launchers


_counter = iter(range(1 << 30))


async def _launcher_block(launcher: Any, n: int, work: Path, tag: str, placement: Any = None) -> list[float]:
    from orchestrator.launchers.base import LaunchRequest, Outcome

    times = []
    for _ in range(n):
        run_id = f"{tag}-{next(_counter):04d}"
        req = LaunchRequest(run_id=run_id, role="bench", binary=_noop(), args=[], ranks=RANKS,
                            workdir=work / run_id, timeout_s=60, ncols=2, nrows=1, placement=placement)
        t0 = time.perf_counter()
        result = await launcher.run(req)
        times.append(time.perf_counter() - t0)
        if result.outcome is not Outcome.OK or result.table is None or result.table[0, 0] != RANKS:
            raise RuntimeError(f"{launcher.name} run {run_id}: {result.outcome.value}: {result.message}")
    return times


async def _local(tmp: Path) -> dict[str, list[float]]:
    from orchestrator.allocation import Allocation
    from orchestrator.launchers.mpiexec import MpiexecLauncher
    from orchestrator.launchers.spawn import SpawnLauncher

    spawn = SpawnLauncher(Allocation.local())
    mpiexec = MpiexecLauncher()
    samples: dict[str, list[float]] = {"spawn": [], "mpiexec": [], "bare": []}
    try:
        await _launcher_block(spawn, WARMUP, tmp, "warm-spawn")  # the agent starts here
        await _launcher_block(mpiexec, WARMUP, tmp, "warm-mpiexec")
        for _ in range(BLOCKS):
            samples["bare"] += await asyncio.to_thread(_bare_block, WARMUP + PER_BLOCK, tmp)
            samples["spawn"] += await _launcher_block(spawn, PER_BLOCK, tmp, "spawn")
            samples["mpiexec"] += await _launcher_block(mpiexec, PER_BLOCK, tmp, "mpiexec")
    finally:
        await spawn.close()
    return samples


# ---------------------------------------------------------------- srun, inside salloc


def inside_srun(out: Path, samples: int) -> None:
    """Measure SrunLauncher in the current allocation; write the latencies (s) as JSON."""
    from orchestrator.allocation import Allocation, Placement
    from orchestrator.launchers.srun import SrunLauncher

    alloc = Allocation.detect()
    launcher = SrunLauncher(alloc)
    placement = Placement(((alloc.nodes[0].name, RANKS),))
    with tempfile.TemporaryDirectory(prefix="bench_spawn_srun_") as tmp:
        work = Path(tmp)
        asyncio.run(_launcher_block(launcher, WARMUP, work, "warm", placement))
        times = asyncio.run(_launcher_block(launcher, samples, work, "srun", placement))
    out.write_text(json.dumps({"times": times, "job": os.environ.get("SLURM_JOB_ID")}))


def _cluster_env() -> dict[str, str] | str:
    """Env for the test cluster's clients, or why it cannot run here."""
    try:
        return cluster_env()
    except RuntimeError as exc:
        return str(exc)


def _srun(tmp: Path) -> tuple[list[float], str] | str:
    env = _cluster_env()
    if isinstance(env, str):
        return env
    out = tmp / "srun.json"
    argv = ["salloc", "-N1", "--exclusive", "--immediate=120", "-t", "5", "-J", "bench-spawn", "timeout", "240",
            sys.executable, str(Path(__file__).resolve()), "--inside-srun", str(out), str(SRUN_SAMPLES)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0 and "Unable to allocate resources" in proc.stderr:
        return f"the test cluster had no free node within 120 s ({proc.stderr.strip()[-200:]})"
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    data = json.loads(out.read_text())
    return data["times"], str(data["job"])


# ---------------------------------------------------------------- the figures


def _ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def run(record: Callable[[str, float, str], None]) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_spawn_") as tmp:
        local = asyncio.run(_local(Path(tmp)))
        srun = _srun(Path(tmp))
    spawn, bare_ms = _ms(local["spawn"]), _ms(local["bare"])
    n = {k: len(v) for k, v in local.items()}
    record("latency_spawn_ms", spawn, f"SpawnLauncher.run, sim-noop x{RANKS} ranks, warm agent, median of {n['spawn']}")
    record("latency_bare_spawn_ms", bare_ms,
           f"mpi4py Spawn+Recv+Disconnect of sim-noop x{RANKS} in one process, median of {n['bare']}")
    record("latency_mpiexec_ms", _ms(local["mpiexec"]),
           f"MpiexecLauncher.run, sim-noop x{RANKS}, median of {n['mpiexec']}")
    if isinstance(srun, str):
        print(f"   srun skipped: {srun}", flush=True)
    else:
        times, job = srun
        record("latency_srun_ms", _ms(times),
               f"SrunLauncher.run, sim-noop x{RANKS} on one node, inside salloc (job {job}), median of {len(times)}")
    record("launch_ratio_spawn", spawn / bare_ms, "SpawnLauncher / bare mpi4py spawn, medians; target <= 1.2")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bare", nargs=4, metavar=("BINARY", "RANKS", "ITERATIONS", "OUT"))
    parser.add_argument("--inside-srun", nargs=2, metavar=("OUT", "SAMPLES"))
    args = parser.parse_args(argv)
    if args.bare:
        binary, ranks, iterations, out = args.bare
        bare(binary, int(ranks), int(iterations), Path(out))
    elif args.inside_srun:
        inside_srun(Path(args.inside_srun[0]), int(args.inside_srun[1]))
    else:
        run(lambda key, value, note="": print(f"{key:32s} {value:12.4g}   {note}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
