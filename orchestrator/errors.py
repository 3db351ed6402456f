"""The errors a user can meet, each with a message that says what to do.

Every error carries the exit code the CLI returns for it and whether a retry
may help (``transient``). Failures of individual sims are not errors: they come
back as data (:class:`orchestrator.launchers.base.SimResult`).
"""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base class: a failure with a message fit for a user."""

    exit_code: int = 1
    transient: bool = False


class ConfigError(OrchestratorError):
    """loop.yml or a ``--set`` override is malformed. Exit code 2."""

    exit_code = 2


class UsageError(OrchestratorError):
    """The command line is wrong (missing file, bad flag combination). Exit code 2."""

    exit_code = 2


class LaunchError(OrchestratorError):
    """A simulation could not be started at all (binary missing, launcher absent)."""


class SimKindFailed(OrchestratorError):
    """A simulation kind failed every time it was tried: the campaign cannot go on."""


class ResourceError(OrchestratorError):
    """A request can never fit the allocation (more ranks than slots)."""


class TrainingError(OrchestratorError):
    """Training or evaluation failed on the Dask workers in a way retries did not fix."""


class StoreError(OrchestratorError):
    """The run directory is unusable or inconsistent (resume of a foreign run, bad state)."""


class Interrupted(OrchestratorError):
    """The coordinator was signalled (SIGTERM, SIGINT, SIGUSR1) and checkpointed."""

    exit_code = 75  # EX_TEMPFAIL: the sbatch template requeues on this code
    transient = True
