"""Sims and training at the same time, measured against a sequential baseline.

Figures (each from this one run, its baseline measured here too):
  pipeline_time_to_target_ratio
                              orchestrator / sequential baseline, median of 5 seeds, arms one after
                              the other (the headline time_to_target_ratio, 10 paired runs with arms
                              interleaved, is bench_peer's);
                              both timed from the command's launch to the check that met the target
  overlap_fraction            share of training time with a sim running, pipelined mode (target >= 0.8)
  throughput_ratio            500 one-rank no-op sims via the campaign's launch path / raw parallel
                              mpiexec launches at the same concurrency (target >= 0.8)
  coordinator_cpu_share       coordinator CPU time / wall time in steady state (target <= 0.02)
  near_failures_points_ratio  generate rows needed to reach the target, near-failures / uniform
"""

from __future__ import annotations

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

import psutil

from orchestrator.runlog import EventKind, LoggedEvent

HERE = Path(__file__).resolve().parent
LOOP = HERE / "configs" / "sine-bench.yml"
SEEDS = [1, 2, 3, 4, 5]
Record = Callable[[str, float, str], None]


def orchestrate(loop: Path, work: Path, *overrides: str, watch_cpu: bool = False) -> tuple[Path, dict[str, Any]]:
    """Run a campaign to its end; return its run dir and launch time (and, optionally,
    coordinator CPU figures)."""
    argv = [sys.executable, "-m", "orchestrator", "run", str(loop), "--workdir", str(work), "--no-live", "--new"]
    for o in overrides:
        argv += ["--set", o]
    env = {**os.environ, "DASK_LOGGING__DISTRIBUTED": "error"}
    launched = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    cpu: dict[str, Any] = {"launched": launched}
    if watch_cpu:
        cpu.update(_watch_cpu(proc, work))
    _, err = proc.communicate(timeout=600)
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"campaign failed ({proc.returncode}): {err[-2000:]}")
    run_dir = max(work.glob("sine-*"), key=lambda p: p.stat().st_mtime)
    return run_dir, cpu


def _events(run_dir: Path) -> list[LoggedEvent]:
    from orchestrator.store import read_events

    return read_events(run_dir)


def _watch_cpu(proc: subprocess.Popen[str], work: Path) -> dict[str, Any]:
    """Coordinator CPU (the process itself, not its sims or workers) from the first
    finished training (start-up over) to the end of the campaign."""
    p = psutil.Process(proc.pid)
    start: tuple[float, float] | None = None
    last: tuple[float, float] | None = None
    while proc.poll() is None:
        try:
            t = p.cpu_times()
            now = (time.monotonic(), t.user + t.system)
        except psutil.NoSuchProcess:
            break
        if start is None:
            runs = list(work.glob("sine-*"))
            if runs and any(e.kind is EventKind.TRAIN_END for e in _events(runs[0])):
                start = now
        else:
            last = now
            if any(e.kind is EventKind.CAMPAIGN_END for e in _events(next(work.glob("sine-*")))):
                break
        time.sleep(0.05)
    if start is None or last is None or last[0] <= start[0]:
        return {}
    return {"wall_s": last[0] - start[0], "cpu_s": last[1] - start[1]}


def target_time(run_dir: Path) -> float | None:
    """Absolute time of the check that met the target."""
    from orchestrator.report import build_timeline

    tl = build_timeline(_events(run_dir))
    return None if tl.target_at is None else tl.t0 + tl.target_at


def bench_time_to_target(record: Record) -> None:
    from orchestrator.report import build_timeline, overlap_fraction

    ours, base, overlaps = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in SEEDS:
            run_dir, info = orchestrate(LOOP, Path(tmp) / f"o{seed}", f"seed={seed}")
            reached = target_time(run_dir)
            if reached is None:
                raise RuntimeError(f"seed {seed}: target not met ({run_dir})")
            ours.append(reached - info["launched"])
            ov = overlap_fraction(build_timeline(_events(run_dir)))
            if ov is not None:
                overlaps.append(ov)
            launched = time.time()
            out = subprocess.run([sys.executable, str(HERE / "sequential_baseline.py"), str(LOOP), "--seed",
                                  str(seed)], capture_output=True, text=True, check=True, timeout=600)
            base.append(json.loads(out.stdout.strip().splitlines()[-1])["target_at"] - launched)
    mo, mb = statistics.median(ours), statistics.median(base)
    record("pipeline_time_to_target_orchestrator_s", mo, f"median of seeds {SEEDS}: {[round(v, 2) for v in ours]}")
    record("pipeline_time_to_target_sequential_s", mb, f"median of seeds {SEEDS}: {[round(v, 2) for v in base]}")
    record("pipeline_time_to_target_ratio", mo / mb, "orchestrator / sequential baseline (bench_peer's "
           "time_to_target_ratio is the headline)")
    record("overlap_fraction", statistics.median(overlaps),
           f"median over {len(overlaps)} pipelined runs: {[round(v, 3) for v in overlaps]} (target >= 0.8)")


