"""``submit``: a campaign as a Slurm batch job that survives its walltime.

The job script is rendered from a template file (``batch/campaign.sbatch.in``)
by :mod:`orchestrator.templating`, every value through an explicit escape
filter (``sh``, ``sbatch``; ``raw`` only for the ``--extra``/``--setup`` lines
that :class:`JobSpec` validated); optional sections appear only when set.

What ``submit`` writes, under ``<workdir>/jobs/``: ``<name>-<stamp>.yml``, the
loop.yml as it will run (``--set`` overrides applied, relative binary paths made
absolute), ``<name>-<stamp>.sbatch`` the rendered script, and the job's log
``<name>-<stamp>.out``. The script runs ``python -m orchestrator run`` on that
snapshot with ``--workdir``; on the walltime warning (``--signal=B:USR1@N``) it
forwards the signal, the coordinator checkpoints and exits 75, and the script
requeues the job (or resubmits itself); the next start finds the unfinished run
under the workdir and resumes it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml

from orchestrator.errors import ConfigError, ExitCode, SubmitError, UsageError

log = logging.getLogger(__name__)

_TEMPLATE_PLACES = (Path(__file__).resolve().parent / "batch", Path(__file__).resolve().parent.parent / "batch")
DEFAULT_TEMPLATE = next((d / "campaign.sbatch.in" for d in _TEMPLATE_PLACES if (d / "campaign.sbatch.in").is_file()),
                        _TEMPLATE_PLACES[-1] / "campaign.sbatch.in")
"""The sbatch template: inside the installed package (a wheel), else the checkout's ``batch/``."""
JOBS_DIR = "jobs"
OnInterrupt = Literal["requeue", "resubmit", "none"]



# -- what the user asks for ---------------------------------------------------------

_NODES = re.compile(r"^[1-9]\d*(-[1-9]\d*)?$")
_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2})$")
_GPUS = re.compile(r"^([A-Za-z0-9_.-]+:)?[1-9]\d*$")


