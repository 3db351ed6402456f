"""srun: sims as job steps of the Slurm allocation the coordinator runs in.

Every step carries ``--exact`` and explicit ``-n/-c/-N/--nodelist`` so steps
run side by side on the slots :class:`~orchestrator.allocation.SlotPool`
handed out, instead of queueing behind each other. The placement is honoured
exactly: one node, an even split (``--ntasks-per-node``), or an uneven split
(``--distribution=arbitrary`` with one node name per rank).

The ranks' stdout/stderr go to the run's log files (written by slurmstepd);
srun's own messages go to ``srun.log`` with ``-v``, which is where the step id
and the hosts come from (:func:`parse_srun_log`). A timeout or a cancellation
ends srun (SIGTERM, which cancels the step); after that, and after any failed
run, the launcher makes sure Slurm lists no step of that name any more,
cancelling it with ``scancel`` if needed, before the slots are handed out again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from orchestrator import shm
from orchestrator.allocation import Allocation, Placement
from orchestrator.errors import LaunchError
from orchestrator.launchers.base import Launcher, LaunchRequest, Outcome, SimResult
from orchestrator.procs import CommandError, ProcessOutcome, run_checked, supervise

log = logging.getLogger(__name__)

SRUN_LOG = "srun.log"
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


# Machine fact (Slurm 22.05 pmi2 + the PyPI mpich's UCX netmod): ranks on different
# nodes fail to wire up ("addr version 4" assertions, hangs in MPI_Init); the
# libfabric netmod works. Only a default for multi-node steps, so a user's own
# setting wins and single-node steps (and spawned sims, whose parent must use the
# same netmod) keep MPICH's choice. Other MPIs ignore MPIR_CVAR_* variables.
MULTI_NODE_ENV = {"MPIR_CVAR_CH4_NETMOD": "ofi"}


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


class SrunLauncher(Launcher):
    """``srun --exact --mpi=pmi2 -n N -c 1 -N K --nodelist … BINARY ARGS --out FILE``."""

    name: ClassVar[str] = "srun"

    def __init__(self, alloc: Allocation, *, srun: str = "srun", mpi: str = "pmi2") -> None:
        if not alloc.in_slurm or alloc.job_id is None:
            raise LaunchError("the srun launcher needs a Slurm allocation (run inside salloc or sbatch)")
        self.alloc = alloc
        self.job_id: str = alloc.job_id
        self.srun = srun
        self.mpi = mpi

    def command(self, req: LaunchRequest) -> list[str]:
        # Absolute paths: slurmstepd opens the logs and the sim writes --out from the step's cwd.
        logs = ["-v", "--kill-on-bad-exit=1", "--open-mode=append",
                "--output", slurm_filename(req.stdout_path.absolute()),
                "--error", slurm_filename(req.stderr_path.absolute())]
        head = step_argv(req.ranks, placement=req.placement, ranks_per_node=req.ranks_per_node,
                         job_name=req.run_id, srun=self.srun, mpi=self.mpi, extra=logs)
        return [*head, str(req.binary.absolute()), *req.args, "--out", str(req.out_path.absolute())]

    def environment(self, req: LaunchRequest) -> dict[str, str]:
        env = srun_env(super().environment(req))
        if req.placement is not None and len(req.placement.nodes) > 1:
            for key, value in MULTI_NODE_ENV.items():
                env.setdefault(key, value)
        return env

    async def run(self, req: LaunchRequest) -> SimResult:
        """Run the step; after a timeout, failure or cancellation make sure Slurm ended it."""
        req.workdir.mkdir(parents=True, exist_ok=True)
        for path in (req.stdout_path, req.stderr_path):
            path.write_bytes(b"")  # slurmstepd appends (several nodes share the files)
        argv = self.command(req)
        segments = shm.snapshot()
        started = time.time()
        try:
            proc = await supervise(argv, env=self.environment(req), stdout=Path(os.devnull),
                                   stderr=req.workdir / SRUN_LOG, timeout=req.timeout_s, cwd=req.workdir)
        except FileNotFoundError as exc:
            raise LaunchError(f"sim {req.run_id}: cannot start {argv[0]!r}: {exc.strerror}") from exc
        except asyncio.CancelledError:
            await asyncio.shield(end_steps(self.job_id, req.run_id))
            shm.sweep(segments, started, time.time())
            raise
        result = self.classify(req, proc, started)
        result.info.update(self.launch_info(req, proc))
        if result.outcome in (Outcome.FAILED, Outcome.TIMEOUT):
            # srun may exit and leave its step listed (22.05: an unopenable --output does), holding the
            # slots we are about to hand out again.
            cancelled = await end_steps(self.job_id, req.run_id)
            if cancelled:
                result.info["scancelled"] = cancelled
        self.sweep_segments(result, segments)
        return result

    def _srun_log(self, req: LaunchRequest) -> str:
        try:
            return (req.workdir / SRUN_LOG).read_text(errors="replace")
        except OSError:
            return ""

    def classify(self, req: LaunchRequest, proc: ProcessOutcome, started: float) -> SimResult:
        result = super().classify(req, proc, started)
        if result.outcome is Outcome.FAILED:
            errors = srun_errors(self._srun_log(req))
            if errors:
                result.message += "; " + " | ".join(errors)
        return result

    def launch_info(self, req: LaunchRequest, outcome: ProcessOutcome) -> dict[str, Any]:
        step = parse_srun_log(self._srun_log(req))
        info = super().launch_info(req, outcome)
        info.update(step_id=step.step_id, nodes=sorted({h for h, _ in step.per_host}),
                    tasks_per_node=[list(p) for p in step.per_host])
        return info
