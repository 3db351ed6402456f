"""agent: many small sims through one long-lived agent per node, not one srun step each.

A sim whose placement is one node is started by that node's agent
(:mod:`orchestrator.node_agent`) with the node-local MPI launcher
(``mpiexec -n N BINARY ARGS --out FILE``), under the same supervision as every
other launcher: its timeout, the whole tree killed, stdout/stderr in the run
directory, the same classification (:meth:`Launcher.classify`). A one-rank sim of
an MPICH build (the wheel's or a system's) skips ``mpiexec``: the agent execs the
binary itself and MPICH starts as a singleton (no PMI variables reach it, so it needs
no process manager): a run costs one process start, not hydra's three (mpiexec, its
proxy, the rank). Open MPI sims, and sims of unknown MPI, keep ``mpiexec``. The agent itself
is one Slurm step per node (``srun --overlap -N1 -n1 --nodelist NODE``), started
the first time the node is used and ended by :meth:`NodeAgentLauncher.close`; a
campaign on 3 nodes creates 3 steps, whatever its number of sims. Sims spanning
nodes still go through :class:`~orchestrator.launchers.srun.SrunLauncher`.

Outside Slurm the agent is a plain child process (tests, laptops).

:class:`RateLimitedSrunLauncher` is the plain srun launcher with a cap on step
creations per second (``resources.srun_steps_per_s``), for sites that flag jobs
creating steps too fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from orchestrator import shm
from orchestrator.allocation import Allocation
from orchestrator.errors import LaunchError
from orchestrator.launchers.base import LaunchRequest, Outcome, ProcessLauncher, SimResult
from orchestrator.launchers.mpiexec import ISOLATE, can_isolate, find_mpiexec
from orchestrator.launchers.srun import SrunLauncher
from orchestrator.mpi import Flavour, MpiInfo, local_command
from orchestrator.procs import KILL_GRACE_S, ProcessOutcome, kill_group, start
from orchestrator.rundeck import SIMKIT, SimIO
from orchestrator.slurm import end_steps, srun_env

log = logging.getLogger(__name__)

AGENT_READY_TIMEOUT_S = 60.0
"""How long an agent may take to say it is ready (an srun step start plus a Python start)."""
AGENT_SLACK_S = 30.0
"""A run's reply may come this long after its timeout before the agent counts as lost."""
AGENT_LOG = "agent-{node}.log"
SINGLETON_FLAVOURS = frozenset({Flavour.MPICH})
"""MPIs whose one-rank run starts without a process manager (MPICH's singleton init, checked with the
PyPI wheel's MPICH 5 and Debian's MPICH 4); Open MPI's singleton starts a daemon of its own."""


class AgentLost(LaunchError):
    """The node agent exited or stopped answering."""


def agent_step_name(node: str) -> str:
    return f"orch-agent-{node}"


def agent_srun_argv(node: str, *, srun: str = "srun") -> list[str]:
    """One step on ``node`` that overlaps the sims' steps and takes none of their slots."""
    return [srun, "--overlap", "--mpi=none", "-N1", "-n1", "-c1", "--nodelist", node,
            "--job-name", agent_step_name(node), "--kill-on-bad-exit=1",
            sys.executable, "-m", "orchestrator.node_agent"]


def local_agent_argv(node: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.node_agent"]


class AgentProcess:
    """One running agent: requests out, replies matched to their runs."""

    def __init__(self, node: str, proc: asyncio.subprocess.Process) -> None:
        self.node = node
        self.proc = proc
        self.pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            while line := await self.proc.stdout.readline():
                try:
                    msg = json.loads(line)
                except json.JSONDecodeError:
                    log.warning("agent %s: not a JSON line: %r", self.node, line[:200])
                    continue
                if msg.get("event") == "ready" and not self.ready.done():
                    self.ready.set_result(msg)
                    continue
                fut = self.pending.pop(str(msg.get("id")), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        finally:
            lost = AgentLost(f"the node agent on {self.node} exited (code {await self.proc.wait()}); "
                             f"see its log in the run directory")
            for fut in [self.ready, *self.pending.values()]:
                if not fut.done():
                    fut.set_exception(lost)
            self.pending.clear()

    def send(self, **msg: Any) -> None:
        if self.proc.stdin is None or self.proc.stdin.is_closing():
            raise AgentLost(f"the node agent on {self.node} is gone")
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())

    async def run(self, run_id: str, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Start one run and wait for its reply; a cancel reaches the agent, which ends the tree."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[run_id] = fut
        self.send(op="start", id=run_id, **msg)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout + AGENT_SLACK_S)
        except TimeoutError as exc:
            raise AgentLost(f"the node agent on {self.node} did not answer for run {run_id}") from exc
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                self.send(op="cancel", id=run_id)
                await asyncio.wait_for(asyncio.shield(fut), KILL_GRACE_S + AGENT_SLACK_S)
            raise

    async def close(self) -> None:
        """Ask the agent to end its runs and exit; kill it if it does not."""
        with contextlib.suppress(Exception):
            self.send(op="exit")
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), KILL_GRACE_S + 10)
        except TimeoutError:
            kill_group(self.proc.pid)
            await self.proc.wait()
        await self._reader


