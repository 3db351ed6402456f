"""The loop.yml schema: declared once, validated once.

Every section is a pydantic model with ``extra="forbid"`` and a docstring per
field. :func:`load_config` turns a file plus ``--set key.path=value``
overrides into a :class:`LoopConfig`, or raises :class:`ConfigError` whose
message is one line per problem: the key path, the bad value, what is expected.
"""

from __future__ import annotations

import contextlib
import difflib
import enum
import os
import re
import shutil
import string
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.errors import ConfigError

NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$"


class Sampling(enum.StrEnum):
    """The built-in sampling strategies (``policy.sampling``; a user's own is a ``module:function``).
    :func:`orchestrator.sampling.builtin` holds the function of each."""

    UNIFORM = "uniform"
    NEAR_FAILURES = "near-failures"
    SPACE_FILLING = "space-filling"
    ENSEMBLE = "ensemble"

    @property
    def windowed(self) -> bool:
        """The generate sim draws its own points in a window the strategy gives (not chosen points)."""
        return self in (Sampling.UNIFORM, Sampling.NEAR_FAILURES)


BUILTIN_SAMPLING = tuple(s.value for s in Sampling)
SAMPLING_PATTERN = rf"^({'|'.join(map(re.escape, BUILTIN_SAMPLING))}|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$"
Role = Literal["check", "generate"]
"""A sim's role in the campaign."""
ROLES: tuple[Role, ...] = ("check", "generate")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
SRUN_DENIED = ("--jobid", "--overlap", "--overcommit", "--oversubscribe", "--ntasks", "--nodes", "--cpus-per-task",
               "--nodelist", "--nodefile", "--ntasks-per-node", "--relative")
"""srun options a sim's ``srun_args`` may not carry: they would run the step in another job, share CPUs
other steps hold, or override the placement the coordinator gave it (``--exact -n -c --nodelist``)."""
_SRUN_DENIED_SHORT = frozenset("nNcwFOsr")
"""The short forms of :data:`SRUN_DENIED` (``-n4``, ``-w node1``, ...)."""
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "databricks", "http", "https")
"""URI schemes of the MLflow stores a campaign can track to (MLflow's file store is refused by this MLflow)."""
_MEMORY = re.compile(r"^\s*(auto|(\d+(\.\d*)?([eE][+-]?\d+)?)?\s*([kmgtp]i?b?|b)?)\s*$", re.IGNORECASE)
"""A memory limit as dask.utils.parse_bytes reads it (a number, a unit, or both), or ``auto``."""
CHAMPION_ALIAS = "champion"
"""The registry alias of the model in service by default (continual mode sets it; predict and evaluate read it)."""


class _Strict(BaseModel):
    # The docstrings under the fields are read by orchestrator.configdoc alone: pydantic's
    # use_attribute_docstrings parsed this module's source once per class at import (0.4-0.8 s of
    # every start-up on a busy box, issue 25).
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True,
                              allow_inf_nan=False)  # an infinite tolerance or a NaN bound means nothing


class InputSpec(_Strict):
    """One input of the surrogate and its domain."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Column name; also the placeholder ``{name}`` in check-sim args."""
    lo: float
    """Lower end of the domain queries and data are drawn from."""
    hi: float
    """Upper end of the domain."""

    @model_validator(mode="after")
    def _ordered(self) -> InputSpec:
        if not self.lo < self.hi:
            raise ValueError(f"lo ({self.lo}) must be below hi ({self.hi})")
        if self.hi - self.lo == float("inf"):
            raise ValueError(f"the domain [{self.lo}, {self.hi}] is wider than a float holds; rescale the input")
        return self


class OutputFile(_Strict):
    """A result file an existing code writes in its run directory, and the columns to take."""

    path: str = Field(min_length=1)
    """File name, relative to the run directory (the sim's cwd)."""
    format: Literal["auto", "npy", "csv", "columns"] = "auto"
    """npy: a 2-D .npy array; csv: comma-separated; columns: whitespace-separated columns;
    auto: by the file's suffix (.npy, .csv, anything else columns)."""
    columns: list[int | str] | None = None
    """Columns to take, in order: the result's inputs then outputs (one each, none twice). 0-based
    indexes, or header names for csv (its first line is then the header). None: every column."""
    skip_rows: int = Field(default=0, ge=0)
    """Lines to skip at the top (headers a code writes); lines starting with ``#`` are always skipped."""

    @field_validator("columns")
    @classmethod
    def _columns(cls, v: list[int | str] | None) -> list[int | str] | None:
        seen: set[int | str] = set()
        for col in v or ():
            if isinstance(col, int) and col < 0:
                raise ValueError(f"column {col} is negative; columns are 0-based indexes or csv header names")
            if col in seen:
                raise ValueError(f"column {col!r} is given twice (it would be read as two different values)")
            seen.add(col)
        return v


