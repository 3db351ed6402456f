"""The Slurm client: argv builders, output parsers and the few calls we make to Slurm.

Pure functions build the commands (``srun`` steps, ``scancel``, ``squeue``, ``sinfo``)
and parse what Slurm prints; the calls go through :func:`orchestrator.procs.run_checked`.
Both the srun sim launcher and the training backends use this module; neither
imports the other.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.allocation import Placement
from orchestrator.errors import CommandError, SlurmError
from orchestrator.procs import run_checked

log = logging.getLogger(__name__)

STEP_GONE_TIMEOUT_S = 20.0
"""How long a timed-out step may take to leave ``squeue`` before we give up on it."""
STEP_POLL_S = 0.25

SRUN_INPUT_ENV = (
    "SLURM_HOSTFILE",  # would replace our --nodelist under --distribution=arbitrary
    "SLURM_DISTRIBUTION",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_NTASKS_PER_SOCKET",
    "SLURM_NTASKS_PER_CORE",
    "SLURM_NTASKS_PER_GPU",
    "SLURM_CPU_BIND",
)
"""Variables srun reads as option defaults; an outer ``salloc`` may set them. We
pass every placement option explicitly and drop these so they cannot interfere."""

_LAUNCHING = re.compile(
    r"launching (?:StepId=)?(?P<step>\d+\.\d+)(?:\+\d+)? on host (?P<host>[^,\s]+), (?P<n>\d+) tasks?"
)


@dataclass(frozen=True)
class StepInfo:
    """What ``srun -v`` said about the step it launched."""

    step_id: str | None
    per_host: tuple[tuple[str, int], ...]


def parse_srun_log(text: str) -> StepInfo:
    """Step id and tasks per host from ``srun -v`` output (None/empty when it never launched).

    >>> parse_srun_log("srun: launching StepId=36.0 on host n1, 2 tasks: [0-1]").per_host
    (('n1', 2),)
    """
    step: str | None = None
    hosts: list[tuple[str, int]] = []
    for match in _LAUNCHING.finditer(text):
        step = step or match.group("step")
        hosts.append((match.group("host"), int(match.group("n"))))
    return StepInfo(step, tuple(hosts))


def srun_errors(text: str, limit: int = 3) -> list[str]:
    """srun's own error lines (``srun: error: ...``), the last few."""
    lines = [ln.strip() for ln in text.splitlines() if ln.startswith(("srun: error:", "srun: fatal:"))]
    return lines[-limit:]


def slurm_filename(path: Path) -> str:
    """A path for srun's ``--output``/``--error``, with ``%`` escaped (Slurm expands ``%j`` etc.)."""
    return str(path).replace("%", "%%")


def placement_options(placement: Placement) -> list[str]:
    """``-N``, ``--nodelist`` and, where needed, the per-node layout of one placement."""
    counts = [count for _, count in placement.per_node]
    nodes = len(counts)
    if nodes == 1 or len(set(counts)) == 1:
        opts = ["-N", str(nodes), "--nodelist", placement.nodelist]
        if nodes > 1:
            opts += ["--ntasks-per-node", str(counts[0])]
        return opts
    hosts = [name for name, count in placement.per_node for _ in range(count)]
    return ["-N", str(nodes), "--nodelist", ",".join(hosts), "--distribution=arbitrary"]


def step_argv(
    ntasks: int,
    *,
    cpus_per_task: int = 1,
    placement: Placement | None = None,
    ranks_per_node: int | None = None,
    job_name: str | None = None,
    srun: str = "srun",
    mpi: str | None = "pmi2",
    extra: Sequence[str] = (),
) -> list[str]:
    """``srun --exact [--mpi=M] -n N -c C <placement>`` up to (not including) the program.

    With a placement its node layout is used as is; without one, ``ranks_per_node``
    (if given) becomes ``--ntasks-per-node`` and Slurm picks the nodes.
    """
    if placement is not None and placement.ntasks != ntasks:
        raise ValueError(f"placement {placement.per_node} holds {placement.ntasks} tasks, not {ntasks}")
    argv = [srun, "--exact"]
    if mpi:
        argv.append(f"--mpi={mpi}")
    argv += ["-n", str(ntasks), "-c", str(cpus_per_task)]
    if placement is not None:
        argv += placement_options(placement)
    elif ranks_per_node is not None:
        argv += ["--ntasks-per-node", str(ranks_per_node)]
    if job_name:
        argv += ["--job-name", job_name]
    return [*argv, *extra]



def srun_env(base: dict[str, str]) -> dict[str, str]:
    """``base`` minus the srun input variables that could override our placement."""
    return {k: v for k, v in base.items() if k not in SRUN_INPUT_ENV}


async def steps_named(job_id: str, name: str) -> list[str]:
    """Ids of the steps of ``job_id`` named ``name`` that Slurm still lists."""
    try:
        out = await asyncio.to_thread(run_checked, ["squeue", "-h", "-s", "-j", job_id, "-o", "%i|%j"],
                                      timeout=30)
    except CommandError as exc:
        if "Invalid job id" in exc.stderr:
            return []
        raise
    return [step for step, _, step_name in (ln.partition("|") for ln in out.split()) if step_name == name]