class AgentPool:
    """One agent per node, started on first use, shared by every sim role of a campaign."""

    def __init__(self, alloc: Allocation, *, agent_argv: Callable[[str], list[str]] | None = None,
                 log_dir: Path | None = None) -> None:
        self.alloc = alloc
        self.agent_argv = agent_argv or (agent_srun_argv if alloc.in_slurm else local_agent_argv)
        self.log_dir = log_dir
        self.agents: dict[str, AgentProcess] = {}
        self._starting: dict[str, asyncio.Task[AgentProcess]] = {}
        self.steps_started = 0
        """Agent processes (in Slurm: srun steps) started; multi-node srun steps not counted."""

    async def agent(self, node: str) -> AgentProcess:
        """The node's agent, started on first use (concurrent first uses share one start)."""
        if node in self.agents and self.agents[node].proc.returncode is None:
            return self.agents[node]
        if node not in self._starting:
            self._starting[node] = asyncio.ensure_future(self._start(node))
        try:
            agent = await asyncio.shield(self._starting[node])
        finally:
            if self._starting.get(node) is not None and self._starting[node].done():
                del self._starting[node]
        return agent

    async def _start(self, node: str) -> AgentProcess:
        argv = self.agent_argv(node)
        log_dir = self.log_dir or Path.cwd()
        log_dir.mkdir(parents=True, exist_ok=True)
        log.info("agent %s: starting %s", node, argv)
        with (log_dir / AGENT_LOG.format(node=node)).open("ab") as err:
            proc = await start(argv, env=srun_env(dict(os.environ)), stdin=asyncio.subprocess.PIPE,
                               stdout=asyncio.subprocess.PIPE, stderr=err, limit=1 << 24)
        self.steps_started += 1
        agent = AgentProcess(node, proc)
        try:
            await asyncio.wait_for(asyncio.shield(agent.ready), AGENT_READY_TIMEOUT_S)
        except (TimeoutError, AgentLost) as exc:
            await agent.close()
            raise LaunchError(f"the node agent on {node} did not start ({exc or 'no answer'}); "
                              f"see {log_dir / AGENT_LOG.format(node=node)}") from exc
        self.agents[node] = agent
        return agent

    async def close(self) -> None:
        """End every agent (idempotent: each role's launcher closes the shared pool)."""
        agents, self.agents = list(self.agents.values()), {}
        await asyncio.gather(*(a.close() for a in agents), return_exceptions=True)
        if self.alloc.in_slurm and self.alloc.job_id is not None:
            for a in agents:  # make sure Slurm lists no agent step any more
                await end_steps(self.alloc.job_id, agent_step_name(a.node))


