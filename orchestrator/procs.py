"""One door for subprocesses.

Every external command the orchestrator starts goes through here: it is
logged with its argv, started without a shell, in its own process group (so a
timeout or shutdown can end the whole tree), and its failure is raised with
argv, exit code and output tail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import CommandError

log = logging.getLogger(__name__)

KILL_GRACE_S = 2.0



def run_checked(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float | None = 60, input: str | None = None
) -> str:
    """Run a short command synchronously; return stdout, raise CommandError on failure."""
    log.debug("run: %s", argv)
    try:
        proc = subprocess.run(
            list(argv), env=dict(env) if env is not None else None, capture_output=True, text=True,
            timeout=timeout, input=input, check=False,
        )
    except FileNotFoundError as exc:
        raise CommandError(argv, 127, "", f"{argv[0]}: command not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(argv, 124, "", f"timed out after {timeout} s") from exc
    if proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


@dataclass(frozen=True)
class ProcessOutcome:
    """How a supervised process ended."""

    returncode: int | None
    """Exit code (negative: killed by that signal); None if it timed out or was cancelled."""
    timed_out: bool
    pid: int
    wall_s: float


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a process group we started; a group already gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _end(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the process group, then SIGKILL it after ``grace`` seconds."""
    kill_group(proc.pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), grace)
    kill_group(proc.pid, signal.SIGKILL)
    await proc.wait()


async def supervise(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    stdout: Path,
    stderr: Path,
    timeout: float,
    cwd: Path | None = None,
    grace: float = KILL_GRACE_S,
) -> ProcessOutcome:
    """Run argv to completion in its own session, output to files.

    On timeout or cancellation the whole process group is ended (SIGTERM, then
    SIGKILL), so no rank outlives its run. Raises FileNotFoundError if argv[0]
    does not exist.
    """
    log.debug("exec: %s", argv)
    t0 = time.monotonic()
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=dict(env), stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=cwd,
            start_new_session=True,
        )
    try:
        rc = await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        await _end(proc, grace)
        return ProcessOutcome(None, True, proc.pid, time.monotonic() - t0)
    except asyncio.CancelledError:
        await asyncio.shield(_end(proc, grace))
        raise
    # Ranks may linger after the launcher exits (a crashed mpiexec): end the group.
    kill_group(proc.pid, signal.SIGKILL)
    return ProcessOutcome(rc, False, proc.pid, time.monotonic() - t0)


def tail(path: Path, lines: int = 5) -> str:
    """The last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])
