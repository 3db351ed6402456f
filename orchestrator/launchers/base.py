"""What every launcher shares: the request, the result, and the run itself.

Two kinds of launcher share :class:`Launcher` (``run``, ``command``, ``close``):

* :class:`ProcessLauncher` -- one process per sim (mpiexec, srun). The base runs
  the argv (never a shell string) under :func:`orchestrator.procs.supervise` and
  classifies how it ended; a subclass supplies only what differs: the command,
  the environment, where the launcher's own output goes, launch facts, and the
  hooks around a run (:meth:`ProcessLauncher.prepare`, :meth:`~ProcessLauncher.cancelled`,
  :meth:`~ProcessLauncher.finished`, e.g. scancel of a step srun left behind).
* a launcher with its own transport (spawn: a long-lived agent is asked to
  ``MPI_Comm_spawn`` the ranks), which implements :meth:`Launcher.run` itself.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from orchestrator import shm
from orchestrator.allocation import Placement
from orchestrator.errors import LaunchError
from orchestrator.procs import ProcessOutcome, cap_log, supervise, tail
from orchestrator.results import MalformedResult, Table
from orchestrator.rundeck import SIMKIT, SimIO

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """How one sim run ended. Only OK carries data."""

    OK = "ok"
    FAILED = "failed"  # non-zero exit or killed by a signal
    TIMEOUT = "timeout"  # ran past timeout_s and was killed
    MALFORMED = "malformed"  # exited 0 but its table is missing or invalid
    CANCELLED = "cancelled"  # the campaign no longer needed it

    @property
    def is_failure(self) -> bool:
        return self in (Outcome.FAILED, Outcome.TIMEOUT, Outcome.MALFORMED)


@dataclass(frozen=True)
class LaunchRequest:
    """One attempt of one sim run."""

    run_id: str
    """Unique within the campaign, e.g. ``generate-000012-a1``."""
    role: str
    """check or generate (or a benchmark's own name)."""
    binary: Path
    args: list[str]
    """Arguments after the binary, placeholders already filled."""
    ranks: int
    workdir: Path
    """Per-run directory: stdout, stderr and the result file live here."""
    timeout_s: float
    ncols: int
    """Columns the result must have."""
    nrows: int | None = None
    """Rows the result must have, if known."""
    placement: Placement | None = None
    """Where the ranks run (srun); None: wherever the launcher puts them."""
    ranks_per_node: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    fields: Mapping[str, float | int] = field(default_factory=dict)
    """The placeholder values of this run (``args`` were filled from them; so are input templates)."""

    @property
    def out_path(self) -> Path:
        return self.workdir / "result.npy"

    @property
    def stdout_path(self) -> Path:
        return self.workdir / "stdout.log"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / "stderr.log"


@dataclass
class SimResult:
    """The outcome of one attempt, as data: failures are results, not exceptions."""

    request: LaunchRequest
    outcome: Outcome
    table: Table | None
    returncode: int | None
    message: str
    started_wall: float
    wall_s: float
    info: dict[str, Any] = field(default_factory=dict)
    """Launcher facts for events.jsonl: pid, step id, nodes."""

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


def malformed(result: SimResult, exc: MalformedResult) -> SimResult:
    """A MALFORMED result, with the column count it returned where that was what was wrong."""
    if exc.columns is not None:
        result.info["columns_returned"] = exc.columns
    return result


def exit_description(rc: int | None) -> str:
    if rc is None:
        return "no exit code"
    if rc < 0:
        return f"killed by signal {-rc}"
    if rc > 128:
        return f"exit code {rc} (signal {rc - 128}?)"
    return f"exit code {rc}"


class Launcher(ABC):
    """Runs one attempt of a sim to a :class:`SimResult`."""

    name: ClassVar[str]
    io: SimIO = SIMKIT
    """Inputs staged into the run dir and where the result comes from (set per sim by the runner)."""

    @abstractmethod
    def command(self, req: LaunchRequest) -> list[str]:
        """What runs for ``req``, as data; it is logged as ``argv`` in the sim_start event.

        For a process launcher it is the exact argv executed. For spawn it is the
        agent's argv followed by the ``MPI_Comm_spawn`` call the agent makes.
        """

    @abstractmethod
    async def run(self, req: LaunchRequest) -> SimResult:
        """Run one attempt to its end and classify it; failures are results."""

    def program(self, req: LaunchRequest, *, absolute: bool = False) -> list[str]:
        """The binary, its args, and ``--out FILE`` for simkit sims."""
        binary, out = (req.binary.absolute(), req.out_path.absolute()) if absolute else (req.binary, req.out_path)
        return [str(binary), *req.args, *self.io.out_args(out)]

    def stage(self, req: LaunchRequest) -> None:
        """Create the run directory and put the sim's rendered inputs and static files in it."""
        req.workdir.mkdir(parents=True, exist_ok=True)
        self.io.stage(req.workdir, req.fields)

    async def close(self) -> None:
        """Release what the launcher holds between runs (an agent process); default: nothing."""
        return None

    @staticmethod
    def sweep_segments(result: SimResult, before: set[str]) -> None:
        """After a crash or timeout, remove the shared-memory segments the run's killed ranks left."""
        if result.outcome in (Outcome.FAILED, Outcome.TIMEOUT):
            removed = shm.sweep(before, result.started_wall, time.time())
            if removed:
                result.info["shm_removed"] = removed


class ProcessLauncher(Launcher):
    """A launcher that runs one process per sim; subclasses supply only what differs."""

    @abstractmethod
    def command(self, req: LaunchRequest) -> list[str]:
        """The whole argv: launcher, its options, the binary, its args, ``--out`` (simkit sims)."""

    def prepare(self, req: LaunchRequest) -> None:
        """Before the start: the run's directory exists, with the sim's rendered inputs and static files."""
        self.stage(req)

    def output_paths(self, req: LaunchRequest) -> tuple[Path, Path]:
        """Where the process's stdout and stderr go (default: the sim's own logs)."""
        return req.stdout_path, req.stderr_path

    async def cancelled(self, req: LaunchRequest) -> None:
        """After a cancelled run's process tree was killed; default: nothing more."""
        return None

    async def finished(self, req: LaunchRequest, result: SimResult) -> None:
        """After a run ended and was classified; default: nothing more."""
        return None

    def environment(self, req: LaunchRequest) -> dict[str, str]:
        """The sim's environment: ours, the sim's extras, and the rank count simkit checks."""
        env = dict(os.environ)
        env.update(req.env)
        env["SIMKIT_EXPECT_RANKS"] = str(req.ranks)
        return env

    def launch_info(self, req: LaunchRequest, outcome: ProcessOutcome) -> dict[str, Any]:
        """Facts recorded in events.jsonl for this attempt."""
        return {"pid": outcome.pid, "launcher": self.name}

    async def run(self, req: LaunchRequest) -> SimResult:
        """Run one attempt to its end and classify it."""
        self.prepare(req)
        argv = self.command(req)
        stdout, stderr = self.output_paths(req)
        segments = shm.snapshot()
        started = time.time()
        try:
            proc = await supervise(argv, env=self.environment(req), stdout=stdout, stderr=stderr,
                                   timeout=req.timeout_s, cwd=req.workdir)
        except FileNotFoundError as exc:
            raise LaunchError(f"sim {req.run_id}: cannot start {argv[0]!r}: {exc.strerror}") from exc
        except asyncio.CancelledError:
            await asyncio.shield(self.cancelled(req))
            shm.sweep(segments, started, time.time())
            raise
        result = self.classify(req, proc, started)
        result.info.update(self.launch_info(req, proc))
        if proc.log_error:
            result.info["log_error"] = proc.log_error
        await self.finished(req, result)
        if (req.stdout_path, req.stderr_path) != (stdout, stderr):
            for path in (req.stdout_path, req.stderr_path):  # written by another (slurmstepd): capped once done
                cap_log(path)
        self.sweep_segments(result, segments)
        return result

    def classify(self, req: LaunchRequest, proc: ProcessOutcome, started: float) -> SimResult:
        """Turn a finished process into a SimResult, reading and checking the table."""
        def result(outcome: Outcome, message: str, table: Table | None = None) -> SimResult:
            return SimResult(req, outcome, table, proc.returncode, message, started, proc.wall_s)

        if proc.timed_out:
            return result(Outcome.TIMEOUT, f"timed out after {req.timeout_s:g} s; process tree killed")
        if proc.returncode != 0:
            stderr = tail(req.stderr_path)
            return result(Outcome.FAILED, f"{exit_description(proc.returncode)}; stderr: {stderr or '(empty)'}")
        try:
            table = self.io.collect(req.workdir, req.out_path, ncols=req.ncols, nrows=req.nrows)
        except MalformedResult as exc:
            return malformed(result(Outcome.MALFORMED, str(exc)), exc)
        return result(Outcome.OK, "ok", table)