class NodeAgentLauncher(ProcessLauncher):
    """Single-node sims through a per-node agent (node-local mpiexec); multi-node sims via srun.

    One launcher per sim role (its MPI, its input deck, its result source); the agents
    themselves are an :class:`AgentPool` the roles share."""

    name: ClassVar[str] = "agent"

    def __init__(
        self, alloc: Allocation, *, mpi: MpiInfo | None = None, mpiexec: str | None = None,
        srun: SrunLauncher | None = None, pool: AgentPool | None = None,
        agent_argv: Callable[[str], list[str]] | None = None, log_dir: Path | None = None,
        isolate: bool | None = None,
    ) -> None:
        self.alloc = alloc
        self._io = SIMKIT
        self.mpi = mpi
        self.mpiexec = mpiexec or (mpi.mpiexec if mpi is not None else None) or find_mpiexec()
        wheel = mpi.is_wheel_mpich if mpi is not None else mpiexec is None
        self.isolate = (wheel and can_isolate()) if isolate is None else isolate
        """The node-local mpiexec in a private network namespace, as the mpiexec launcher runs it: the
        wheel's hydra listens on every interface, where any account on the node could reach it (checked
        on the coordinator's node, which inside an allocation is one of the sims' nodes)."""
        self.srun = srun if srun is not None else (SrunLauncher(alloc, mpi=mpi.srun_plugin if mpi else "pmi2")
                                                   if alloc.in_slurm else None)
        self.pool = pool or AgentPool(alloc, agent_argv=agent_argv, log_dir=log_dir)
        self._ids = itertools.count(1)

    @property
    def io(self) -> SimIO:
        return self._io

    @io.setter
    def io(self, value: SimIO) -> None:
        self._io = value  # the multi-node srun path stages and reads results the same way
        if self.srun is not None:
            self.srun.io = value

    @property
    def steps_started(self) -> int:
        return self.pool.steps_started

    def command(self, req: LaunchRequest) -> list[str]:
        if self._multi_node(req):
            assert self.srun is not None
            return self.srun.command(req)
        if self.singleton(req):
            return self.program(req, absolute=True)
        head = local_command(self.mpi, req.ranks)[1:] if self.mpi is not None else ["-n", str(req.ranks)]
        isolate = ISOLATE if self.isolate else []
        return [*isolate, self.mpiexec, *head, *self.program(req, absolute=True)]  # the agent runs it in the run dir

    def singleton(self, req: LaunchRequest) -> bool:
        """Whether this run is one rank of an MPI that starts it without mpiexec."""
        return req.ranks == 1 and self.mpi is not None and self.mpi.flavour in SINGLETON_FLAVOURS

    @staticmethod
    def _multi_node(req: LaunchRequest) -> bool:
        return req.placement is not None and len(req.placement.nodes) > 1

    def _node(self, req: LaunchRequest) -> str:
        return req.placement.nodes[0] if req.placement is not None else self.alloc.nodes[0].name

    def sim_env(self, req: LaunchRequest) -> dict[str, str]:
        """Only what the agent adds to its own environment: the sim's extras, the rank check, and what
        the sim's MPI needs to run locally (e.g. Open MPI as root)."""
        env = {**req.env, "SIMKIT_EXPECT_RANKS": str(req.ranks)}
        if self.mpi is None:
            return env
        wanted = {k: v for k, v in self.mpi.local_env(req.ranks).items() if k not in os.environ}
        return {**wanted, **env}

    async def run(self, req: LaunchRequest) -> SimResult:
        if self._multi_node(req):
            if self.srun is None:
                raise LaunchError(f"sim {req.run_id}: a multi-node placement needs Slurm")
            return await self.srun.run(req)
        node = self._node(req)
        agent = await self.pool.agent(node)
        self.stage(req)  # the input deck and static files, as every launcher
        msg = {"argv": self.command(req), "env": self.sim_env(req), "cwd": str(req.workdir.absolute()),
               "stdout": str(req.stdout_path.absolute()), "stderr": str(req.stderr_path.absolute()),
               "timeout": req.timeout_s}
        segments = shm.snapshot()
        started = time.time()
        t0 = time.monotonic()
        try:
            reply = await agent.run(f"{req.run_id}#{next(self._ids)}", msg, req.timeout_s)
        except asyncio.CancelledError:
            shm.sweep(segments, started, time.time())
            raise
        except AgentLost as exc:
            return SimResult(req, Outcome.FAILED, None, None, str(exc), started, time.monotonic() - t0,
                             {"launcher": self.name, "node": node})
        if "error" in reply:
            raise LaunchError(f"sim {req.run_id}: {reply['error']}")
        if reply.get("cancelled"):  # the agent was stopped (scancel, a signal) and ended the run
            return SimResult(req, Outcome.FAILED, None, None, f"the node agent on {node} exited and ended this run",
                             started, time.monotonic() - t0, {"launcher": self.name, "node": node})
        proc = ProcessOutcome(reply["returncode"], bool(reply["timed_out"]), int(reply["pid"]),
                              float(reply["wall_s"]))
        result = self.classify(req, proc, started)
        result.info.update(self.launch_info(req, proc))
        result.info.update(node=node, agent_pid=agent.ready.result().get("pid"))
        self.sweep_segments(result, segments)
        return result

    async def close(self) -> None:
        await self.pool.close()


class StepRate:
    """At most ``per_s`` step creations per second, spaced evenly (no burst), without polling."""

    def __init__(self, per_s: float) -> None:
        if per_s <= 0:
            raise ValueError(f"a step rate must be positive, got {per_s}")
        self.interval = 1.0 / per_s
        self._next = 0.0

    async def wait(self) -> None:
        now = time.monotonic()
        at = max(now, self._next)
        self._next = at + self.interval
        if at > now:
            await asyncio.sleep(at - now)


class RateLimitedSrunLauncher(SrunLauncher):
    """The srun launcher, creating at most ``rate.per_s`` steps per second (shared by every role)."""

    def __init__(self, alloc: Allocation, rate: StepRate, **kwargs: Any) -> None:
        super().__init__(alloc, **kwargs)
        self.rate = rate

    async def run(self, req: LaunchRequest) -> SimResult:
        await self.rate.wait()
        return await super().run(req)
