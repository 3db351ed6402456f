"""spawn: sims started with ``MPI_Comm_spawn``; rows come back over the intercommunicator.

MPI stays out of the coordinator: the spawns happen in spawn agents
(:mod:`orchestrator.launchers.spawn_agent`), small processes this launcher
starts on first use, talks to over stdin/stdout (JSON lines, the table as raw
float64 bytes), and stops in :meth:`SpawnLauncher.close`. One agent serves one
sim at a time; several sims in flight use several agents (``MPI_Comm_spawn``
from several threads of one process fails in this MPICH, and hydra kills the
spawning process when a spawned rank crashes, so one agent per sim also keeps
failures apart). An agent that fails, times out or dies is replaced.

Where the agent runs follows the verified platform facts:

* outside Slurm it is a plain child process, an MPI singleton; MPICH's
  singleton init starts hydra's ``mpiexec`` from the venv (on ``PATH``, with
  ``HYDRA_LAUNCHER=fork``);
* inside an allocation it is ``srun --mpi=pmi2 -N1 -n1 --overlap``, so spawns
  go through Slurm's PMI2: each becomes ``srun --mpi=pmi2 --nodelist=HOSTS``
  with the agent's step environment (``SLURM_OVERLAP=1``, and
  ``SLURM_DISTRIBUTION=arbitrary`` so the ``host`` info key, one node name per
  rank, places every rank where :class:`~orchestrator.allocation.SlotPool` said).

Every spawned rank is ``env VARS /bin/sh -c 'exec "$@" >>stdout 2>>stderr' …
BINARY ARGS``: ``MPI_Comm_spawn`` has no per-spawn environment or output
files, so ``env`` carries ``SIMKIT_EXPECT_RANKS`` and the sim's extras and a
fixed shell line (no value is ever pasted into it) sends the output to the
run's own logs. The table is checked with :func:`~orchestrator.results.check_table`
exactly as a file result, and the number of spawned ranks against the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from orchestrator import procs, shm
from orchestrator.allocation import Allocation
from orchestrator.errors import LaunchError
from orchestrator.launchers.base import Launcher, LaunchRequest, Outcome, SimResult, exit_description, malformed
from orchestrator.launchers.mpiexec import find_mpiexec
from orchestrator.procs import end_ranks, guardian, kill_known, kill_tree, tail, wait_gone
from orchestrator.results import MalformedResult, check_table

log = logging.getLogger(__name__)

AGENT_MODULE = "orchestrator.launchers.spawn_agent"
AGENT_START_TIMEOUT_S = 60.0
AGENT_STOP_GRACE_S = 8.0
"""How long a failed agent may take to end its children and exit before we kill its whole tree."""
BACKSTOP_S = 10.0
"""The agent enforces a run's timeout itself; we end the agent if it has not answered this much later."""
AGENT_LOG = "agent.log"
SPAWN_WATCH_S = 0.02
"""Under Slurm, while the agent is inside ``MPI_Comm_spawn``: how often we look at the spawn's srun."""
SPAWN_GONE_GRACE_S = 2.0
"""How long after the spawn's srun has exited the agent may still report the spawn (its line on the way)."""
SPAWN_GONE = ("the spawned ranks exited before MPI_Init was done (MPI_Comm_spawn was still waiting for them; "
              "the agent was ended)")
WRAPPER = 'out=$1 err=$2; shift 2; exec "$@" >>"$out" 2>>"$err"'
"""The fixed line every spawned rank runs under: its output to the run's logs. No value is pasted in."""
KEEP_SLURM = ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_CONF", "SLURM_CLUSTER_NAME")
"""Inside Slurm the agent's environment becomes every spawned srun's: only these job variables
survive, so the outer salloc's node and task counts cannot override the placement."""


class AgentGone(Exception):
    """The agent exited or closed its output before answering."""


