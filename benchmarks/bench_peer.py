"""The orchestrator against an honest peer, libEnsemble, and the sequential loop: paired runs.

The sine campaign of configs/sine-bench.yml, run by three arms (and two variants, below),
interleaved in one loop so that a busy machine slows them alike: the orchestrator (``python -m
orchestrator run``), the same campaign in libEnsemble's idiom
(libensemble_peer.py: persistent generator, MPIExecutor, the project's sims, model
and training function) and the sequential loop (sequential_baseline.py). Each is
timed from its command's launch.

Figures (medians over ``PEER_RUNS`` paired runs, seeds 1..N, default 10):
  first_sim_after_launch_s              launch of ``run`` to its first sim's start (target <= 0.3)
  libensemble_first_sim_after_launch_s  the same for the libEnsemble arm
  libensemble_time_to_target_ratio      libEnsemble's time to target over ours (target >= 1.25)
  time_to_target_ratio                  ours over the sequential loop's (target <= 0.45)
  peer_coordinator_cpu_share            our coordinator process's CPU time over its wall time
  libensemble_coordinator_cpu_share     the same for libEnsemble's manager and sim workers (its
                                        generator, which trains, is left out as our Dask workers are)
  peer_time_to_target_precheck_s        ours with ``policy.precheck: true`` (a fourth arm, same loop):
                                        the first model's checks run while its data waits for the
                                        workers. The libEnsemble arm does not do this (its generator
                                        asks for checks once it has a model), so the headline ratio
                                        compares the defaults; this one is shown beside it.
  libensemble_lazydynamo_time_to_target_ratio
                                        a fifth arm: libEnsemble with the torch setting our workers
                                        install (orchestrator.training.lazydynamo: torch's optimizers
                                        without importing torch._dynamo, 1.2-1.7 s), over ours. Not the
                                        idiom (a libEnsemble user gets torch as torch ships it), shown
                                        so that what the headline ratio owes to that setting is seen.

Needs libEnsemble (``pip install -c constraints.txt -e '.[bench]'``, which ``make bench`` does).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
LOOP = HERE / "configs" / "sine-bench.yml"
Record = Callable[[str, float, str], None]


class CpuWatch:
    """CPU seconds of a process and (optionally) its direct Python children, sampled until it exits:
    the last sample of each process stands for its total."""

    def __init__(self, proc: subprocess.Popen[str], children: bool) -> None:
        self.proc, self.children = proc, children
        self.last: dict[int, float] = {}

    def _sample(self, p: psutil.Process) -> None:
        try:
            t = p.cpu_times()
            self.last[p.pid] = t.user + t.system
        except psutil.Error:
            pass

    def run(self) -> None:
        root = psutil.Process(self.proc.pid)
        while self.proc.poll() is None:
            self._sample(root)
            if self.children:
                try:
                    kids = [c for c in root.children() if "python" in c.name()]
                except psutil.Error:
                    kids = []
                for c in kids:
                    self._sample(c)
            time.sleep(0.05)

    def total(self, leave_out: int | None = None) -> float:
        return sum(v for pid, v in self.last.items() if pid != leave_out)


def _launch(argv: list[str], cwd: Path, children: bool) -> tuple[float, float, str, CpuWatch]:
    """Run argv to its end; (launch time, wall s, stdout, CPU watch)."""
    env = {**os.environ, "DASK_LOGGING__DISTRIBUTED": "error"}
    launched = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    watch = CpuWatch(proc, children)
    watch.run()
    out, err = proc.communicate(timeout=600)
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"{argv[:4]} failed ({proc.returncode}): {err[-2000:]}")
    return launched, time.time() - launched, out, watch


def ours(seed: int, work: Path, *extra: str) -> dict[str, float]:
    from orchestrator.report import build_timeline
    from orchestrator.runlog import EventKind
    from orchestrator.store import read_events

    argv = [sys.executable, "-m", "orchestrator", "run", str(LOOP), "--workdir", str(work), "--no-live", "--new",
            "--set", f"seed={seed}", *extra]
    launched, wall, _, cpu = _launch(argv, work.parent, children=False)
    run_dir = next(work.glob("sine-*"))
    events = read_events(run_dir)
    tl = build_timeline(events)
    if tl.target_at is None:
        raise RuntimeError(f"orchestrator, seed {seed}: target not met ({run_dir})")
    first = min(e.t for e in events if e.kind is EventKind.SIM_START)
    return {"target": tl.t0 + tl.target_at - launched, "first_sim": first - launched, "cpu": cpu.total() / wall}


def theirs(seed: int, work: Path, *extra: str) -> dict[str, float]:
    argv = [sys.executable, str(HERE / "libensemble_peer.py"), str(LOOP), "--seed", str(seed), "--workdir", str(work),
            *extra]
    work.mkdir(parents=True)
    launched, wall, out, cpu = _launch(argv, work, children=True)
    report = json.loads(out.strip().splitlines()[-1])
    if report["target_at"] is None:
        raise RuntimeError(f"libEnsemble, seed {seed}: target not met ({work})")
    return {"target": report["target_at"] - launched, "first_sim": report["first_sim_at"] - launched,
            "cpu": cpu.total(leave_out=report["gen_pid"]) / wall}


def sequential(seed: int, work: Path) -> dict[str, float]:
    argv = [sys.executable, str(HERE / "sequential_baseline.py"), str(LOOP), "--seed", str(seed)]
    work.mkdir(parents=True)
    launched, _, out, _ = _launch(argv, work, children=False)
    return {"target": json.loads(out.strip().splitlines()[-1])["target_at"] - launched}


def _med(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _show(rows: list[dict[str, float]], key: str) -> str:
    return str([round(r[key], 2) for r in rows])


def run(record: Record) -> None:
    n = int(os.environ.get("PEER_RUNS", "10"))
    arms: dict[str, list[dict[str, float]]] = {"ours": [], "libensemble": [], "sequential": [], "precheck": [],
                                               "lazy": []}

    def precheck(seed: int, work: Path) -> dict[str, float]:
        return ours(seed, work, "--set", "policy.precheck=true")

    def lazy(seed: int, work: Path) -> dict[str, float]:
        return theirs(seed, work, "--lazy-dynamo")

    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(1, n + 1):
            for name, arm in (("ours", ours), ("libensemble", theirs), ("sequential", sequential),
                              ("precheck", precheck), ("lazy", lazy)):
                arms[name].append(arm(seed, Path(tmp) / f"{name}{seed}"))
    o, le, sq = arms["ours"], arms["libensemble"], arms["sequential"]
    paired = f"{n} paired runs, seeds 1-{n}, arms interleaved"
    record("first_sim_after_launch_s", _med(o, "first_sim"),
           f"median, {paired}: {_show(o, 'first_sim')} (target <= 0.3)")
    record("libensemble_first_sim_after_launch_s", _med(le, "first_sim"), f"median, {paired}: {_show(le, 'first_sim')}")
    record("peer_time_to_target_orchestrator_s", _med(o, "target"), f"median, {paired}: {_show(o, 'target')}")
    record("peer_time_to_target_libensemble_s", _med(le, "target"), f"median, {paired}: {_show(le, 'target')}")
    record("peer_time_to_target_sequential_s", _med(sq, "target"), f"median, {paired}: {_show(sq, 'target')}")
    record("libensemble_time_to_target_ratio", _med(le, "target") / _med(o, "target"),
           f"libEnsemble / orchestrator, medians of {paired} (target >= 1.25)")
    record("time_to_target_ratio", _med(o, "target") / _med(sq, "target"),
           f"orchestrator / sequential loop, medians of {paired} (target <= 0.45)")
    pc = arms["precheck"]
    record("peer_time_to_target_precheck_s", _med(pc, "target"),
           f"ours with policy.precheck: true, median, {paired}: {_show(pc, 'target')}; libEnsemble / this: "
           f"{_med(le, 'target') / _med(pc, 'target'):.3f} (its generator runs no checks before it has a model)")
    lz = arms["lazy"]
    record("libensemble_lazydynamo_time_to_target_ratio", _med(lz, "target") / _med(o, "target"),
           f"libEnsemble with our workers' torch setting (lazydynamo) / orchestrator, medians of {paired}: "
           f"{_show(lz, 'target')} s (not the idiom: shown so the headline ratio's share from that setting is seen)")
    record("peer_coordinator_cpu_share", _med(o, "cpu"),
           f"our coordinator process, CPU s / wall s from launch to exit, median of {paired}: {_show(o, 'cpu')}")
    record("libensemble_coordinator_cpu_share", _med(le, "cpu"),
           f"libEnsemble's manager and sim workers (not its training generator), CPU s / wall s, median of "
           f"{paired}: {_show(le, 'cpu')}")
