"""The node agent: one long-lived process per node that starts that node's sims.

Started by :class:`orchestrator.launchers.agent.NodeAgentLauncher` as one Slurm step
per node (``srun --overlap -N1 -n1 ... python -m orchestrator.node_agent``), or as a
plain child process outside Slurm. It speaks JSON lines: requests on stdin, replies
on stdout.

    -> {"op": "start", "id": ID, "argv": [...], "env": {...}, "cwd": DIR,
        "stdout": FILE, "stderr": FILE, "timeout": SECONDS}
    -> {"op": "cancel", "id": ID}
    <- {"event": "ready", "pid": PID, "node": NAME}
    <- {"event": "ended", "id": ID, "returncode": RC|null, "timed_out": BOOL, "pid": PID, "wall_s": S}
    <- {"event": "ended", "id": ID, "cancelled": true}
    <- {"event": "ended", "id": ID, "error": MESSAGE}

Each sim runs under :func:`orchestrator.procs.supervise`, exactly as the other
launchers run theirs: its own session, its timeout, the whole tree ended on timeout
or cancel. Its environment is the agent's without Slurm's and PMI's variables (so the
node-local ``mpiexec`` starts ranks here, not through ``srun``), plus the request's.
When stdin closes (the coordinator exited or died), every run is ended and the
agent exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from orchestrator.procs import supervise

log = logging.getLogger(__name__)

DROPPED_ENV_PREFIXES = ("SLURM_", "SLURMD_", "PMI_", "PMIX_", "OMPI_MCA_orte_", "HYDRA_")
"""Variables that would make the node-local mpiexec think it runs under Slurm or a PMI server."""


def sim_environment(base: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """The agent's environment minus Slurm/PMI variables, plus the request's."""
    env = {k: v for k, v in base.items() if not k.startswith(DROPPED_ENV_PREFIXES)}
    env.update(extra)
    return env


class Agent:
    """Runs requests as they come; replies when each ends."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.runs: dict[str, asyncio.Task[None]] = {}

    def reply(self, **fields: Any) -> None:
        self.out.write(json.dumps(fields) + "\n")
        self.out.flush()

    async def _run(self, msg: dict[str, Any]) -> None:
        run_id = str(msg["id"])
        try:
            proc = await supervise(
                msg["argv"], env=sim_environment(dict(os.environ), msg.get("env", {})),
                stdout=Path(msg["stdout"]), stderr=Path(msg["stderr"]), timeout=float(msg["timeout"]),
                cwd=Path(msg["cwd"]),
            )
        except asyncio.CancelledError:
            self.reply(event="ended", id=run_id, cancelled=True)
            raise
        except OSError as exc:
            self.reply(event="ended", id=run_id, error=f"cannot start {msg['argv'][0]!r}: {exc.strerror}")
            return
        finally:
            self.runs.pop(run_id, None)
        self.reply(event="ended", id=run_id, returncode=proc.returncode, timed_out=proc.timed_out, pid=proc.pid,
                   wall_s=proc.wall_s)

    def handle(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "start":
            self.runs[str(msg["id"])] = asyncio.ensure_future(self._run(msg))
        elif op == "cancel":
            task = self.runs.get(str(msg["id"]))
            if task is not None:
                task.cancel()
        else:
            log.warning("node agent: unknown request %r", msg)

    async def stop(self) -> None:
        for task in list(self.runs.values()):
            task.cancel()
        if self.runs:
            await asyncio.gather(*self.runs.values(), return_exceptions=True)


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # scancel, srun's end: end the runs first
        loop.add_signal_handler(sig, reader.feed_eof)
    agent = Agent(sys.stdout)
    agent.reply(event="ready", pid=os.getpid(), node=os.environ.get("SLURMD_NODENAME", socket.gethostname()))
    try:
        while line := await reader.readline():
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                log.warning("node agent: not a JSON line: %r", line[:200])
                continue
            if msg.get("op") == "exit":
                break
            agent.handle(msg)
    finally:
        await agent.stop()


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="node agent: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