class SpawnAgent:
    """One agent process, as the coordinator sees it."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path, ready: dict[str, Any]) -> None:
        self.proc = proc
        self.log_path = log_path
        self.ready = ready
        self.known: set[tuple[int, int]] = set()
        """Every (pid, start time) the agent reported below it: killed with it if it dies."""

    def remember(self, event: dict[str, Any]) -> None:
        """Add the (pid, start time) pairs an event reports (the guardian watches local ones)."""
        pairs = {(int(pid), int(start)) for pid, start in event.get("pids", [])}
        if self.ready.get("host", socket.gethostname()) == socket.gethostname():
            for pid, _ in pairs - self.known:
                guardian.watch_pid(pid)
        self.known.update(pairs)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def start(cls, argv: list[str], env: dict[str, str], log_path: Path, timeout: float) -> SpawnAgent:
        log.info("spawn agent: starting %s (log %s)", argv, log_path)
        with log_path.open("ab") as err:
            try:
                proc = await procs.start(argv, env=env, stdin=asyncio.subprocess.PIPE,
                                         stdout=asyncio.subprocess.PIPE, stderr=err, limit=1 << 24)
            except FileNotFoundError as exc:
                raise LaunchError(f"cannot start the spawn agent {argv[0]!r}: {exc.strerror}") from exc
        agent = cls(proc, log_path, {})
        try:
            ready, _ = await asyncio.wait_for(agent.receive(), timeout)
        except (TimeoutError, AgentGone) as exc:
            await agent.stop(grace=0)
            why = "did not start in time" if isinstance(exc, TimeoutError) else "exited at start"
            raise LaunchError(f"the spawn agent {why}: {' '.join(argv)}\n{tail(log_path, 15)}") from exc
        if ready.get("event") != "ready":
            await agent.stop(grace=0)
            raise LaunchError(f"the spawn agent said {ready!r} instead of ready; log: {tail(log_path, 15)}")
        agent.ready = ready
        agent.remember(ready)
        log.info("spawn agent %d ready on %s: %s", proc.pid, ready.get("host"), ready.get("mpi"))
        return agent

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    async def send(self, message: dict[str, Any]) -> None:
        stdin = self.proc.stdin
        if stdin is None or stdin.is_closing():
            raise AgentGone("agent input closed")
        stdin.write(json.dumps(message).encode() + b"\n")
        try:
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise AgentGone("agent input closed") from exc

    async def receive(self) -> tuple[dict[str, Any], bytes]:
        """One event and its payload (``nbytes`` raw bytes after the line)."""
        stdout = self.proc.stdout
        assert stdout is not None
        line = await stdout.readline()
        if not line:
            raise AgentGone("agent output closed")
        try:
            event: dict[str, Any] = json.loads(line)
        except ValueError as exc:
            raise AgentGone(f"agent wrote {line[:200]!r}, not a protocol line") from exc
        nbytes = int(event.get("nbytes") or 0)
        try:
            payload = await stdout.readexactly(nbytes) if nbytes else b""
        except asyncio.IncompleteReadError as exc:
            raise AgentGone("agent output ended inside a table") from exc
        return event, payload

    async def stop(self, grace: float = AGENT_STOP_GRACE_S) -> None:
        """Ask the agent to exit (end of input), wait up to ``grace``, then kill all it started."""
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        if grace > 0 and self.running:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), grace)
        if self.running:
            killed = await asyncio.to_thread(kill_tree, self.pid, self.known)
        else:  # its pid may be reused by now: only the (pid, start time) pairs it reported
            killed = await asyncio.to_thread(kill_known, self.known)
        await self.proc.wait()
        leftovers = [(pid, start) for pid, start in self.known if pid in killed]
        if leftovers:
            await asyncio.to_thread(wait_gone, leftovers, 5.0)
        guardian.unwatch_group(self.pid)
        if self.ready.get("host", socket.gethostname()) == socket.gethostname():
            for pid, _ in self.known:
                guardian.unwatch_pid(pid)
        log.debug("spawn agent %d stopped (rc %s); killed %s", self.pid, self.proc.returncode, killed)


class SpawnLauncher(Launcher):
    """``MPI_Comm_spawn(env … sh -c … BINARY, ARGS, maxprocs=N, info={wdir, host})`` from a spawn agent."""

    name: ClassVar[str] = "spawn"

    def __init__(self, alloc: Allocation, *, python: str | None = None,
                 agent_start_timeout_s: float = AGENT_START_TIMEOUT_S) -> None:
        self.alloc = alloc
        self.mode = "slurm" if alloc.in_slurm else "local"
        self.python = python or sys.executable
        self.agent_start_timeout_s = agent_start_timeout_s
        self._idle: list[SpawnAgent] = []
        self._busy: set[SpawnAgent] = set()
        self._tmp: Path | None = None
        self._started = 0
        self._env_tool = shutil.which("env") or "/usr/bin/env"

    # -- commands, as data ---------------------------------------------------
    def agent_argv(self) -> list[str]:
        """How an agent is started (the same for every agent of this launcher)."""
        agent = [self.python, "-m", AGENT_MODULE, "--mode", self.mode]
        if self.mode == "local":
            return agent
        node = self.alloc.nodes[0].name
        # No --distribution here: srun would export it to the step and so to every spawned srun.
        return ["srun", "--mpi=pmi2", "-N1", "-n1", "--overlap", "-u", f"--nodelist={node}",
                "--job-name=spawn-agent", *agent]

    def agent_env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the agent is Python: its lines must not wait in a buffer
        if self.mode == "local":
            hydra = str(Path(find_mpiexec()).parent)  # singleton init runs `mpiexec` from PATH
            env["PATH"] = os.pathsep.join([hydra, env.get("PATH", "")])
            env["HYDRA_LAUNCHER"] = "fork"
            return env
        env = {k: v for k, v in env.items() if not k.startswith("SLURM_") or k in KEEP_SLURM}
        env.update(SLURM_OVERLAP="1", SLURM_DISTRIBUTION="arbitrary", SLURM_KILL_BAD_EXIT="1")
        return env

    def spawn_argv(self, req: LaunchRequest) -> list[str]:
        """The command and arguments handed to ``MPI_Comm_spawn``."""
        extras = {**req.env, "SIMKIT_EXPECT_RANKS": str(req.ranks)}
        return [self._env_tool, *(f"{k}={v}" for k, v in extras.items()), "/bin/sh", "-c", WRAPPER, "sh",
                str(req.stdout_path.absolute()), str(req.stderr_path.absolute()), str(req.binary.absolute()),
                *req.args]

    def spawn_info(self, req: LaunchRequest) -> dict[str, str]:
        """``MPI_Info`` keys: ``wdir``, and inside Slurm ``host`` (one node name per rank)."""
        info = {"wdir": str(req.workdir.absolute())}
        if self.mode == "slurm":
            if req.placement is not None:
                hosts = [name for name, count in req.placement.per_node for _ in range(count)]
            else:
                hosts = [self.alloc.nodes[0].name] * req.ranks
            info["host"] = ",".join(hosts)
        return info

    def command(self, req: LaunchRequest) -> list[str]:
        info = [f"info:{k}={v}" for k, v in self.spawn_info(req).items()]
        return [*self.agent_argv(), "MPI_Comm_spawn", f"maxprocs={req.ranks}", *info, *self.spawn_argv(req)]

    # -- agents ----------------------------------------------------------------
    async def _checkout(self) -> tuple[SpawnAgent, bool]:
        """An idle agent, or a new one: (agent, whether it is new)."""
        while self._idle:
            agent = self._idle.pop()
            if agent.running:
                self._busy.add(agent)
                return agent, False
            await agent.stop(grace=0)
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="orch-spawn-"))
        self._started += 1
        log_path = self._tmp / f"agent-{self._started}.log"
        agent = await SpawnAgent.start(self.agent_argv(), self.agent_env(), log_path, self.agent_start_timeout_s)
        self._busy.add(agent)
        return agent, True

    async def _checkin(self, agent: SpawnAgent, reusable: bool) -> None:
        self._busy.discard(agent)
        if reusable and agent.running:
            self._idle.append(agent)
        else:
            await agent.stop()

    async def close(self) -> None:
        """Stop every agent and whatever they still run; remove the agents' logs."""
        agents = [*self._idle, *self._busy]
        self._idle.clear()
        self._busy.clear()
        await asyncio.gather(*(a.stop(grace=5.0) for a in agents))
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # -- one run ---------------------------------------------------------------
    async def run(self, req: LaunchRequest) -> SimResult:
        if not os.access(req.binary, os.X_OK):
            raise LaunchError(f"sim {req.run_id}: {req.binary} does not exist or is not executable")
        self.stage(req)
        for path in (req.stdout_path, req.stderr_path):
            path.write_bytes(b"")  # every rank appends
        spawn = self.spawn_argv(req)
        message = {"op": "spawn", "id": req.run_id, "command": spawn[0], "args": spawn[1:],
                   "maxprocs": req.ranks, "info": self.spawn_info(req), "wdir": str(req.workdir.absolute()),
                   "binary": str(req.binary.absolute()), "timeout_s": req.timeout_s}
        segments = shm.snapshot()
        started, t0 = time.time(), time.monotonic()
        for attempt in (1, 2):
            agent, fresh = await self._checkout()
            facts: dict[str, Any] = {"launcher": self.name, "pid": agent.pid, "agent_pid": agent.ready.get("pid"),
                                     "agent_mode": self.mode, "agent_host": agent.ready.get("host")}
            reply, payload, reusable = await self._attempt(agent, message, facts, req, t0)
            if not reusable:
                await self._end_spawned_sruns(agent, req)
            await self._checkin(agent, reusable)
            if not reusable:
                await self._end_ranks(req)
            if reply.get("status") == "agent_died" and "remote_size" not in facts and not fresh and attempt == 1:
                # An idle agent that died since its last run (nothing was spawned): once more on a fresh one.
                log.info("sim %s: spawn agent %d was gone before spawning; starting another", req.run_id, agent.pid)
                continue
            break
        result = self._classify(req, reply, payload, started, time.monotonic() - t0)
        result.info.update(facts)
        for path in (req.stdout_path, req.stderr_path):  # the ranks' shells wrote them: capped once done
            procs.cap_log(path)
        self.sweep_segments(result, segments)
        if "timing" in reply:
            result.info["agent_timing"] = reply["timing"]
        return result

    async def _attempt(self, agent: SpawnAgent, message: dict[str, Any], facts: dict[str, Any],
                       req: LaunchRequest, t0: float) -> tuple[dict[str, Any], bytes, bool]:
        """One request to one agent: (reply, table bytes, whether the agent may serve again)."""
        mark = agent.log_size()
        reusable = False
        try:
            reply, payload = await asyncio.wait_for(self._exchange(agent, message, facts),
                                                    req.timeout_s + BACKSTOP_S)
            reusable = bool(reply.get("reusable"))
        except TimeoutError:
            reply, payload = {"status": "timeout", "message": "the spawn agent did not answer; ended it"}, b""
        except AgentGone as exc:
            late = time.monotonic() - t0 >= req.timeout_s
            if facts.get("ended_in_mpi_init"):
                reply, payload = {"status": "spawn_error", "message": SPAWN_GONE}, b""
            else:
                reply, payload = {"status": "timeout" if late else "agent_died", "message": str(exc)}, b""
        except asyncio.CancelledError:
            self._busy.discard(agent)
            await asyncio.shield(self._end_spawned_sruns(agent, req))
            await asyncio.shield(agent.stop(grace=0))
            await asyncio.shield(self._end_ranks(req))
            raise
        finally:
            if not reusable:
                self._keep_agent_log(agent, mark, req)
        return reply, payload, reusable

    async def _exchange(self, agent: SpawnAgent, message: dict[str, Any],
                        facts: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        await agent.send(message)
        watch = asyncio.ensure_future(self.watch_spawn(agent, message["wdir"], facts)) if self.mode == "slurm" else None
        try:
            while True:
                event, payload = await agent.receive()
                if event.get("event") == "spawned":
                    if watch is not None:
                        watch.cancel()
                    agent.remember(event)
                    facts.update(remote_size=event.get("remote_size"), spawn_ms=event.get("spawn_ms"))
                elif event.get("event") == "result":
                    return event, payload
                else:
                    log.warning("spawn agent %d: unexpected %r", agent.pid, event)
        finally:
            if watch is not None:
                watch.cancel()

    async def watch_spawn(self, agent: SpawnAgent, wdir: str, facts: dict[str, Any]) -> None:
        """Under Slurm, while the agent is inside ``MPI_Comm_spawn``: end it if the spawn's ranks are gone.

        Slurm's PMI2 starts a spawn's ``srun`` as a child of the srun that started
        the agent, here. If that srun has come and gone and the agent has still
        not reported the spawn, the ranks ended before ``MPI_Init`` was done
        (pmi2's "invalid client request", a missing library, a sim that exits at
        once), and ``MPI_Comm_spawn`` would wait for them until the timeout. After
        a good spawn no rank ends before the agent has its rows (simkit waits for
        the agent's acknowledgement), so a gone srun cannot be a finished run.
        """
        seen: dict[int, procs.ProcInfo] = {}
        while not seen or any(procs.alive(p.pid, p.start) for p in seen.values()):
            await asyncio.sleep(SPAWN_WATCH_S)
            seen.update((p.pid, p) for p in procs.find_spawned_sruns(agent.pid, wdir))
        await asyncio.sleep(SPAWN_GONE_GRACE_S)  # a "spawned" line already in the pipe cancels this
        log.info("spawn agent %d: the spawn's srun %s exited before the spawn was done; ending the agent",
                 agent.pid, sorted(seen))
        facts["ended_in_mpi_init"] = True
        await agent.stop(grace=0)

    async def _end_spawned_sruns(self, agent: SpawnAgent, req: LaunchRequest) -> None:
        """Under Slurm, SIGTERM to a failed spawn's srun first: it then cancels its step on every node
        (the agent can end only the ranks on its own host, and a SIGKILLed srun leaves the step running)."""
        if self.mode != "slurm":
            return
        sruns = [(p.pid, p.start) for p in procs.find_spawned_sruns(agent.pid, str(req.workdir.absolute()))]
        if not sruns:
            return
        procs.signal_procs(sruns, signal.SIGTERM)
        if not await asyncio.to_thread(wait_gone, sruns, procs.KILL_GRACE_S):
            log.warning("sim %s: its srun was still running %.0f s after SIGTERM; killing it", req.run_id,
                        procs.KILL_GRACE_S)

    async def _end_ranks(self, req: LaunchRequest) -> None:
        killed = await asyncio.to_thread(end_ranks, str(req.workdir.absolute()), str(req.binary.absolute()))
        if killed:
            log.info("sim %s: killed ranks %s left after its agent ended", req.run_id, killed)

    def _keep_agent_log(self, agent: SpawnAgent, mark: int, req: LaunchRequest) -> None:
        text = agent.log_since(mark)
        if text.strip():
            with contextlib.suppress(OSError):
                (req.workdir / AGENT_LOG).write_text(text)

    def _classify(self, req: LaunchRequest, reply: dict[str, Any], payload: bytes, started: float,
                  wall_s: float) -> SimResult:
        def result(outcome: Outcome, message: str, table: Any = None, rc: int | None = None) -> SimResult:
            return SimResult(req, outcome, table, rc, message, started, wall_s)

        status = reply.get("status")
        stderr = tail(req.stderr_path) or "(empty)"
        agent_log = tail(req.workdir / AGENT_LOG, 3)
        context = f"; stderr: {stderr}" + (f"; agent: {agent_log}" if agent_log else "")
        if status == "timeout":
            return result(Outcome.TIMEOUT, f"timed out after {req.timeout_s:g} s; spawned ranks killed")
        if status == "failed":
            code = int(reply.get("code", 1))
            return result(Outcome.FAILED, f"{exit_description(code)} (reported to the spawn parent){context}",
                          rc=code)
        if status == "no_result":
            return result(Outcome.FAILED, f"{reply.get('message')}{context}")
        if status == "agent_died":
            return result(Outcome.FAILED, "a spawned rank crashed or called MPI_Abort, which ends the spawning "
                                          f"agent too ({reply.get('message')}){context}")
        if status == "malformed":
            return result(Outcome.MALFORMED, f"{req.workdir}: {reply.get('message')}")
        if status != "ok":
            return result(Outcome.FAILED, f"{reply.get('message') or status}{context}")
        remote = reply.get("remote_size")
        if remote != req.ranks:
            return result(Outcome.MALFORMED, f"{req.workdir}: spawned {remote} ranks, asked for {req.ranks}")
        try:
            nrows, ncols = (int(n) for n in reply["shape"])
            table = np.frombuffer(payload, dtype="<f8").reshape(nrows, ncols).astype(np.float64)
            table = check_table(table, ncols=req.ncols, nrows=req.nrows, source=f"{req.workdir} (spawned rows)")
        except MalformedResult as exc:
            return malformed(result(Outcome.MALFORMED, str(exc)), exc)
        except (ValueError, KeyError) as exc:
            return result(Outcome.MALFORMED, str(exc))
        return result(Outcome.OK, "ok", table, rc=0)
