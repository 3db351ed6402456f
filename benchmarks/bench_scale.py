"""Benchmark: the coordinator's own cost per sim event, from 100 to 100,000 slots.

The real :class:`~orchestrator.loop.campaign.Campaign` loop, policy, slot pool, run
store and event log, driven by an in-process launcher that runs no process: each
"sim" waits until the allocation is full, then returns a valid table. The
allocation is fake nodes of ``SLOTS_PER_NODE`` slots (``Allocation``/``Node``
objects), and the policy keeps one 1-rank generate sim per slot in flight.

Per size, in a fresh process (so memory figures are its own):

1. fill: start one sim per slot (every start is a real ``sim_start`` event);
2. steady state: a fixed number of completions (``EVENTS``), each accepted into the
   store, checkpointed and replaced by a new start, at the rate the coordinator
   can sustain (the fake sims end as soon as they are resumed);
3. a SIGTERM, handled as a real campaign handles it.

Figures: coordinator CPU µs per sim event (a start or an end) in the steady state,
RSS per in-flight sim after the fill, events per second; the 100k/100 cost ratio
(goal <= 2: flat).

    python benchmarks/run.py scale
    python benchmarks/bench_scale.py --slots 10000 --events 2000   # one size, JSON on stdout
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from orchestrator.launchers.base import Launcher, LaunchRequest, Outcome, SimResult  # noqa: E402
from orchestrator.training.backends import Backend  # noqa: E402

SIZES = (100, 1_000, 10_000, 100_000)
SLOTS_PER_NODE = 4
EVENTS = 2_000
"""Completions measured per size (each followed by a new start): the same work at every size."""


def rss_bytes() -> int:
    """Resident set size now (Linux /proc; the peak elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class FakeLauncher(Launcher):
    """Runs no process. Once the allocation is full, sims end one at a time, oldest first: each
    result the coordinator has accepted lets the next sim end (``READY`` are ready at once), so
    the campaign runs at the rate the coordinator sustains, with every slot busy."""

    name: ClassVar[str] = "fake"
    READY = 8

    def __init__(self, fill: int, events: int) -> None:
        self.fill = fill
        self.events = events
        self.started = 0
        self.ended = 0
        self.waiting: deque[asyncio.Future[None]] = deque()
        self.marks: dict[str, float] = {}

    def command(self, req: LaunchRequest) -> list[str]:
        return [str(req.binary), *req.args]

    async def run(self, req: LaunchRequest) -> SimResult:
        self.started += 1
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append(turn)
        if self.started == self.fill:
            self.marks.update(cpu_fill=time.process_time(), wall_fill=time.perf_counter(), rss_fill=rss_bytes())
            self._release(self.READY)
        await turn
        return SimResult(req, Outcome.OK, np.zeros((req.nrows or 4, req.ncols)), 0, "ok", time.time(), 0.0)

    def _release(self, n: int) -> None:
        for _ in range(min(n, len(self.waiting))):
            self.waiting.popleft().set_result(None)

    def accepted(self) -> None:
        """A result went all the way through the coordinator (stored, checkpointed)."""
        if "cpu_fill" not in self.marks:
            return
        self.ended += 1
        if self.ended == self.events:
            self.marks.update(cpu_end=time.process_time(), wall_end=time.perf_counter(), started=self.started)
            signal.raise_signal(signal.SIGTERM)  # the campaign's own handler ends it
        else:
            self._release(1)


class CountingStore:
    """The real run store, telling the launcher when a result was accepted."""

    @staticmethod
    def make(workdir: Path, launcher: FakeLauncher) -> Any:
        from orchestrator.runlog import Event, EventKind
        from orchestrator.store import RunStore

        class Store(RunStore):
            def log(self, event: Event) -> None:
                super().log(event)
                if event.KIND is EventKind.DATA_ACCEPTED:
                    launcher.accepted()

        loop_file = workdir / "loop.yml"
        loop_file.write_text("name: scale\n")
        return Store.create(workdir, "scale", loop_file)


class IdleBackend(Backend):
    """A training backend that never comes up: the policy keeps generating."""

    async def start(self) -> Any:
        await asyncio.Event().wait()

    async def close(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {}


def config(slots: int, events: int) -> Any:
    from orchestrator.config import LoopConfig

    sim = {"binary": "sim-fake", "ranks": 1, "timeout_s": 60, "retries": 0}
    return LoopConfig.model_validate({
        "name": "scale", "inputs": [{"name": "x", "lo": 0.0, "hi": 1.0}], "outputs": ["y"],
        "sims": {"check": {**sim, "args": ["--x", "{x}"]},
                 "generate": {**sim, "args": ["--lo", "{lo}", "--hi", "{hi}", "--seed", "{seed}"]}},
        "policy": {"max_inflight": slots, "generates_per_round": slots + events + 1},
        "tracking": {"enabled": False},
        "training": {"backend": "local"},  # every slot to the sims: the idle backend keeps no cores
    })


async def measure(slots: int, events: int, workdir: Path) -> dict[str, float]:
    from orchestrator.allocation import Allocation, Node
    from orchestrator.loop import services
    from orchestrator.progress import Progress
    from orchestrator.runner import build_campaign

    services.BACKEND_HEAD_START_S = 0.0  # the idle backend never comes up; do not wait for it
    cfg = config(slots, events)
    nodes = tuple(Node(f"n{i:06d}", SLOTS_PER_NODE) for i in range(slots // SLOTS_PER_NODE))
    alloc = Allocation(nodes=nodes, in_slurm=True, job_id="bench")
    launcher = FakeLauncher(fill=slots, events=events)
    store = CountingStore.make(workdir, launcher)
    binaries = {"check": Path("/bin/true"), "generate": Path("/bin/true")}
    rss0 = rss_bytes()
    campaign = build_campaign(cfg, store, None, Progress(enabled=False), alloc=alloc, binaries=binaries,
                              launchers={"check": launcher, "generate": launcher}, backend=IdleBackend())
    result = await campaign.run()
    m = launcher.marks
    if "cpu_end" not in m:
        raise RuntimeError(f"the campaign ended ({result.status.value}) before {events} sims ended")
    steady_events = events + (m["started"] - slots)  # ends plus the starts that replaced them
    return {
        "slots": slots, "nodes": len(nodes), "events": steady_events, "status": result.status.value,
        "us_per_event": (m["cpu_end"] - m["cpu_fill"]) / steady_events * 1e6,
        "events_per_s": steady_events / (m["wall_end"] - m["wall_fill"]),
        "bytes_per_inflight": (m["rss_fill"] - rss0) / slots,
    }


def one(slots: int, events: int) -> dict[str, float]:
    # The run dir on tmpfs where there is one: this measures the coordinator, not the disk.
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="bench_scale_", dir=shm if shm.is_dir() else None) as tmp:
        return asyncio.run(measure(slots, events, Path(tmp)))


def run(record: Callable[[str, float, str], None]) -> None:
    """Each size in its own process; record the figures and the 100k/100 ratio."""
    out: dict[int, dict[str, float]] = {}
    for slots in SIZES:
        argv = [sys.executable, str(Path(__file__).resolve()), "--slots", str(slots), "--events", str(EVENTS)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-2000:]}")
        out[slots] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = out[slots]
        label = f"{slots // 1000}k" if slots >= 1000 else str(slots)
        how = f"{slots} slots on {r['nodes']} fake nodes, {r['events']} steady-state sim events"
        record(f"coordinator_us_per_event_{label}", r["us_per_event"], f"coordinator CPU per sim event; {how}")
        record(f"coordinator_events_per_s_{label}", r["events_per_s"], f"sim events/s, coordinator-bound; {how}")
        record(f"coordinator_kb_per_inflight_{label}", r["bytes_per_inflight"] / 1024,
               f"RSS growth per in-flight sim after the fill; {how}")
    ratio = out[SIZES[-1]]["us_per_event"] / out[SIZES[0]]["us_per_event"]
    record("coordinator_cost_ratio_100k_vs_100", ratio, "CPU per sim event at 100k slots over 100 slots; goal <= 2")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, help="measure this one size; print JSON")
    parser.add_argument("--events", type=int, default=EVENTS)
    args = parser.parse_args(argv)
    if args.slots is not None:
        print(json.dumps(one(args.slots, args.events)))
        return 0
    run(lambda key, value, note="": print(f"{key:36s} {value:12.4g}   {note}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