async def end_steps(job_id: str, name: str, timeout: float = STEP_GONE_TIMEOUT_S) -> list[str]:
    """Cancel every step named ``name`` in ``job_id`` and wait until Slurm lists none.

    Returns the step ids that were still listed (and so were cancelled here): a
    plain ``scancel`` first (SIGTERM, then SIGKILL after Slurm's KillWait), then
    ``scancel --signal=KILL`` on later rounds. Slurm offers no event for a
    step's end, so this polls ``squeue``, briefly and only after a failure, timeout or cancel.
    """
    cancelled: list[str] = []
    deadline = time.monotonic() + timeout
    while steps := await steps_named(job_id, name):
        for step in steps:
            first = step not in cancelled
            if first:
                log.info("step %s (%s) still listed after its srun ended: scancel", step, name)
                cancelled.append(step)
            argv = ["scancel", step] if first else ["scancel", "--signal=KILL", step]
            try:
                await asyncio.to_thread(run_checked, argv, timeout=30)
            except CommandError as exc:  # gone between squeue and scancel
                log.debug("scancel %s: %s", step, exc)
        if time.monotonic() > deadline:
            log.warning("steps %s (%s) still listed %.0f s after scancel", steps, name, timeout)
            break
        await asyncio.sleep(STEP_POLL_S)
    return cancelled


JOB_WATCH_S = 10.0
"""How often the coordinator asks Slurm whether its allocation still exists (one ``squeue``)."""

ALIVE_STATES = frozenset({"RUNNING", "CONFIGURING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING"})
"""Job states in which the allocation still holds its nodes; any other (CANCELLED, COMPLETING,
TIMEOUT, NODE_FAIL, PREEMPTED, ...) or no job at all means it is gone."""

_GONE = re.compile(r"has expired|Invalid job id|already completing or completed|allocation has been revoked"
                   r"|Job has been cancelled|Job/step already completing", re.IGNORECASE)


def says_allocation_gone(text: str) -> bool:
    """srun's (or squeue's) words for a job that no longer exists.

    >>> says_allocation_gone("srun: error: Slurm job 1 has expired")
    True
    >>> says_allocation_gone("srun: error: n1: task 0: Exited with exit code 1")
    False
    """
    return bool(_GONE.search(text))


def job_gone(state_output: str) -> str | None:
    """What ``squeue -h -t all -j JOB -o %T`` printed, as the reason the job is gone (None: alive).

    >>> job_gone("RUNNING") is None
    True
    >>> job_gone("CANCELLED"), job_gone("")
    ('CANCELLED', 'no longer listed')
    """
    states = state_output.split()
    if not states:
        return "no longer listed"
    return None if states[0].upper() in ALIVE_STATES else states[0].upper()


async def job_state_gone(job_id: str) -> str | None:
    """Why the job ``job_id`` is gone, or None while it runs or while Slurm does not answer."""
    try:
        out = await asyncio.to_thread(run_checked, ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"],
                                      timeout=30)
    except CommandError as exc:
        if says_allocation_gone(exc.stderr):
            return "no longer listed"
        log.debug("job %s: cannot tell its state: %s", job_id, exc)
        return None
    return job_gone(out)


@dataclass(frozen=True)
class JobWatch:
    """Tells the coordinator when its own allocation ends under it (``scancel``, a node failure):
    Slurm sends the coordinator nothing when it runs under ``salloc``, and every later ``srun``
    fails at once, so without this it would wait for ever for work that cannot start."""

    job_id: str
    every_s: float = JOB_WATCH_S

    async def gone(self) -> str:
        """Returns (with the reason) once the job is gone; polls ``squeue`` every ``every_s``."""
        while True:
            reason = await job_state_gone(self.job_id)
            if reason is not None:
                return reason
            await asyncio.sleep(self.every_s)

    async def check(self) -> str | None:
        """One look: why the job is gone, or None."""
        return await job_state_gone(self.job_id)


def parse_node_addrs(text: str) -> dict[str, str]:
    """``sinfo -h -N -o '%N %o'`` output as {node name: NodeAddr}."""
    addrs: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            addrs[parts[0]] = parts[1]
        elif parts:
            raise SlurmError(f"cannot parse a node address from sinfo output line {line!r}")
    return addrs


def node_addresses(nodes: Sequence[str] | None = None, partition: str | None = None) -> dict[str, str]:
    """NodeAddr of the given nodes (or of a partition's nodes, or of all) from ``sinfo``."""
    argv = ["sinfo", "-h", "-N", "-o", "%N %o"]
    if nodes:
        argv += ["-n", ",".join(nodes)]
    if partition:
        argv += ["-p", partition]
    return parse_node_addrs(run_checked(argv, timeout=30))