def bench_cpu_share(record: Record) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _, cpu = orchestrate(LOOP, Path(tmp), "target.successes=40", "policy.checks_per_round=4",
                             "seed=11", watch_cpu=True)
    if not cpu:
        raise RuntimeError("could not sample the coordinator's CPU time")
    record("coordinator_cpu_share", cpu["cpu_s"] / cpu["wall_s"],
           f"{cpu['cpu_s']:.2f} s CPU over {cpu['wall_s']:.1f} s of checks after the first training (target <= 0.02)")


def bench_near_failures(record: Record) -> None:
    # Little data per run and a tight tolerance, so the target takes several rounds.
    # Sequential rounds, so every generate run after the first answers a failed check.
    common = ["sims.generate.ranks=2", "sims.generate.args=[--points-per-rank, '3', --lo, '{lo}', --hi, '{hi}', "
              "--seed, '{seed}']", "sims.check.args=[--x, '{x}']", "target.tolerance=0.003",
              "policy.checks_per_round=2", "policy.pipeline=false", "target.max_rounds=60",
              "policy.near_failures_width=0.3"]
    points: dict[str, list[int]] = {"uniform": [], "near-failures": []}
    with tempfile.TemporaryDirectory() as tmp:
        for sampling in points:
            for seed in (1, 2, 3):
                run_dir, _ = orchestrate(LOOP, Path(tmp) / f"{sampling}{seed}", *common,
                                         f"policy.sampling={sampling}", f"seed={seed}")
                summary = json.loads((run_dir / "summary.json").read_text())
                points[sampling].append(summary["data_points"] if summary["target_met"] else 10**9)
    u, n = statistics.median(points["uniform"]), statistics.median(points["near-failures"])
    record("near_failures_points_ratio", n / u,
           f"median generate rows to target: near-failures {points['near-failures']} vs uniform {points['uniform']}")


async def _throughput(n: int, concurrency: int) -> tuple[float, float]:
    """n one-rank sim-noop runs: through the campaign's SimRunner (slots, events, result checks) and raw."""
    import numpy as np

    from orchestrator.allocation import Allocation, Node
    from orchestrator.config import load_config, resolve_binaries
    from orchestrator.launchers.mpiexec import find_mpiexec
    from orchestrator.mpi import merged_env, mpi_for
    from orchestrator.progress import Progress
    from orchestrator.runner import build_campaign
    from orchestrator.store import RunStore

    with tempfile.TemporaryDirectory() as tmp:
        loop = Path(tmp) / "noop.yml"
        loop.write_text(LOOP.read_text())
        cfg = load_config(loop, ["sims.generate.binary=sim-noop", "sims.generate.args=[]",
                                 "sims.generate.ranks=1", "sims.generate.retries=0",
                                 f"resources.sim_slots={concurrency}", "tracking.enabled=false"])
        binaries = resolve_binaries(cfg, loop)
        store = RunStore.create(Path(tmp) / "runs", cfg.name, loop)
        local = Allocation(nodes=(Node("local", concurrency),), in_slurm=False, job_id=None)
        camp = build_campaign(cfg, store, loop, Progress(enabled=False), alloc=local)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(camp.sims.run("generate", {"seed": i}) for i in range(n)))
        ours = time.perf_counter() - t0
        assert all(r is not None and r.ok for r in results)

        mpiexec, binary = find_mpiexec(), str(binaries["generate"])
        # The same node-local MPI settings the campaign's launcher gives its sims (UCX on the node).
        env = merged_env(os.environ, mpi_for(binaries["generate"]), 1)
        sem = asyncio.Semaphore(concurrency)
        raw_dir = Path(tmp) / "raw"
        raw_dir.mkdir()

        async def raw(i: int) -> None:
            async with sem:
                out = raw_dir / f"{i}.npy"
                proc = await asyncio.create_subprocess_exec(mpiexec, "-n", "1", binary, "--out", str(out), env=env,
                                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                assert await proc.wait() == 0
                np.load(out)

        t0 = time.perf_counter()
        await asyncio.gather(*(raw(i) for i in range(n)))
        base = time.perf_counter() - t0
        store.close()
    return n / ours, n / base


def bench_throughput(record: Record) -> None:
    n, conc = 500, 4
    ours, raw = asyncio.run(_throughput(n, conc))
    record("throughput_orchestrator_per_s", ours, f"{n} one-rank sim-noop via the campaign's SimRunner, {conc} slots")
    record("throughput_raw_per_s", raw, f"{n} raw mpiexec launches, {conc} at a time, with the same node-local "
           "MPI settings")
    record("throughput_ratio", ours / raw, "orchestrator / raw (target >= 0.8)")


def run(record: Record) -> None:
    bench_throughput(record)
    bench_time_to_target(record)
    bench_cpu_share(record)
    bench_near_failures(record)
