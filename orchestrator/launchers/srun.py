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

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from orchestrator.allocation import Allocation
from orchestrator.errors import LaunchError
from orchestrator.launchers.base import LaunchRequest, Outcome, ProcessLauncher, SimResult
from orchestrator.procs import ProcessOutcome
from orchestrator.slurm import (
    SRUN_INPUT_ENV,
    StepInfo,
    end_steps,
    parse_srun_log,
    placement_options,
    says_allocation_gone,
    slurm_filename,
    srun_env,
    srun_errors,
    step_argv,
    steps_named,
)

log = logging.getLogger(__name__)

__all__ = ["MULTI_NODE_ENV", "SRUN_INPUT_ENV", "SRUN_LOG", "SrunLauncher", "StepInfo", "end_steps", "parse_srun_log",
           "placement_options", "srun_errors", "step_argv", "steps_named"]

SRUN_LOG = "srun.log"
# Machine fact (Slurm 22.05 pmi2 + the PyPI mpich's UCX netmod): ranks on different
# nodes fail to wire up ("addr version 4" assertions, hangs in MPI_Init); the
# libfabric netmod works. Only a default for multi-node steps, so a user's own
# setting wins and single-node steps (and spawned sims, whose parent must use the
# same netmod) keep MPICH's choice. Other MPIs ignore MPIR_CVAR_* variables.
MULTI_NODE_ENV = {"MPIR_CVAR_CH4_NETMOD": "ofi"}


class SrunLauncher(ProcessLauncher):
    """``srun --exact --mpi=pmi2|pmix -n N -c 1 -N K --nodelist … [srun_args] BINARY ARGS [--out FILE]``."""

    name: ClassVar[str] = "srun"

    def __init__(self, alloc: Allocation, *, srun: str = "srun", mpi: str = "pmi2",
                 extra_args: Sequence[str] = ()) -> None:
        if not alloc.in_slurm or alloc.job_id is None:
            raise LaunchError("the srun launcher needs a Slurm allocation (run inside salloc or sbatch)")
        self.alloc = alloc
        self.job_id: str = alloc.job_id
        self.srun = srun
        self.mpi = mpi
        self.extra_args = list(extra_args)
        """The sim's ``srun_args``, after ours (so a user's option wins where srun lets the last one win)."""

    def command(self, req: LaunchRequest) -> list[str]:
        # Absolute paths: slurmstepd opens the logs and the sim writes --out from the step's cwd.
        logs = ["-v", "--kill-on-bad-exit=1", "--open-mode=append",
                "--output", slurm_filename(req.stdout_path.absolute()),
                "--error", slurm_filename(req.stderr_path.absolute())]
        head = step_argv(req.ranks, placement=req.placement, ranks_per_node=req.ranks_per_node,
                         job_name=req.run_id, srun=self.srun, mpi=self.mpi, extra=[*logs, *self.extra_args])
        return [*head, *self.program(req, absolute=True)]

    def environment(self, req: LaunchRequest) -> dict[str, str]:
        env = srun_env(super().environment(req))
        if req.placement is not None and len(req.placement.nodes) > 1:
            for key, value in MULTI_NODE_ENV.items():
                env.setdefault(key, value)
        return env

    def prepare(self, req: LaunchRequest) -> None:
        super().prepare(req)
        for path in (req.stdout_path, req.stderr_path):
            path.write_bytes(b"")  # slurmstepd appends (several nodes share the files)

    def output_paths(self, req: LaunchRequest) -> tuple[Path, Path]:
        """The ranks' output goes to the sim's logs through slurmstepd; srun's own to srun.log."""
        return Path(os.devnull), req.workdir / SRUN_LOG

    async def cancelled(self, req: LaunchRequest) -> None:
        await end_steps(self.job_id, req.run_id)

    async def finished(self, req: LaunchRequest, result: SimResult) -> None:
        """srun may exit and leave its step listed (22.05: an unopenable --output does), holding the
        slots we are about to hand out again: after a failure or timeout, make sure Slurm ended it."""
        if result.outcome in (Outcome.FAILED, Outcome.TIMEOUT):
            cancelled = await end_steps(self.job_id, req.run_id)
            if cancelled:
                result.info["scancelled"] = cancelled

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
            if says_allocation_gone(" ".join(errors)):
                result.info["allocation_gone"] = True  # not the sim's fault: the campaign stops (75)
        return result

    def launch_info(self, req: LaunchRequest, outcome: ProcessOutcome) -> dict[str, Any]:
        step = parse_srun_log(self._srun_log(req))
        info = super().launch_info(req, outcome)
        info.update(step_id=step.step_id, nodes=sorted({h for h, _ in step.per_host}),
                    tasks_per_node=[list(p) for p in step.per_host])
        return info