@dataclass(frozen=True)
class JobSpec:
    """The resources and behaviour of the batch job; validated on construction."""

    nodes: str | None = None
    ntasks_per_node: int | None = None
    exclusive: bool = False
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus: str | None = None
    extra: tuple[str, ...] = ()
    """Extra ``#SBATCH`` directives, passed through (one line each)."""
    setup: tuple[str, ...] = ()
    """Shell lines run before the coordinator (module load, source venv), verbatim."""
    signal_lead_s: int = 120
    on_interrupt: OnInterrupt = "requeue"
    max_restarts: int = 10

    def __post_init__(self) -> None:
        _check(self.nodes, _NODES, "--nodes", "a count or a range such as 2 or 2-4")
        _check(self.time, _TIME, "--time", "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
        _check(self.gpus, _GPUS, "--gpus", "a count or type:count such as 4 or a100:2")
        for flag in ("partition", "account", "qos"):
            value = getattr(self, flag)
            if value is not None and not value.strip():
                raise UsageError(f"--{flag}: empty value")
            _no_breaks(value, f"--{flag}")
        if self.ntasks_per_node is not None and self.ntasks_per_node < 1:
            raise UsageError(f"--ntasks-per-node: expected a positive count, got {self.ntasks_per_node}")
        if not 1 <= self.signal_lead_s <= 65535:
            raise UsageError(f"--signal-lead: expected 1..65535 seconds, got {self.signal_lead_s}")
        if self.max_restarts < 0:
            raise UsageError(f"--max-restarts: expected 0 or more, got {self.max_restarts}")
        if self.on_interrupt not in ("requeue", "resubmit", "none"):
            raise UsageError(f"--on-interrupt: expected requeue, resubmit or none, got {self.on_interrupt!r}")
        object.__setattr__(self, "extra", tuple(directive(line) for line in self.extra))
        for line in self.setup:
            _no_breaks(line, "--setup")


def _no_breaks(value: str | None, flag: str) -> None:
    if value is None:
        return
    try:
        from orchestrator.templating import one_line  # jinja2: not on every command's start

        one_line(value, flag)
    except ValueError as exc:
        raise UsageError(f"{exc} (give one line per flag; repeat the flag for more)") from exc


def _check(value: str | None, pattern: re.Pattern[str], flag: str, expected: str) -> None:
    if value is not None and not pattern.match(value):
        raise UsageError(f"{flag}: got {value!r}, expected {expected}")


def directive(line: str) -> str:
    """An ``--extra`` line as an ``#SBATCH`` directive (``--mem=4G`` gets the prefix)."""
    _no_breaks(line, "--extra")
    text = line.strip()
    if text.startswith("-"):
        text = "#SBATCH " + text
    if not re.match(r"^#SBATCH\s+-", text):
        raise UsageError(f"--extra: {line!r} is not an #SBATCH directive; write e.g. '#SBATCH --mem=4G'")
    return text


# -- the job ------------------------------------------------------------------------


@dataclass(frozen=True)
class Submission:
    """Everything ``submit`` writes, before it is written."""

    name: str
    workdir: Path
    script_path: Path
    script: str
    loop_path: Path
    loop_text: str
    log_path: Path


def _stamp(jobs: Path, name: str) -> str:
    base = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        stamp = base if i == 0 else f"{base}-{i}"
        if not (jobs / f"{name}-{stamp}.sbatch").exists():
            return stamp
    raise UsageError(f"{jobs}: cannot find a free job script name")


def snapshot_loop(loop_file: Path, overrides: Sequence[str], *, job_sets_up: bool = False) -> tuple[str, str, str]:
    """The loop.yml as it will run: validated, overrides applied, binary paths absolute.

    Returns (campaign name, default workdir, YAML text).
    """
    from orchestrator.config import ROLES, LoopConfig, apply_overrides, load_config, read_yaml, resolve_binaries

    cfg: LoopConfig = load_config(loop_file, overrides)
    try:
        resolve_binaries(cfg, loop_file)  # a typo fails now, not when the job starts
    except ConfigError as exc:
        if not job_sets_up:
            raise
        # The job's --setup lines (module load, a venv) may be what puts it on PATH.
        log.warning("%s (the job's --setup may provide it; submitting anyway)", exc)
    raw = apply_overrides(read_yaml(loop_file), overrides)
    base = loop_file.resolve().parent
    for role in ROLES:
        sim = raw["sims"][role]
        if "/" in str(sim["binary"]):
            sim["binary"] = os.path.normpath(base / str(sim["binary"]))  # a symlink stays one
    # repr() keeps the comment on one line whatever the path or the overrides hold.
    source = str(loop_file.resolve())
    header = f"# Rendered by `python -m orchestrator submit` from {source!r}, --set {list(overrides)!r}\n"
    return cfg.name, cfg.workdir, header + yaml.safe_dump(raw, sort_keys=False)


def _output_path(log_path: Path) -> str:
    """The --output value: Slurm expands %-patterns unless the name has a backslash."""
    text = str(log_path)
    return text if "\\" in text else text.replace("%", "%%")


def prepare(
    loop_file: Path,
    spec: JobSpec,
    *,
    workdir: Path | None = None,
    overrides: Sequence[str] = (),
    new: bool = False,
    template: Path | None = None,
    python: str | None = None,
    cwd: Path | None = None,
    stamp: str | None = None,
) -> Submission:
    """Validate the campaign and render its job script; writes nothing."""
    name, default_workdir, loop_text = snapshot_loop(loop_file, overrides, job_sets_up=bool(spec.setup))
    here = (cwd or Path.cwd()).absolute()
    root = (here / (workdir if workdir is not None else Path(default_workdir))).resolve()
    jobs = root / JOBS_DIR
    stamp = stamp or _stamp(jobs, name)
    script_path = jobs / f"{name}-{stamp}.sbatch"
    loop_path = jobs / f"{name}-{stamp}.yml"
    log_path = jobs / f"{name}-{stamp}.out"
    template_path = template or DEFAULT_TEMPLATE
    try:
        text = template_path.read_text()
    except OSError as exc:
        raise UsageError(f"--template: cannot read {template_path}: {exc.strerror}") from exc
    passed = ("nodes", "ntasks_per_node", "exclusive", "time", "partition", "account", "qos", "gpus", "extra",
              "setup", "signal_lead_s", "on_interrupt")
    context = {
        **{k: getattr(spec, k) for k in passed},
        "job_name": name,
        "output": _output_path(log_path),
        "requeue": spec.on_interrupt == "requeue",
        "max_restarts": spec.max_restarts if spec.on_interrupt != "none" else 0,
        "script": str(script_path),
        "cwd": str(here),
        "python": python or sys.executable,
        "loop": str(loop_path),
        "workdir": str(root),
        "new": new,
        "exit_checkpointed": int(ExitCode.INTERRUPTED),
    }
    try:
        from orchestrator.templating import render

        script = render(text, context, name=template_path.name)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return Submission(name, root, script_path, script, loop_path, loop_text, log_path)


def write(sub: Submission) -> None:
    """Write the loop snapshot and the job script (0700: it is a program)."""
    sub.script_path.parent.mkdir(parents=True, exist_ok=True)
    sub.loop_path.write_text(sub.loop_text)
    sub.script_path.write_text(sub.script)
    sub.script_path.chmod(0o700)


def parse_job_id(stdout: str) -> str:
    """The job id from ``sbatch --parsable`` output (``ID`` or ``ID;CLUSTER``)."""
    lines = [ln.strip() for ln in stdout.splitlines() if ln.strip()]
    job = lines[-1].split(";", 1)[0] if lines else ""
    if not job.isdigit():
        raise SubmitError(f"cannot read a job id from sbatch's output: {stdout.strip()!r}")
    return job


def sbatch(script_path: Path, env: Mapping[str, str] | None = None) -> str:
    """Submit the script; return the job id."""
    from orchestrator.procs import run_checked

    return parse_job_id(run_checked(["sbatch", "--parsable", str(script_path)], env=env, timeout=60))


def _refuse_silent_resume(sub_workdir: Path, name: str, overrides: Sequence[str], new: bool) -> None:
    """`run` refuses --set on a run it resumes; the snapshot hides --set, so check here."""
    if not overrides or new:
        return
    from orchestrator.store import find_unfinished

    found = find_unfinished(sub_workdir, name)
    if found is not None:
        raise UsageError(
            f"an unfinished run of {name!r} exists at {found}: the job would resume it and ignore --set; "
            "pass --new to start a fresh run, or drop --set to resume it"
        )


# -- the command ------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """The ``submit`` subcommand's flags."""
    p = sub.add_parser("submit", help="run a campaign as a Slurm batch job that resumes past its walltime")
    p.add_argument("loop", type=Path, help="the campaign's loop.yml")
    p.add_argument("--nodes", help="#SBATCH --nodes (count or min-max)")
    p.add_argument("--ntasks-per-node", type=int, help="#SBATCH --ntasks-per-node: sim slots per node")
    p.add_argument("--exclusive", action="store_true", help="#SBATCH --exclusive: whole nodes")
    p.add_argument("--time", help="#SBATCH --time, e.g. 2:00:00")
    p.add_argument("--partition", help="#SBATCH --partition")
    p.add_argument("--account", help="#SBATCH --account")
    p.add_argument("--qos", help="#SBATCH --qos")
    p.add_argument("--gpus", help="#SBATCH --gpus, e.g. 4 or a100:2")
    p.add_argument("--extra", action="append", default=[], metavar="'#SBATCH ...'",
                   help="an extra #SBATCH directive, passed through (repeatable)")
    p.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="a shell line run before the coordinator, e.g. 'module load mpich' (repeatable)")
    p.add_argument("--workdir", type=Path, help="run root (default: `workdir` in loop.yml); job files go "
                   "to WORKDIR/jobs/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a loop.yml value (baked into the job's copy of loop.yml)")
    p.add_argument("--new", action="store_true", help="start a fresh run even if an unfinished one exists")
    p.add_argument("--signal-lead", type=int, default=120, metavar="S",
                   help="SIGUSR1 this many seconds before the time limit (default 120)")
    p.add_argument("--on-interrupt", choices=("requeue", "resubmit", "none"), default="requeue",
                   help="after a checkpoint (exit 75): requeue the job (default), resubmit it, or stop")
    p.add_argument("--max-restarts", type=int, default=10, help="stop resuming after this many (default 10)")
    p.add_argument("--template", type=Path, help=f"job script template (default {DEFAULT_TEMPLATE})")
    p.add_argument("--dry-run", action="store_true", help="print the job script; write and submit nothing")


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    return JobSpec(
        nodes=args.nodes, ntasks_per_node=args.ntasks_per_node, exclusive=args.exclusive, time=args.time,
        partition=args.partition, account=args.account, qos=args.qos, gpus=args.gpus, extra=tuple(args.extra),
        setup=tuple(args.setup), signal_lead_s=args.signal_lead, on_interrupt=args.on_interrupt,
        max_restarts=args.max_restarts,
    )


