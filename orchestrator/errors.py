"""The errors a user can meet, each with a message that says what to do.

Every error carries the exit code the CLI returns for it and whether a retry
may help (``transient``). Failures of individual sims are not errors: they come
back as data (:class:`orchestrator.launchers.base.SimResult`).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence


class ExitCode(enum.IntEnum):
    """Every exit code the CLI returns; the sbatch template requeues on INTERRUPTED."""

    OK = 0
    ERROR = 1
    USAGE = 2
    STOPPED = 3
    """max_rounds, the time or the data budget ended the campaign before its target."""
    INTERRUPTED = 75
    """EX_TEMPFAIL: signalled (or stopped by a passing fault: a full disk, a busy database) and
    checkpointed; resumable."""
    KEYBOARD = 130
    SIGPIPE = 141
    """128 + SIGPIPE: the reader of our output went away (``status RUN | head``); no error of ours."""


class OrchestratorError(Exception):
    """Base class: a failure with a message fit for a user."""

    exit_code: int = ExitCode.ERROR
    transient: bool = False


class ConfigError(OrchestratorError):
    """loop.yml or a ``--set`` override is malformed. Exit code 2."""

    exit_code = ExitCode.USAGE


class UsageError(OrchestratorError):
    """The command line is wrong (missing file, bad flag combination). Exit code 2."""

    exit_code = ExitCode.USAGE


class LaunchError(OrchestratorError):
    """A simulation could not be started at all (binary missing, launcher absent)."""


class SimKindFailed(OrchestratorError):
    """A simulation kind failed every time it was tried: the campaign cannot go on."""


class ResourceError(OrchestratorError):
    """A request can never fit the allocation (more ranks than slots, ``training.device: cuda`` where no
    worker has a GPU): a config this machine cannot satisfy. Exit code 2, like a bad config."""

    exit_code = ExitCode.USAGE


class TrainingError(OrchestratorError):
    """Training or evaluation failed on the Dask workers in a way retries did not fix."""


class TrainingDiverged(TrainingError):
    """A training round's loss went non-finite: the round fails (the model stays as it was) and the
    campaign goes on; several such rounds in a row stop it."""


class SlurmError(OrchestratorError):
    """Slurm printed something we cannot read (the message quotes it)."""


class SamplingError(OrchestratorError):
    """A sampling strategy failed or returned points that cannot be simulated (wrong shape,
    NaN, outside the domain): the campaign stops, naming the strategy."""


class StoreError(OrchestratorError):
    """The run directory is unusable or inconsistent (resume of a foreign run, bad state)."""


class Interrupted(OrchestratorError):
    """The coordinator was signalled (SIGTERM, SIGINT, SIGUSR1) and checkpointed."""

    exit_code = ExitCode.INTERRUPTED
    transient = True


class DiskFull(Interrupted):
    """The disk (or quota) holding the run dir is full: the campaign stopped at its last good
    checkpoint. Exit code 75, like a signal: free space and resume."""


class TrackingError(OrchestratorError):
    """A tracking operation failed; the message is meant for the user.

    It names the tracking URI involved and what to do about the problem. The
    original MLflow exception, if any, is chained as ``__cause__``.
    """

    transient = True
    """A busy or unreachable store passes: a campaign it stops stays resumable."""


class PredictError(OrchestratorError):
    """The model could not be loaded or evaluated, or its run not logged."""


class SubmitError(OrchestratorError):
    """sbatch refused the job or answered something we cannot read."""

    transient = True


class TemplateError(OrchestratorError):
    """A template is malformed or names a value that is not there (a bug in the template)."""


class CommandError(OrchestratorError):
    """An external command failed; the message carries argv, exit code and output."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        tail = (stderr.strip() or stdout.strip())[-800:]
        super().__init__(f"command {' '.join(argv)!r} exited with {returncode}: {tail}")


class UIError(OrchestratorError):
    """The MLflow UI server could not be started or did not answer."""