class SimConfig(_Strict):
    """How to run one kind of simulation."""

    binary: str = Field(min_length=1)
    """Executable: a name found next to the Python interpreter or on PATH, or a path
    (relative paths are relative to loop.yml)."""
    args: list[str] = []
    """argv template, never run through a shell. Placeholders in braces: ``{seed}``,
    ``{run_id}``, ``{attempt}``, ``{ranks}``, ``{campaign_time}`` (0 until the target is met,
    then one tick per continual monitoring round); for the check sim each input by name (``{x}``);
    for the generate sim a window per input (``{x_lo}``, ``{x_hi}``; ``{lo}``, ``{hi}``
    when there is one input), or ``{points_file}``: a text file of the points the
    coordinator chose (one per line), in the run's directory. Format specs work: ``{x:.3f}``."""
    ranks: int = Field(default=1, ge=1, le=100_000)
    """MPI ranks per run."""
    ranks_per_node: int | None = Field(default=None, ge=1)
    """Spread the ranks over nodes, at most this many per node (srun only)."""
    launcher: Literal["auto", "srun", "mpiexec", "spawn", "agent"] = "auto"
    """auto: srun inside a Slurm allocation, mpiexec outside. agent: one long-lived agent per
    node (one srun step per node) starts single-node runs with the node-local mpiexec; runs
    spanning nodes still go through srun. For many small sims."""
    timeout_s: float = Field(default=300.0, gt=0)
    """Wall-clock limit of one run; past it the whole process tree is killed."""
    retries: int = Field(default=2, ge=0, le=100)
    """Further attempts after a failed run (crash, timeout, malformed output)."""
    backoff_s: float = Field(default=0.2, ge=0)
    """Delay before retry k is backoff_s * 2**(k-1)."""
    max_consecutive_failures: int = Field(default=10, ge=1)
    """Stop the campaign when this many runs of this kind fail in a row."""
    env: dict[str, str] = {}
    """Extra environment variables for the sim's ranks (names: letters, digits, ``_``)."""
    mpi: Literal["auto", "mpich", "openmpi"] = "auto"
    """The binary's MPI family, which decides how it is launched (local mpiexec, srun --mpi=pmi2
    for MPICH or pmix for Open MPI). auto: read from the libmpi the binary links (``ldd``)."""
    mpiexec: str | None = None
    """The local launcher to use (mpiexec launcher); None: that MPI's own, found beside its libmpi."""
    srun_args: list[str] = []
    """Extra srun options for this sim's steps, e.g. ``["--cpu-bind=cores"]`` (srun launcher); one option per
    item, no control characters, and none that moves the step out of its placement (``--jobid``,
    ``--overlap``, ``--overcommit``, ``-n``, ``-N``, ``-c``, ``-w``, ...: the coordinator sets those)."""
    templates: dict[str, str] = {}
    """Input files rendered into each run directory: {file name there: template file (relative to
    loop.yml)}. Jinja2 syntax (``{{ x }}``, ``{% for %}``), the same placeholders as ``args``; an
    undefined name is an error."""
    files: list[str] = []
    """Static files (relative to loop.yml) copied into each run directory beside the rendered inputs."""
    output: OutputFile | None = None
    """Read the result from a file the code writes (and do not pass ``--out``). None with no
    ``parser``: the sim uses simkit (``--out FILE``, or rows over the intercommunicator)."""
    parser: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    """A Python function ``module:function(run_dir) -> rows`` that reads the result; the module is
    looked for next to loop.yml first. Its exception is a failed run (traceback in stderr.log)."""

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not _IDENT.match(name):
                raise ValueError(f"environment variable name {name!r} is not a name (letters, digits, _)")
            if "\x00" in value:
                raise ValueError(f"{name}={value!r} holds a NUL character, which no environment can carry")
        return v

    @field_validator("binary", "args", "mpiexec")
    @classmethod
    def _no_nul(cls, v: str | list[str] | None) -> str | list[str] | None:
        for item in [v] if isinstance(v, str) else v or ():
            if "\x00" in item:
                raise ValueError(f"{item!r} holds a NUL character, which no command line can carry")
        return v

    @field_validator("srun_args")
    @classmethod
    def _srun_args(cls, v: list[str]) -> list[str]:
        for arg in v:
            if _CONTROL.search(arg):
                raise ValueError(f"{arg!r} holds a control character (a newline, a tab, ...); give one option "
                                 "per list item")
            if _srun_option_denied(arg):
                raise ValueError(f"{arg!r} is not allowed: the coordinator sets the step's job, tasks, CPUs and "
                                 f"nodes itself (denied: {', '.join(SRUN_DENIED)})")
        return v

    @model_validator(mode="after")
    def _one_result_source(self) -> SimConfig:
        if self.output is not None and self.parser is not None:
            raise ValueError("give output or parser, not both")
        for name in self.templates:
            if "/" in name or name in ("", ".", ".."):
                raise ValueError(f"templates: {name!r} must be a plain file name in the run directory")
        return self

    @property
    def uses_simkit(self) -> bool:
        """Results come from simkit (``--out`` or spawn), not from the code's own files."""
        return self.output is None and self.parser is None


class SimsConfig(_Strict):
    """The two simulation roles of an AI-in-the-loop campaign."""

    check: SimConfig
    """Cheap: returns the true value at one query point, one row (inputs..., outputs...)."""
    generate: SimConfig
    """Expensive: returns many training rows (inputs..., outputs...)."""

    def of(self, role: Role) -> SimConfig:
        """The sim of ``role``."""
        return self.check if role == "check" else self.generate