def _first_count(nodes: str | None) -> int:
    return int(nodes.split("-", 1)[0]) if nodes else 1


def fit_request(spec: JobSpec, needed: int) -> tuple[JobSpec, str | None]:
    """Size a job that asks for no CPUs, refuse one that can never start the campaign.

    ``needed`` is the fewest CPUs the campaign starts with (its largest sim plus the
    cores kept for Dask workers, :func:`orchestrator.runner.cpus_needed`). Whole nodes
    (``--exclusive``) are taken as enough: their size is the site's.
    """
    if spec.exclusive:
        return spec, None
    nodes = _first_count(spec.nodes)
    if spec.ntasks_per_node is None:
        per_node = -(-needed // nodes)
        note = (f"sizing the job: --nodes={spec.nodes or 1} --ntasks-per-node={per_node} "
                f"(the campaign needs {needed} CPUs; give --ntasks-per-node or --exclusive for more)")
        return replace(spec, nodes=spec.nodes or "1", ntasks_per_node=per_node), note
    have = nodes * spec.ntasks_per_node
    if have < needed:
        raise UsageError(
            f"--nodes={spec.nodes or 1} --ntasks-per-node={spec.ntasks_per_node} gives {have} CPUs but the campaign "
            f"needs at least {needed} (its largest sim plus the Dask worker's cores); raise --ntasks-per-node to "
            f"{-(-needed // nodes)}, or use --exclusive"
        )
    return spec, None


def main(args: argparse.Namespace) -> int:
    """``python -m orchestrator submit``."""
    from orchestrator.config import load_config
    from orchestrator.runner import cpus_needed

    spec, note = fit_request(spec_from_args(args), cpus_needed(load_config(args.loop, args.overrides)))
    if note:
        print(f"submit: {note}", file=sys.stderr)
    sub = prepare(args.loop, spec, workdir=args.workdir, overrides=args.overrides, new=args.new,
                  template=args.template)
    if args.dry_run:
        sys.stdout.write(sub.script)
        print(f"# dry run: would write {sub.loop_path} and {sub.script_path}, then sbatch it",
              file=sys.stderr)
        return 0
    _refuse_silent_resume(sub.workdir, sub.name, args.overrides, args.new)
    write(sub)
    job = sbatch(sub.script_path, env=os.environ)
    print(f"submitted batch job {job}: campaign {sub.name!r}")
    print(f"  job script: {sub.script_path}")
    print(f"  job log:    {sub.log_path}")
    print(f"  run dir:    {sub.workdir}/{sub.name}-<UTC start time>/ (created when the job starts; "
          "summary.json there when it ends)")
    print(f"  watch:      squeue -j {job}; tail -f {shlex.quote(str(sub.log_path))}")
    return 0
