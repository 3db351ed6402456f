"""Benchmark: what the orchestrator's srun launcher adds to a bare ``srun -n1``.

One allocation on the throwaway test cluster (``salloc -N1 -n2``); inside it, the
same 1-rank ``sim-noop`` is started alternately by ``srun -n1 BINARY --out F``
(the baseline) and by :class:`orchestrator.launchers.srun.SrunLauncher` (its
whole ``run``: argv, ``srun --exact --mpi=pmi2 ... -v``, supervision, reading
and checking the result). Alternating the two keeps drift in the machine's
load out of the ratio. Records both medians and their ratio (target <= 1.2).

    python benchmarks/run.py launch
    python benchmarks/bench_launch.py --inside OUT.json   # (what run() starts under salloc)
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.cluster import cluster_env, noop_sim  # noqa: E402

SAMPLES = 40
WARMUP = 3


async def _measure(samples: int, work: Path) -> tuple[list[float], list[float]]:
    from orchestrator.allocation import Allocation, Placement
    from orchestrator.launchers.base import LaunchRequest, Outcome
    from orchestrator.launchers.srun import SrunLauncher

    alloc = Allocation.detect()
    launcher = SrunLauncher(alloc)
    binary = noop_sim()
    node = alloc.nodes[0].name
    raw_out = work / "raw.npy"
    raw: list[float] = []
    ours: list[float] = []
    for i in range(WARMUP + samples):
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            "srun", "-n1", str(binary), "--out", str(raw_out),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        _, err = await proc.communicate()
        t_raw = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"srun -n1 sim-noop exited {proc.returncode}: {err.decode()[-500:]}")
        req = LaunchRequest(run_id=f"bench-{i:04d}", role="bench", binary=binary, args=[], ranks=1,
                            workdir=work / f"bench-{i:04d}", timeout_s=60, ncols=2, nrows=1,
                            placement=Placement(((node, 1),)))
        t0 = time.perf_counter()
        result = await launcher.run(req)
        t_ours = time.perf_counter() - t0
        if result.outcome is not Outcome.OK:
            raise RuntimeError(f"SrunLauncher run {req.run_id}: {result.outcome.value}: {result.message}")
        if i >= WARMUP:
            raw.append(t_raw)
            ours.append(t_ours)
    return raw, ours


def inside(out: Path, samples: int) -> None:
    """Measure in the current allocation and write the samples as JSON."""
    with tempfile.TemporaryDirectory(prefix="bench_launch_") as tmp:
        raw, ours = asyncio.run(_measure(samples, Path(tmp)))
    out.write_text(json.dumps({"raw": raw, "ours": ours, "job": os.environ.get("SLURM_JOB_ID")}))


def run(record: Callable[[str, float, str], None]) -> None:
    """Start an allocation on the test cluster, measure inside it, record the figures."""
    with tempfile.TemporaryDirectory(prefix="bench_launch_") as tmp:
        out = Path(tmp) / "samples.json"
        argv = ["salloc", "-N1", "-n2", "-t", "5", "-J", "bench-launch",
                "timeout", "240", sys.executable, str(Path(__file__).resolve()), "--inside", str(out)]
        proc = subprocess.run(argv, env=cluster_env(), capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-2000:]}")
        data = json.loads(out.read_text())
    raw_ms = statistics.median(data["raw"]) * 1e3
    ours_ms = statistics.median(data["ours"]) * 1e3
    n = len(data["raw"])
    record("launch_srun_raw_median_ms", raw_ms, f"srun -n1 sim-noop, median of {n} (job {data['job']})")
    record("launch_srun_ours_median_ms", ours_ms, f"SrunLauncher.run of sim-noop, 1 rank, median of {n}")
    record("launch_ratio_srun", ours_ms / raw_ms, "SrunLauncher / bare srun -n1, medians; target <= 1.2")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inside", type=Path, help="measure in the current allocation, write samples here")
    parser.add_argument("--samples", type=int, default=SAMPLES)
    args = parser.parse_args(argv)
    if args.inside is not None:
        inside(args.inside, args.samples)
        return 0
    run(lambda key, value, note="": print(f"{key:32s} {value:10.4g}   {note}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