class TargetConfig(_Strict):
    """When the campaign stops: the one place stop criteria are declared.

    Two rules say when the target is met. The count rule (the default, ``successes``) stops after
    that many checks within ``tolerance``: evidence, not a guarantee (5 of 5 show, at 95%
    confidence, only that at least 54.9% of the domain is within tolerance). The certified rule
    (``coverage`` and ``confidence``) makes "target met" a statement about the model: one model
    version is checked at fresh points drawn uniformly over the domain, side by side, and it is
    certified when an exact binomial bound shows that at least ``coverage`` of the domain is within
    ``tolerance`` at ``confidence`` (59 passing checks for 0.95/0.95). A version that fails more
    checks than ``allowed_failures`` goes back to training at once. Every summary, ``status``,
    ``report`` and MLflow run states what the checks certify, whichever rule is used."""

    tolerance: float = Field(default=0.05, gt=0)
    """A check succeeds when |surrogate - truth| < tolerance for every output."""
    successes: int = Field(default=5, ge=1)
    """Successful checks needed to meet the target."""
    max_rounds: int = Field(default=20, ge=1)
    """Give up (exit 3) after this many training rounds."""
    time_budget_s: float | None = Field(default=None, gt=0)
    """Give up (exit 3) after this much wall time, start-up included (a Dask start still under way
    is cut short); None: no limit."""
    per_version: bool = False
    """A stricter test: the successes must all come from one model version, at fresh
    points, with no failed check of that version (each new model starts from 0 and
    failed points are not re-checked). Use with ``policy.checks_per_round`` = ``successes``."""
    coverage: float | None = None
    """The certified rule: the share of the domain the model must be within ``tolerance`` on, e.g.
    0.95. Setting it (or ``confidence``) turns the rule on: one model version is checked at fresh,
    independent, uniformly drawn points, and the target is met when an exact binomial bound
    (Clopper-Pearson) shows at least this share within tolerance at ``confidence``. The number of
    checks follows from the numbers (59 passing for 0.95/0.95), and they run side by side, as many
    as the check sim's slots take; ``successes``, ``per_version`` and ``policy.checks_per_round``
    are then not used. None (with ``confidence`` None): the count rule of ``successes``."""
    confidence: float | None = None
    """The certified rule's confidence, e.g. 0.95 (0.95 when only ``coverage`` is given). Every
    summary states what the checks certify at this confidence (0.95 for the count rule)."""
    allowed_failures: int = Field(default=0, ge=0, le=1000)
    """Certified rule: failed checks a version may have and still pass (more checks are then needed:
    93 for 0.95/0.95 with one, 124 with two). A version with more failures goes back to training at
    once, its remaining checks cancelled."""
    check_points: str | None = None
    """Where check points are drawn, the distribution "the share of the domain" is measured over.
    None: uniformly over the domain. Else ``module:function`` (a ``module.py`` next to loop.yml, or an
    importable module), called as ``function(rng, lo, hi)`` with the campaign's numpy Generator and the
    inputs' bounds as arrays, returning one point inside the domain; its draws must be independent (take
    them from ``rng``), and every statement then speaks of the domain as that function draws it."""

    @field_validator("check_points")
    @classmethod
    def _check_points(cls, v: str | None) -> str | None:
        if v is not None:
            from orchestrator.userref import split_ref

            split_ref(v)  # ValueError: not of the form 'module:name'
        return v

    @field_validator("coverage")
    @classmethod
    def _coverage(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v < 1:
            raise ValueError(f"got {v}, expected a share between 0 and 1 (exclusive), e.g. 0.95: no number "
                             "of checks certifies all of a domain" if v == 1 else
                             f"got {v}, expected a share between 0 and 1 (exclusive), e.g. 0.95")
        return v

    @field_validator("confidence")
    @classmethod
    def _confidence(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v < 1:
            raise ValueError(f"got {v}, expected a probability between 0 and 1 (exclusive), e.g. 0.95")
        return v

    @model_validator(mode="after")
    def _plan(self) -> TargetConfig:
        if not self.certified:
            if self.allowed_failures:
                raise ValueError("allowed_failures goes with the certified rule: set target.coverage too")
            return self
        from orchestrator.certify import checks_needed  # pure arithmetic

        try:
            checks_needed(self.certified_coverage, self.certified_confidence, self.allowed_failures)
        except ValueError as exc:
            raise ValueError(f"coverage/confidence: {exc}; ask for less") from exc
        return self

    @property
    def domain_words(self) -> str:
        """What "the domain" of a statement is: the share of it is measured over the check points' law."""
        return "the domain" if self.check_points is None else f"the domain as {self.check_points} draws it"

    @property
    def certified(self) -> bool:
        """The certified rule applies (coverage or confidence is set)."""
        return self.coverage is not None or self.confidence is not None

    @property
    def certified_coverage(self) -> float:
        return 0.95 if self.coverage is None else self.coverage

    @property
    def certified_confidence(self) -> float:
        """The confidence every summary's statement is made at (0.95 unless given)."""
        return 0.95 if self.confidence is None else self.confidence


class PolicyConfig(_Strict):
    """What to do next; see :mod:`orchestrator.policy`."""

    checks_per_round: int = Field(default=1, ge=1, le=64)
    """Query points checked in parallel against each model version."""
    sampling: str = "uniform"
    """Where generate sims evaluate (see docs/sampling.md): ``uniform`` (the whole domain),
    ``near-failures`` (around failed checks), ``space-filling`` (Latin hypercube over the
    domain), ``ensemble`` (where ``ensemble_size`` surrogates disagree most, points kept apart),
    or a user's ``module:function`` found next to loop.yml. The strategy chooses each generate
    run's points when the coordinator chooses them (``points_per_run``); otherwise it picks the
    centre of the window the sim draws its own points in."""
    first_round: Literal["uniform", "space-filling"] = "space-filling"
    """How the points of generate runs before the first model are chosen (points mode)."""
    ensemble_size: int = Field(default=1, ge=1, le=64)
    """Surrogates trained per round, each from its own seed, as separate Dask tasks; the
    ensemble's mean is the prediction, its spread the uncertainty. ``ensemble`` needs >= 2."""
    points_per_run: int | None = Field(default=None, ge=1, le=1_000_000)
    """Points the coordinator chooses for each generate run. Set, every generate run is told its
    points: in ``{points_file}`` (its args) and as ``points``/``points_file`` in its templates.
    None: the sim draws its own points in a window, unless its args name ``{points_file}``
    (then 32 per run)."""
    candidates: int = Field(default=2000, ge=1, le=1_000_000)
    """Size of the candidate pool the ensemble is evaluated on after each round."""
    min_separation: float = Field(default=0.02, ge=0, le=1)
    """ensemble: chosen points are at least this far apart (and from points still being
    simulated), in units of the domain scaled to the unit cube."""

    @field_validator("sampling")
    @classmethod
    def _sampling(cls, v: str) -> str:
        if not re.match(SAMPLING_PATTERN, v):
            raise ValueError(f"got {v!r}, expected one of {', '.join(BUILTIN_SAMPLING)} or a module:function "
                             "of your own (docs/sampling.md)")
        return v
    near_failures_width: float = Field(default=0.25, gt=0, le=1)
    """near-failures: window width as a fraction of each input's domain."""
    max_inflight: int = Field(default=2, ge=1, le=1_000_000)
    """Generate sims in flight at once; with ``pipeline``, also the most runs kept ahead of
    a running training (in flight or finished, not yet trained on)."""
    pipeline: bool = True
    """Keep generate sims running while a training runs (False: one thing at a time)."""
    precheck: bool = False
    """With ``pipeline``: run the next model's check sims while it trains, and the first model's
    while its data waits for the Dask workers (their truth does not depend on the model), so
    checking it takes only an evaluation. Worth it when sim slots are real cores; on an
    oversubscribed laptop it slows the training it overlaps."""
    generates_per_round: int = Field(default=1, ge=1)
    """Accepted generate runs that make the data for one training round."""
    max_data_points: int | None = Field(default=None, ge=1)
    """Stop generating once this many generate rows are accepted; None: no limit."""
    train_on_checks: bool = True
    """A check sim's truth is data: every accepted check row joins the next round's training data
    (``data/check-N.npy``, counted as ``check_rows``, apart from generate rows). A point is checked
    only against models not trained on it, so failed points are not re-checked. False: checks are
    only evidence (and under the count rule a failed point is checked again against the next model)."""


class HparamsConfig(_Strict):
    """Training hyper-parameters, read by :func:`orchestrator.training.tasks.train` on the workers.

    The defaults were tuned on the sin(x) reference case: a short full-batch Adam
    phase, then a full-batch L-BFGS polish."""

    epochs: int = Field(default=100, ge=0)
    """Adam passes over all accumulated data per round."""
    lr: float = Field(default=1e-2, gt=0)
    """Peak Adam learning rate, cosine-decayed within each round."""
    lr_final_factor: float = Field(default=0.01, ge=0)
    """Learning rate at the end of a round, as a factor of ``lr``."""
    batch_size: int = Field(default=0, ge=0)
    """Adam mini-batch size; 0 (or at least the number of rows) means full batch."""
    weight_decay: float = Field(default=0.0, ge=0)
    """L2 weight decay (Adam and the L-BFGS loss)."""
    loss: Literal["mse", "smooth_l1"] = "mse"
    """Training loss."""
    grad_clip: float | None = Field(default=1.0, ge=0)
    """Max global gradient norm for Adam; 0 or null disables clipping."""
    lbfgs_iters: int | None = Field(default=300, ge=0)
    """Full-batch L-BFGS iterations after Adam; 0 disables the polish."""
    lbfgs_history: int = Field(default=50, ge=1)
    """L-BFGS history size."""
    refit_normalisation: bool = False
    """Refit the model's input/output normalisation on every round (default: first round only)."""
    num_threads: int = Field(default=1, ge=1)
    """Torch intra-op threads on the worker (``threads_per_worker`` sets it unless given here)."""


class TrainingConfig(_Strict):
    """The surrogate and where it trains."""

    backend: Literal["auto", "local", "allocation", "jobqueue"] = "auto"
    """local: a Dask LocalCluster; allocation: ``dask worker`` started with srun
    inside the Slurm allocation; jobqueue: dask_jobqueue.SLURMCluster jobs;
    auto: allocation inside Slurm, local outside."""
    workers: int = Field(default=1, ge=1)
    """Dask workers."""
    threads_per_worker: int = Field(default=1, ge=1)
    """Threads (and torch threads) per worker."""
    memory_limit: str = "2GB"
    """Memory limit per worker, Dask syntax."""
    model: str = Field(default="models.mlp:MLP", pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    """The surrogate class, as module:Class."""
    model_kwargs: dict[str, Any] = {}
    """Keyword arguments of the model class (n_inputs/n_outputs are filled in)."""
    hparams: HparamsConfig = HparamsConfig()
    """Training hyper-parameters (epochs, lr, batch_size, ...), validated with the rest of loop.yml."""
    task_retries: int = Field(default=2, ge=0)
    """Dask retries of a training task that raised (for ``ddp``: retries of the whole round)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the workers train: ``cuda`` (a GPU, refused at start when a worker has none),
    ``cpu``, or ``auto`` (a worker's GPU when it has one, else its CPU). Checkpoints hold
    CPU tensors, so a model trained on a GPU loads anywhere."""
    gpus_per_worker: int | None = Field(default=None, ge=0, le=16)
    """GPUs each Dask worker asks Slurm for (``srun --gpus-per-task``; SLURMCluster jobs
    ``--gres=gpu:N``) and advertises as the Dask resource ``GPU``; None: 1 when ``device``
    is ``cuda``, else 0."""
    strategy: Literal["single", "ddp"] = "single"
    """``single``: each model trains on one worker (ensemble members side by side, one per
    worker); ``ddp``: one model trains data-parallel over all ``workers`` with
    ``torch.distributed`` (gloo on CPU, nccl on GPU)."""
    jobqueue: dict[str, Any] = {}
    """Passed through to dask_jobqueue.SLURMCluster (queue, account, walltime, ...)."""

    @field_validator("memory_limit")
    @classmethod
    def _memory_limit(cls, v: str) -> str:
        if not v.strip() or not _MEMORY.match(v):
            raise ValueError(f"got {v!r}, expected an amount of memory in Dask's syntax (e.g. 2GB, 512MiB, 4e9) "
                             "or auto")
        return v

    @property
    def gpus(self) -> int:
        """GPUs per worker after the default (``gpus_per_worker``)."""
        if self.gpus_per_worker is not None:
            return self.gpus_per_worker
        return 1 if self.device == "cuda" else 0

    @property
    def worker_resources(self) -> dict[str, int]:
        """The Dask resources every training worker advertises: ``train=1``, plus ``GPU=N``."""
        return {"train": 1, **({"GPU": self.gpus} if self.gpus else {})}


class ResourcesConfig(_Strict):
    """How the allocation's slots are split between sims and training."""

    training_cores: int | None = Field(default=None, ge=0)
    """Cores kept for Dask workers; None: workers x threads_per_worker
    (allocation backend) or none (local and jobqueue backends)."""
    training_nodes: int = Field(default=0, ge=0)
    """Whole nodes kept for training (allocation backend); overrides training_cores."""
    srun_steps_per_s: float | None = Field(default=None, gt=0)
    """Cap on srun step creations per second by the srun launcher (all roles together), for
    sites that flag jobs creating steps too fast; None: no cap. The agent launcher creates
    one step per node instead."""
    sim_slots: int | None = Field(default=None, ge=1)
    """Cap on sim slots; None: every CPU not kept for training. Outside Slurm the
    local box may be oversubscribed up to this number (default: 2 x its CPUs, or
    enough for one check and one generate sim side by side if that is more)."""


class TrackingConfig(_Strict):
    """MLflow."""

    enabled: bool = True
    """Track in MLflow at all."""
    uri: str | None = None
    """Tracking URI: ``sqlite:///PATH``, another database (``postgresql://``, ``mysql://``, ``mssql://``),
    an MLflow server (``http(s)://``) or ``databricks``; None: sqlite:///<workdir>/mlflow.db."""
    experiment: str = Field(default="orchestrator", min_length=1)
    """Experiment name."""
    register_as: str | None = Field(default=None, pattern=NAME_PATTERN)
    """Register the final model under this name when the target is met."""
    figures: bool = True
    """Draw every training round (the surrogate on a slice, or as a 2-D map for two inputs, with the
    checked points, passed and failed, and the data so far): ``<run dir>/figures/round-NNNN.png``,
    and at a met target ``final.png`` (the final version's checks and what they certify), uploaded
    to the MLflow run under ``figures/``."""
    tensorboard_dir: str | None = None
    """Also write the round scalars and figures as TensorBoard event files here (relative: to the
    run dir); view with ``tensorboard --logdir DIR``."""


    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is None:
            return v
        scheme = v.split("://", 1)[0].split("+", 1)[0].lower() if "://" in v else v.split(":", 1)[0].lower()
        if _CONTROL.search(v) or scheme not in TRACKING_SCHEMES:
            raise ValueError(f"got {v!r}: unsupported scheme {scheme!r}; expected sqlite:///<absolute path>/mlflow.db, "
                             "an http(s):// MLflow server, a database URI (postgresql, mysql, mssql) or databricks")
        return v


class ContinualConfig(_Strict):
    """Continual mode: after the target is met, keep the model current (a digital twin)."""

    enabled: bool = False
    """Keep going after the target: monitoring checks, drift detection, retraining, champion/challenger."""
    cadence_s: float = Field(default=0.0, ge=0)
    """Wait between monitoring rounds (each round advances ``{campaign_time}`` by one)."""
    checks: int = Field(default=4, ge=1, le=64)
    """Monitoring checks per round, at fresh points, run in parallel."""
    drift_window: int = Field(default=4, ge=1)
    """The drift rule looks at the champion's last N monitoring checks (N = this)."""
    drift_failure_rate: float = Field(default=0.5, gt=0, le=1)
    """Drift when at least this fraction of those N checks failed the tolerance."""
    window_rows: int | None = Field(default=None, ge=1)
    """Retrain on the newest accepted rows only, at most this many (whole data files, newest first)."""
    window_s: float | None = Field(default=None, gt=0)
    """... and/or only on rows accepted within the last this many seconds; neither: all data."""
    generates: int = Field(default=1, ge=1)
    """Generate sims run after a drift, to make the fresh data the retraining uses."""
    max_rounds: int | None = Field(default=None, ge=1)
    """End the continual phase after this many monitoring rounds; None: only a budget or a signal."""
    time_budget_s: float | None = Field(default=None, gt=0)
    """End the continual phase after this much wall time in it; None: no limit."""
    champion_alias: str = Field(default=CHAMPION_ALIAS, pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
    """The MLflow registry alias of the model in service (``tracking.register_as``)."""
    promote_margin: float = Field(default=0.0, ge=0, lt=1)
    """A challenger wins when its mean error on the same checks is below (1 - margin) x the champion's."""

    @model_validator(mode="after")
    def _budget(self) -> ContinualConfig:
        if self.enabled and self.max_rounds is None and self.time_budget_s is None:
            raise ValueError("continual mode needs an end besides a signal: set max_rounds or time_budget_s")
        return self


class StepsConfig(_Strict):
    """Steps run one at a time (``run LOOP.yml --steps generate,train,evaluate``)."""

    data: list[str] = []
    """Data for ``--steps train``: run directories (their data/) or .npy files, relative to loop.yml;
    ``--data`` on the command line adds to these."""
    generate_runs: int = Field(default=1, ge=1)
    """Generate sims the ``generate`` step runs."""
    evaluate_checks: int = Field(default=4, ge=1)
    """Check sims at fresh points the ``evaluate`` step compares the model against."""


class AcceptanceConfig(_Strict):
    """Rows that would poison the training are refused when a sim returns them (before they are
    written to ``data/``; a check's truth likewise): dropped from the run's table and counted, with
    the first offending value, in its ``sim_end`` event (``refused_rows``, ``refused``). A run left
    with no row is a failed run, retried as usual. NaN and Inf are always refused (a malformed table)."""

    ranges: dict[str, tuple[float, float]] = {}
    """A declared plausible range ``[lo, hi]`` per output name (e.g. ``{y: [-2, 2]}``); a row with a
    value outside it is refused. Outputs not named here have no range."""
    max_abs: float = Field(default=3.4e38, gt=0)
    """A row with an output of larger magnitude is refused (the default: the largest float32, which
    the training computes in)."""
    outlier_k: float | None = Field(default=None, gt=0)
    """Robust outlier rule, off by default (None): a row is refused when an output lies more than
    ``outlier_k`` robust scales (1.4826 x the median absolute deviation, or where larger the 90% quantile
    of the absolute deviations / 1.6449: a plateau holding over half the values does not shrink it to 0)
    from the median of that output over the data accepted so far and the run's own rows (neither is moved
    by a few wild values). It judges from 8 values on, and not where 90% of them are equal. Opt in for an
    output without narrow features: a peak or front seen in under 10% of the rows looks like an outlier.
    A huge value is refused without it (``max_abs``)."""

    @field_validator("ranges")
    @classmethod
    def _ordered_ranges(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for name, (lo, hi) in v.items():
            if not lo < hi:
                raise ValueError(f"acceptance.ranges.{name}: lo ({lo}) must be below hi ({hi})")
        return v


class WalltimeConfig(_Strict):
    """Walltime-aware placement inside a Slurm allocation (see :mod:`orchestrator.loop.walltime`)."""

    enabled: bool = True
    """Ask Slurm when the allocation ends; start no sim expected to overrun it, and exit with
    the resumable code 75 before Slurm's warning signal."""
    signal_lead_s: float = Field(default=120.0, ge=0)
    """Slurm's warning signal comes this long before the end (``submit --signal-lead``;
    ``#SBATCH --signal=B:USR1@120``): the campaign is out before it."""
    safety_s: float = Field(default=10.0, ge=0)
    """Further time kept for the final checkpoint and exit."""


class LoopConfig(_Strict):
    """A whole campaign: what loop.yml holds."""

    name: str = Field(pattern=NAME_PATTERN)
    """Campaign name; run directories are <workdir>/<name>-<timestamp>."""
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    """Makes the campaign reproducible: query points, sim seeds, model init."""
    workdir: str = "runs"
    """Run root (relative to the current directory); ``--workdir`` overrides."""
    inputs: list[InputSpec] = Field(min_length=1)
    """Surrogate inputs and their domains."""
    outputs: list[str] = Field(min_length=1)
    """Surrogate outputs (column names after the inputs)."""
    sims: SimsConfig
    """The check and generate simulations."""
    target: TargetConfig = TargetConfig()
    """Stop criteria."""
    policy: PolicyConfig = PolicyConfig()
    """Scheduling policy."""
    training: TrainingConfig = TrainingConfig()
    """Surrogate and Dask backend."""
    resources: ResourcesConfig = ResourcesConfig()
    """Split of the allocation."""
    tracking: TrackingConfig = TrackingConfig()
    """MLflow tracking."""
    walltime: WalltimeConfig = WalltimeConfig()
    """Allocation end awareness."""
    continual: ContinualConfig = ContinualConfig()
    """Continual mode (keep the model current after the target is met)."""
    steps: StepsConfig = StepsConfig()
    """Steps run one at a time."""
    acceptance: AcceptanceConfig = AcceptanceConfig()
    """Which returned rows join the data (declared ranges, a robust outlier rule)."""

    @field_validator("outputs")
    @classmethod
    def _output_names(cls, v: list[str]) -> list[str]:
        for i, name in enumerate(v):
            if not _IDENT.match(name):
                raise ValueError(f"output name {name!r} is not an identifier")
            if name in v[:i]:
                raise ValueError(f"output name {name!r} is given twice; each output is its own column")
        return v

    @model_validator(mode="after")
    def _placeholders(self) -> LoopConfig:
        names = [i.name for i in self.inputs]
        reserved = [n for n in names if n in RESERVED_FIELDS or n.endswith(("_lo", "_hi"))]
        if reserved:
            raise ValueError(f"inputs: name {reserved[0]!r} is a placeholder the coordinator fills itself "
                             f"({', '.join(RESERVED_FIELDS)}, NAME_lo, NAME_hi); rename the input")
        if len(set(names) | set(self.outputs)) != len(names) + len(self.outputs):
            both = sorted({n for n in [*names, *self.outputs] if [*names, *self.outputs].count(n) > 1})
            raise ValueError(f"inputs/outputs: {', '.join(map(repr, both))} named twice; input and output names "
                             "must all differ")
        for role in ("check", "generate"):
            ranks, cap = getattr(self.sims, role).ranks, self.resources.sim_slots
            if cap is not None and ranks > cap:
                raise ValueError(f"resources.sim_slots: {cap} is below sims.{role}.ranks ({ranks}); no run of it "
                                 "could start")
            columns = getattr(self.sims, role).output
            if columns is not None and columns.columns is not None and len(columns.columns) != self.n_columns:
                raise ValueError(f"sims.{role}.output.columns: {columns.columns} takes {len(columns.columns)} "
                                 f"column(s) but a result has {self.n_columns} (inputs then outputs: "
                                 f"{', '.join([*names, *self.outputs])})")
        unknown = sorted(set(self.acceptance.ranges) - set(self.outputs))
        if unknown:
            raise ValueError(f"acceptance.ranges: {unknown[0]!r} is not an output (outputs: {self.outputs})")
        check_placeholders(self.sims.check.args, check_fields(names), "sims.check.args")
        check_placeholders(self.sims.generate.args, generate_fields(names), "sims.generate.args")
        if self.policy.sampling == Sampling.ENSEMBLE and self.policy.ensemble_size < 2:
            raise ValueError("policy.sampling: ensemble needs policy.ensemble_size >= 2 (e.g. 4)")
        return self

    @property
    def chosen_points(self) -> bool:
        """The coordinator chooses each generate run's points (``policy.points_per_run`` set, or
        the generate args take a ``{points_file}``); otherwise the sim draws them in a window."""
        return self.policy.points_per_run is not None or self.points_file_in_args

    @property
    def points_file_in_args(self) -> bool:
        """The generate args take a ``{points_file}``."""
        return any("{points_file" in a for a in self.sims.generate.args)

    @property
    def points_per_generate(self) -> int:
        """Points chosen for one generate run (when :attr:`chosen_points`)."""
        return self.policy.points_per_run or DEFAULT_POINTS_PER_RUN

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    @property
    def n_columns(self) -> int:
        return len(self.inputs) + len(self.outputs)


COMMON_FIELDS = ("seed", "run_id", "attempt", "ranks", "campaign_time")
DEFAULT_POINTS_PER_RUN = 32
"""Points per generate run when its args name ``{points_file}`` and ``policy.points_per_run`` is unset."""
RESERVED_FIELDS = (*COMMON_FIELDS, "points", "points_file", "lo", "hi")
"""Placeholder names an input may not take: the coordinator's value would silently replace the input's."""


def check_fields(inputs: Sequence[str]) -> set[str]:
    """Placeholders a check sim's args may use."""
    return {*COMMON_FIELDS, *inputs}


def generate_fields(inputs: Sequence[str]) -> set[str]:
    """Placeholders a generate sim's args may use: a sampling window per input."""
    fields = {*COMMON_FIELDS, "points_file", *(f"{n}_lo" for n in inputs), *(f"{n}_hi" for n in inputs)}
    if len(inputs) == 1:
        fields |= {"lo", "hi"}
    return fields


def check_placeholders(args: Iterable[str], allowed: set[str], where: str) -> None:
    """Raise ValueError for a placeholder outside ``allowed`` or a malformed template."""
    for arg in args:
        try:
            parsed = list(string.Formatter().parse(arg))
        except ValueError as exc:
            raise ValueError(f"{where}: bad template {arg!r}: {exc}") from exc
        for _, field, _, _ in parsed:
            if field is None:
                continue
            if field not in allowed:
                hint = _did_you_mean(field, allowed)
                raise ValueError(
                    f"{where}: unknown placeholder {{{field}}} in {arg!r}{hint}; "
                    f"allowed: {', '.join(sorted(allowed))}"
                )


def render_args(args: Sequence[str], values: Mapping[str, Any]) -> list[str]:
    """Fill placeholders: floats keep full precision (repr), format specs are honoured."""
    out = []
    for arg in args:
        pieces = []
        for literal, field, spec, conv in string.Formatter().parse(arg):
            pieces.append(literal)
            if field is None:
                continue
            value = values[field]
            if spec or conv:
                pieces.append(format(value, spec or ""))
            else:
                pieces.append(repr(value) if isinstance(value, float) else str(value))
        out.append("".join(pieces))
    return out


def _srun_option_denied(arg: str) -> bool:
    """Whether ``arg`` is one of :data:`SRUN_DENIED`, in any form srun reads (``--opt=V``, a unique prefix of
    a long option as getopt takes it, a short option with its value attached)."""
    if arg.startswith("--"):
        name = arg.split("=", 1)[0]
        return len(name) > 2 and any(denied.startswith(name) for denied in SRUN_DENIED)
    return arg.startswith("-") and len(arg) > 1 and arg[1] in _SRUN_DENIED_SHORT


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key.path=value, e.g. --set target.tolerance=0.01")
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() else ""  # a SafeLoader, aliases bounded
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        mark = getattr(exc, "problem_mark", None)
        where = f" at column {mark.column + 1}" if mark else ""
        raise ConfigError(f"--set {item!r}: value {raw!r} is not valid YAML{where}: {problem}") from exc
    if isinstance(value, str):  # YAML 1.1 reads 3e-3 as a string; a user means a number
        with contextlib.suppress(ValueError):
            value = float(value)
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML scalars) in place."""
    for item in overrides:
        path, value = _parse_override(item)
        node: Any = raw
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part) if isinstance(node, dict) else None
            if nxt is None:
                nxt = {}
                node[part] = nxt
            if not isinstance(nxt, dict):
                where = ".".join(path[: i + 1])
                raise ConfigError(f"--set {item!r}: {where} is not a mapping")
            node = nxt
        node[path[-1]] = value
    return raw


def _model_at(loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The pydantic model whose fields live at ``loc`` (for did-you-mean)."""
    model: type[BaseModel] | None = LoopConfig
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            if isinstance(part, int):
                continue
            return None
        ann = model.model_fields[part].annotation
        model = _first_model(ann)
    return model


def _first_model(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()):
        found = _first_model(arg)
        if found is not None:
            return found
    return None


_REWRITES = (
    (re.compile(r"^String should match pattern (.*)$"), r"expected a string matching the pattern \1"),
    (
        re.compile(r"^List should have at least (\d+) items? after validation.*$"),
        r"expected a list with at least \1 item(s)",
    ),
    (re.compile(r"^\w+ should be "), "expected "),
    (re.compile(r"^\w+ should have "), "expected "),
)


def _expected(msg: str) -> str:
    """pydantic's 'Input should be X' as 'expected X'."""
    for pattern, repl in _REWRITES:
        new = pattern.sub(repl, msg)
        if new != msg:
            return new
    return msg


def _format_error(err: Mapping[str, Any]) -> str:
    loc = [p for p in err["loc"] if p not in ("function-after",)]
    path = ".".join(str(p) for p in loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        hint = _did_you_mean(str(loc[-1]), parent.model_fields if parent else ())
        allowed = f"; allowed: {', '.join(parent.model_fields)}" if parent else ""
        return f"{path}: unknown key{hint}{allowed}"
    if kind == "missing":
        return f"{path}: required key is missing"
    msg = _expected(str(err["msg"]).removeprefix("Value error, "))
    value = err.get("input")
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    if kind.startswith("value_error") or kind == "assertion_error":
        if not loc and re.match(r"^[\w./]+: ", msg):  # a check across keys names its key itself
            return msg
        return f"{path}: {msg}"
    return f"{path}: got {shown}, {msg}"


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem, prefixed with the file name."""
    return "\n".join(f"{source}: {_format_error(e)}" for e in exc.errors())


_LoaderMixinBase = yaml.SafeLoader if TYPE_CHECKING else object


class _UniqueKeys(_LoaderMixinBase):  # type: ignore[misc,valid-type]
    """YAML's safe loader, but a key given twice in one mapping is an error, not "the last wins"."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (it is given twice; keep one)", key_node.start_mark)
            seen.add(key)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping

    def get_single_node(self) -> yaml.Node | None:
        """The document's node graph, refused when its aliases would expand it past :data:`MAX_YAML_VALUES`."""
        node: yaml.Node | None = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node


class _UniqueKeyLoader(_UniqueKeys, yaml.SafeLoader):  # type: ignore[misc]  # PyYAML ships no annotations
    """The pure-Python safe loader: its errors name the exact column and say what was expected."""


class _FastUniqueKeyLoader(_UniqueKeys, getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """libyaml's safe loader where PyYAML was built with it: it reads loop.yml 4-10 times faster
    (15-20 ms of every start-up on a busy box, issue 25); the same SafeConstructor builds the values.
    A file it refuses is read again by :class:`_UniqueKeyLoader`, whose error is the one reported."""


MAX_YAML_VALUES = 100_000
"""The most values (scalars, lists, mappings) loop.yml may hold once its aliases are expanded: aliases
share one object when loaded, but whatever walks the config (validation, state.json, MLflow params)
meets every copy, so a few lines of nested aliases (a "billion laughs") would take minutes and all memory."""


def _check_expansion(root: yaml.Node) -> None:
    """Raise a ConstructorError naming the key whose value expands past :data:`MAX_YAML_VALUES`, or
    that holds itself (a recursive alias). Each distinct node is counted once: time and memory stay
    bounded by the file's size."""
    sizes: dict[int, int] = {}
    path: list[str] = []
    culprit: list[str] = []

    def size(node: yaml.Node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            if known < 0:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{'.'.join(path) or '(top level)'}: a YAML alias refers to a value it is part "
                    "of (recursive); write the value out", node.start_mark)
            return known
        sizes[id(node)] = -1  # being counted
        total = 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                path.append(str(key.value) if isinstance(key, yaml.ScalarNode) else "?")
                total += size(key) + size(value)
                if total > MAX_YAML_VALUES and not culprit:
                    culprit.extend(path)
                path.pop()
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                total += size(item)
        sizes[id(node)] = min(total, MAX_YAML_VALUES + 1)
        return sizes[id(node)]

    if size(root) > MAX_YAML_VALUES:
        where = ".".join(culprit) or "(top level)"
        raise yaml.constructor.ConstructorError(
            None, None, f"{where}: YAML aliases expand this value past {MAX_YAML_VALUES} values (an alias "
            "bomb?); write the values out", None)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read loop.yml as a mapping, turning every YAML problem into one ConfigError line."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{path}: is a directory; give the campaign's loop.yml") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte {exc.object[exc.start]:#04x}); "
                          "save the file as UTF-8") from exc
    try:
        try:
            raw = yaml.load(text, Loader=_FastUniqueKeyLoader)  # a SafeLoader
        except yaml.YAMLError:  # libyaml's messages are vaguer (column 1, "did not find expected ...")
            raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: {where}invalid YAML: {problem}") from exc
    if raw is None:
        raise ConfigError(f"{path}: the file is empty; expected a mapping with name, inputs, outputs and sims")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> LoopConfig:
    """Read, override and validate loop.yml. Raises ConfigError with one line per problem."""
    p = Path(path)
    raw = apply_overrides(read_yaml(p), overrides)
    try:
        return LoopConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(p))) from exc


def resolve_path(path: Path, what: str) -> Path:
    """``path.resolve()``, with a symlink loop (or another unreadable link) a one-line ConfigError."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:  # Python < 3.13 says RuntimeError("Symlink loop from ...")
        raise ConfigError(f"{what}: {path} is a symbolic link that never ends (a loop); point it at a file") from exc


def resolve_binary(binary: str, base_dir: Path, key: str) -> Path:
    """Find a sim binary: a path (relative to loop.yml), else next to Python, else on PATH."""
    if "/" in binary:
        candidate = resolve_path(base_dir / binary, f"{key}: {binary!r}")
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
        raise ConfigError(f"{key}: {binary!r} is not an executable file (looked at {candidate})")
    here = Path(sys.executable).parent / binary
    if here.is_file() and os.access(here, os.X_OK):
        return here
    found = shutil.which(binary)
    if found:
        return Path(found)
    raise ConfigError(
        f"{key}: executable {binary!r} not found next to {sys.executable} or on PATH; "
        "build the sims with `pip install -e .` (or `make setup`), or give a path"
    )


def tensorboard_dir(path: str, root: Path) -> Path:
    """Where ``tracking.tensorboard_dir`` (relative: to the run dir ``root``) puts its event files; a
    ConfigError naming the key and the value when something other than a directory is there."""
    p = Path(path)
    logdir = p if p.is_absolute() else root / p
    for place in (logdir, *logdir.parents):
        if place.exists() or place.is_symlink():
            if not place.is_dir():
                raise ConfigError(f"tracking.tensorboard_dir: {path!r}: {place} is not a directory; name a directory "
                                  "(relative: to the run dir)")
            break
    return logdir


def resolve_binaries(cfg: LoopConfig, loop_file: Path) -> dict[Role, Path]:
    """Resolve every sim binary, so a typo fails at start, not mid-campaign."""
    base = loop_file.resolve().parent
    return {
        role: resolve_binary(cfg.sims.of(role).binary, base, f"{loop_file}: sims.{role}.binary")
        for role in ROLES
    }


def flat_dict(cfg: LoopConfig) -> dict[str, Any]:
    """The resolved config as plain data (for state.json and MLflow params)."""
    return cfg.model_dump(mode="json")
