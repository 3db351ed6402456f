"""The spawn agent: the one process that holds MPI for the ``spawn`` launcher.

MPI stays out of the coordinator (it shares its process with Dask and torch
threads), so :class:`~orchestrator.launchers.spawn.SpawnLauncher` starts this
small process and talks to it over its stdin/stdout::

    python -m orchestrator.launchers.spawn_agent --mode local     # a singleton MPI process
    srun --mpi=pmi2 -N1 -n1 --overlap -u … python -m orchestrator.launchers.spawn_agent --mode slurm

Protocol, one JSON object per line:

* coordinator -> agent: ``{"op": "spawn", "id", "command", "args", "maxprocs",
  "info": {key: value}, "wdir", "binary", "timeout_s"}`` or ``{"op": "exit"}``
  (end of input also ends the agent);
* agent -> coordinator: ``{"event": "ready", ...}`` once MPI is up; per request
  ``{"event": "spawned", "pids": [[pid, start], ...], ...}`` as soon as the
  children exist (so the coordinator can kill them even if the agent dies), then
  ``{"event": "result", "status", "shape", "nbytes", "reusable", ...}``
  followed by ``nbytes`` raw little-endian float64 bytes of the table.

One request at a time: ``MPI_Comm_spawn`` from several threads of one process
fails in this MPICH (UCX shared-memory errors), and a spawned rank that crashes
or calls ``MPI_Abort`` makes hydra SIGKILL its singleton parent; so the
launcher runs one agent per sim in flight and replaces any that dies.

An agent answers ``reusable: false`` after any failure (a dangling
intercommunicator cannot be disconnected): it then ends its children and exits
without ``MPI_Finalize``. The agent never validates tables; the coordinator does
(:func:`orchestrator.results.check_table`).

Two ways to find the children it must watch and, on a timeout, end:

* ``local``: the ranks are descendants of this process (under the hydra proxy
  that MPICH's singleton init starts), found by working directory and binary;
* ``slurm``: any rank on this host, found the same way. Slurm's PMI2 runs each
  spawn as ``srun --mpi=pmi2 --chdir=WDIR …`` forked by the srun that started
  this agent, on the coordinator's host, so the coordinator watches and ends
  that srun (:meth:`~orchestrator.launchers.spawn.SpawnLauncher.watch_spawn`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Literal

from orchestrator.procs import (
    KILL_GRACE_S,
    ProcInfo,
    alive,
    all_processes,
    descendants,
    find_ranks,
    signal_procs,
    wait_gone,
)

log = logging.getLogger(__name__)

TAG_HEADER = 7701
TAG_ROWS = 7702
TAG_ACK = 7703
"""Sent to rank 0 once its header (and rows) arrived: until then simkit keeps every rank alive, so
no child exits while ``MPI_Comm_spawn`` may still be wiring up to it."""
POLL_MIN_S = 0.0002
POLL_MAX_S = 0.01
POLL_LAG = 0.05
EXIT_WAIT_S = 5.0
"""After a good run: how long ranks may take to exit before the agent kills them."""
MAX_CELLS = 1 << 30

Mode = Literal["local", "slurm"]


# --------------------------------------------------------------------------
# The channel to the coordinator


class Channel:
    """Requests in, events out; private copies of fds 0 and 1.

    MPICH's singleton init starts hydra's ``mpiexec``, which inherits our fds:
    its stdin would swallow requests and anything a rank prints would land in
    our replies. So the protocol moves to duplicates (not inherited) and fds 0
    and 1 become /dev/null and stderr (the agent log).
    """

    def __init__(self) -> None:
        self._in: IO[bytes] = os.fdopen(os.dup(0), "rb", buffering=0)
        self._out: IO[bytes] = os.fdopen(os.dup(1), "wb", buffering=0)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def requests(self, tidy: Callable[[], float | None]) -> Iterator[dict[str, Any]]:
        """Requests until end of input; ``tidy`` runs while waiting and says when it wants to run again."""
        buf = b""
        fd = self._in.fileno()
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    yield json.loads(line)
            ready, _, _ = select.select([fd], [], [], tidy())
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            buf += chunk

    def send(self, message: dict[str, Any], payload: bytes = b"") -> None:
        data = json.dumps(message).encode() + b"\n" + payload
        view = memoryview(data)
        while view:
            n = os.write(self._out.fileno(), view)
            view = view[n:]


# --------------------------------------------------------------------------
# One spawn


@dataclass
class Children:
    """What one spawn started, as far as this host can see."""

    ranks: list[ProcInfo] = field(default_factory=list)
    """The ranks on this host: when they have all exited, the run is over."""

    def pairs(self) -> list[tuple[int, int]]:
        return sorted({(p.pid, p.start) for p in self.ranks})


class Agent:
    """Serves spawn requests one after the other."""

    def __init__(self, mode: Mode, channel: Channel) -> None:
        from mpi4py import MPI

        self.MPI = MPI
        self.mode = mode
        self.chan = channel
        self.pid = os.getpid()
        self.lingering: list[tuple[str, list[tuple[int, int]], float]] = []
        """Ranks of finished runs, still exiting: (run id, (pid, start) pairs, kill deadline)."""

    def start(self) -> None:
        MPI = self.MPI
        # Forces MPICH's singleton init (it starts hydra) now rather than at the first spawn.
        universe = MPI.COMM_WORLD.Get_attr(MPI.UNIVERSE_SIZE)
        self.chan.send({
            "event": "ready", "pid": self.pid, "mode": self.mode, "host": socket.gethostname(),
            "universe_size": universe, "mpi": MPI.Get_library_version().splitlines()[0].strip(),
            "thread_level": MPI.Query_thread(), "pids": self.own_tree(),
        })

    def own_tree(self) -> list[tuple[int, int]]:
        """Everything below the agent (hydra's mpiexec and proxy, ranks), for the coordinator to kill if need be."""
        return [(p.pid, p.start) for p in descendants(self.pid)]

    def serve(self) -> int:
        self.start()
        for request in self.chan.requests(self.tidy):
            op = request.get("op")
            if op == "exit":
                break
            if op != "spawn":
                self.chan.send({"event": "error", "message": f"unknown op {op!r}"})
                continue
            if not self.handle(request):
                # A failed run leaves an intercommunicator we cannot disconnect; MPI_Finalize could hang.
                sys.stderr.flush()
                os._exit(0)
        self.tidy(final=True)
        self.MPI.Finalize()
        return 0

    # -- one request -------------------------------------------------------
    def find_children(self, wdir: str, binary: str) -> tuple[Children, list[tuple[int, int]]]:
        """What a spawn started, and everything below the agent now (hydra included)."""
        below = descendants(self.pid)
        pairs = [(p.pid, p.start) for p in below]
        # Under Slurm the ranks are not below the agent: those on this host are found among all processes.
        return Children(find_ranks(below if self.mode == "local" else all_processes(), wdir, binary)), pairs

    def wait(self, request: Any, children: Children, deadline: float) -> Literal["done", "gone", "timeout"]:
        """Drive MPI progress until ``request`` completes, the children are gone, or the deadline."""
        fds: list[int] = []
        for p in children.ranks:
            with contextlib.suppress(OSError):
                fds.append(os.pidfd_open(p.pid))
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        pending = set(fds)
        start = time.monotonic()
        try:
            while True:
                if bool(request.Test()):
                    return "done"
                if not pending and children.ranks:
                    # Everything exited; give in-flight bytes one last chance, then call it.
                    for _ in range(20):
                        if bool(request.Test()):
                            return "done"
                        time.sleep(0.001)
                    return "gone"
                left = deadline - time.monotonic()
                if left <= 0:
                    return "timeout"
                # Test() is the only way to see MPI progress: poll with a lag of at most ~5% of the wait so far.
                interval = min(max((time.monotonic() - start) * POLL_LAG, POLL_MIN_S), POLL_MAX_S, left)
                for fd, _ in poller.poll(interval * 1000):
                    pending.discard(fd)
                    poller.unregister(fd)
        finally:
            for fd in fds:
                os.close(fd)

    def handle(self, req: dict[str, Any]) -> bool:
        """Run one spawn request; send its result; return whether the agent is still usable."""
        MPI = self.MPI
        rid = req["id"]
        t0 = time.monotonic()
        deadline = t0 + float(req["timeout_s"])
        info = MPI.Info.Create()
        for key, value in req.get("info", {}).items():
            info.Set(key, str(value))
        try:
            comm = MPI.COMM_SELF.Spawn(req["command"], req["args"], maxprocs=int(req["maxprocs"]), info=info)
        except MPI.Exception as exc:
            self.chan.send({"event": "result", "id": rid, "status": "spawn_error", "reusable": False,
                            "message": f"MPI_Comm_spawn failed: {exc}"})
            return False
        finally:
            info.Free()
        t_spawn = time.monotonic()
        remote = comm.Get_remote_size()
        children, below = self.find_children(req["wdir"], req["binary"])
        t_found = time.monotonic()
        pids = sorted({*children.pairs(), *below})
        self.chan.send({"event": "spawned", "id": rid, "remote_size": remote, "pids": pids,
                        "ranks_here": len(children.ranks), "spawn_ms": _ms(t_spawn - t0)})
        result, payload = self.collect(comm, children, deadline)
        t_rows = time.monotonic()
        reusable: bool = result.get("status") == "ok"
        if reusable:
            comm.Disconnect()
        t_end = time.monotonic()
        timing = {"spawn_ms": _ms(t_spawn - t0), "find_ms": _ms(t_found - t_spawn), "rows_ms": _ms(t_rows - t_found),
                  "disconnect_ms": _ms(t_end - t_rows), "total_ms": _ms(t_end - t0)}
        self.chan.send({"event": "result", "id": rid, "remote_size": remote, "reusable": reusable,
                        "timing": timing, **result}, payload)
        if reusable:
            # They are past MPI_Finalize: let them exit while the next request runs; tidy() checks.
            self.lingering.append((rid, children.pairs(), t_end + EXIT_WAIT_S))
        else:
            self.abandon(children)
        return reusable

    def tidy(self, final: bool = False) -> float | None:
        """Kill ranks of finished runs that outstay EXIT_WAIT_S; return seconds until the next check (None: none)."""
        now = time.monotonic()
        still: list[tuple[str, list[tuple[int, int]], float]] = []
        for rid, pairs, deadline in self.lingering:
            if final:
                wait_gone(pairs, max(0.0, deadline - now))
            live = [(pid, start) for pid, start in pairs if alive(pid, start)]
            if not live:
                continue
            if final or now >= deadline:
                log.warning("run %s: ranks %s still there %.0f s after disconnecting; killing them",
                            rid, [pid for pid, _ in live], EXIT_WAIT_S)
                signal_procs(live, signal.SIGKILL)
                continue
            still.append((rid, live, deadline))
        self.lingering = still
        return min(d for _, _, d in still) - now if still else None

    def collect(self, comm: Any, children: Children, deadline: float) -> tuple[dict[str, Any], bytes]:
        """Receive simkit's header and rows: (result fields, table bytes)."""
        np = _numpy()
        header = np.zeros(2, dtype=np.int64)
        outcome = self.wait(comm.Irecv(header, source=0, tag=TAG_HEADER), children, deadline)
        if outcome != "done":
            return self._not_done(outcome), b""
        nrows, ncols = int(header[0]), int(header[1])
        if nrows < 0:
            self.ack(comm)
            return {"status": "failed", "code": ncols,
                    "message": f"the sim reported failure to its parent (exit code {ncols})"}, b""
        if ncols <= 0 or nrows * ncols > MAX_CELLS:
            nonsense = f"nonsense header from the sim: {nrows} rows x {ncols} columns"
            return {"status": "malformed", "message": nonsense}, b""
        rows = np.empty((nrows, ncols), dtype="<f8")
        outcome = self.wait(comm.Irecv(rows, source=0, tag=TAG_ROWS), children, deadline)
        if outcome != "done":
            return self._not_done(outcome, f"after announcing {nrows} x {ncols}"), b""
        self.ack(comm)
        return {"status": "ok", "shape": [nrows, ncols], "nbytes": rows.nbytes}, rows.tobytes()

    def ack(self, comm: Any) -> None:
        """Tell rank 0 its message arrived (simkit's ranks wait for this before exiting)."""
        try:
            comm.Send(_numpy().zeros(1, dtype="intc"), dest=0, tag=TAG_ACK)
        except self.MPI.Exception as exc:  # it is gone after all: nothing waits for the ack
            log.warning("could not acknowledge the sim's rows: %s", exc)

    @staticmethod
    def _not_done(outcome: str, when: str = "") -> dict[str, Any]:
        if outcome == "timeout":
            return {"status": "timeout", "message": "timed out waiting for the sim's rows"}
        suffix = f" {when}" if when else ""
        return {"status": "no_result", "message": f"the sim's ranks exited without sending their rows{suffix}"}

    def abandon(self, children: Children) -> None:
        """End the ranks this spawn started on this host (under Slurm the coordinator ends its srun)."""
        signal_procs(children.pairs(), signal.SIGKILL)
        wait_gone(children.pairs(), KILL_GRACE_S)


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)


def _numpy() -> Any:
    import numpy

    return numpy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.launchers.spawn_agent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["local", "slurm"], default="local",
                        help="how the agent finds the processes a spawn started (see above)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"spawn-agent[{os.getpid()}] %(levelname)s %(message)s")
    channel = Channel()
    return Agent(args.mode, channel).serve()


if __name__ == "__main__":
    raise SystemExit(main())
