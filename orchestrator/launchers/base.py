"""What every launcher shares: the request, the result, and the run itself.

A launcher turns (sim, args, slots) into an argv list (never a shell string),
runs it under :func:`orchestrator.procs.supervise` and classifies how it ended.
Subclasses only say how the command is built (:meth:`Launcher.command`).
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
from orchestrator.procs import ProcessOutcome, supervise, tail
from orchestrator.results import MalformedResult, Table, read_table

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


def exit_description(rc: int | None) -> str:
    if rc is None:
        return "no exit code"
    if rc < 0:
        return f"killed by signal {-rc}"
    if rc > 128:
        return f"exit code {rc} (signal {rc - 128}?)"
    return f"exit code {rc}"


class Launcher(ABC):
    """Builds and runs the command for a request."""

    name: ClassVar[str]

    @abstractmethod
    def command(self, req: LaunchRequest) -> list[str]:
        """The whole argv: launcher, its options, the binary, its args, ``--out``."""

    async def close(self) -> None:
        """Release what the launcher holds between runs (an agent process); default: nothing."""
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
        req.workdir.mkdir(parents=True, exist_ok=True)
        argv = self.command(req)
        segments = shm.snapshot()
        started = time.time()
        try:
            proc = await supervise(
                argv, env=self.environment(req), stdout=req.stdout_path, stderr=req.stderr_path,
                timeout=req.timeout_s, cwd=req.workdir,
            )
        except FileNotFoundError as exc:
            raise LaunchError(f"sim {req.run_id}: cannot start {argv[0]!r}: {exc.strerror}") from exc
        except asyncio.CancelledError:
            shm.sweep(segments, started, time.time())
            raise
        result = self.classify(req, proc, started)
        result.info.update(self.launch_info(req, proc))
        self.sweep_segments(result, segments)
        return result

    @staticmethod
    def sweep_segments(result: SimResult, before: set[str]) -> None:
        """After a crash or timeout, remove the shared-memory segments the run's killed ranks left."""
        if result.outcome in (Outcome.FAILED, Outcome.TIMEOUT):
            removed = shm.sweep(before, result.started_wall, time.time())
            if removed:
                result.info["shm_removed"] = removed

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
            table = read_table(req.out_path, ncols=req.ncols, nrows=req.nrows)
        except MalformedResult as exc:
            return result(Outcome.MALFORMED, str(exc))
        return result(Outcome.OK, "ok", table)
