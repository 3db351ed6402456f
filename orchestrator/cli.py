"""Command line: argument parsing, exit codes, user-facing errors, logging setup.

Exit codes: 0 target met (or command succeeded); 1 anything unexpected;
2 bad config or usage; 3 stopped by max_rounds or a budget without meeting
the target; 75 interrupted by a signal after checkpointing (resumable).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from orchestrator.errors import ExitCode, OrchestratorError

log = logging.getLogger("orchestrator")

STOP_WORDS = {"max_rounds": "target.max_rounds reached", "time_budget": "target.time_budget_s used up",
              "data_budget": "policy.max_data_points reached"}
"""How `run` says why a campaign stopped short of its target (signals are named as they are)."""

SIGNAL_NAMES = ("SIGTERM", "SIGINT", "SIGUSR1")
PROMPT_EXIT = False
"""Set when a signal ended the run: everything is checkpointed, so ``python -m orchestrator`` exits at
once instead of waiting for the interpreter's teardown (Dask's threads and processes, which the
process guardian ends); a walltime's grace period is short."""

ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
"""OSErrors that are the machine's state, not a bug: one line, no traceback."""

DESCRIPTION = """\
AI-in-the-loop campaigns: MPI simulations, a PyTorch surrogate trained on Dask,
MLflow tracking; inside a Slurm allocation or on a laptop.

  python -m orchestrator validate loop.yml     check a campaign file and its sims
  python -m orchestrator run loop.yml          run (or resume) it until its target is met
  python -m orchestrator status runs/NAME-...  where a run stands
  python -m orchestrator compare loop.yml --strategies uniform,ensemble --seeds 1-5
                                               what a sampling strategy saves, measured
  python -m orchestrator accuracy runs/NAME-... --truth examples/front/truth.py
                                               a run's model against the known truth

Every loop.yml key: docs/loop-yml.md. Exit codes of run: 0 target met, 3 stopped by a
budget, 2 bad config or usage, 75 interrupted after a checkpoint (resumable), 1 other."""


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one line (no usage dump) on a bad command line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message} (see --help)\n")


CORE_COMMANDS = ("run", "validate", "report", "status")
"""Commands whose flags are defined here; the others' live beside their code (:func:`build_parser`)."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or (``command`` one of :data:`CORE_COMMANDS`) just what that command needs:
    the other commands' modules are not imported for it (17 ms of every ``run``'s start, issue 25)."""
    p = _Parser(prog="python -m orchestrator", description=DESCRIPTION,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run (or resume) a campaign until its target is met")
    run.add_argument("loop", nargs="?", type=Path, help="the campaign's loop.yml")
    run.add_argument("--workdir", type=Path, help="run root (default: `workdir` in loop.yml, i.e. ./runs)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a loop.yml value, e.g. --set seed=7 (repeatable)")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run")
    run.add_argument("--new", action="store_true", help="start fresh even if an unfinished run exists")
    run.add_argument("--no-live", action="store_true", help="plain log lines instead of the live panel")
    run.add_argument("--steps", metavar="STEP[,STEP]", help="only these steps, in order: generate, train, evaluate "
                     "(e.g. --steps generate,train); the default is the whole loop")
    run.add_argument("--data", action="append", default=[], metavar="RUN_DIR|FILE.npy",
                     help="data for --steps train: a run directory's data/ or .npy files (repeatable)")
    run.add_argument("--model", metavar="NAME[:VERSION]",
                     help="the registered model --steps evaluate checks (default: tracking.register_as, latest)")

    val = sub.add_parser("validate", help="check a loop.yml and the sims it names, then exit")
    val.add_argument("loop", type=Path)
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    rep = sub.add_parser("report", help="timeline PNG and a summary of where the time went")
    rep.add_argument("run_dir", type=Path)
    rep.add_argument("--png", type=Path, help="where to write the timeline (default RUN_DIR/timeline.png)")
    rep.add_argument("--json", action="store_true", help="print the summary as JSON")

    st = sub.add_parser("status", help="where a running or finished campaign stands")
    st.add_argument("run_dir", type=Path)

    if command in CORE_COMMANDS:
        return p
    from orchestrator import accuracy, compare, predict, scaffold, submit, ui  # flags beside their code

    for module in (submit, scaffold, predict, ui, compare, accuracy):
        module.add_parser(sub)
    return p


def command_of(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names (its first word that is no option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if verbosity < 2:
        # Dask configures its loggers when imported, here and in worker processes.
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
        for noisy in ("distributed", "asyncio", "mlflow", "alembic", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def cmd_validate(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config
    from orchestrator.runner import sim_setups

    cfg = load_config(args.loop, args.overrides)
    setups = sim_setups(cfg, args.loop)
    from orchestrator import sampling
    from orchestrator.errors import ConfigError

    try:  # a user's strategy must import, and so must a check-point function
        sampling.resolve(cfg, [args.loop.resolve().parent])
        sampling.check_drawer(cfg, [args.loop.resolve().parent])
    except ConfigError as exc:
        raise ConfigError(f"{args.loop}: {exc}") from exc
    if cfg.tracking.tensorboard_dir and Path(cfg.tracking.tensorboard_dir).is_absolute():
        from orchestrator.config import tensorboard_dir

        try:
            tensorboard_dir(cfg.tracking.tensorboard_dir, Path("/"))
        except ConfigError as exc:
            raise ConfigError(f"{args.loop}: {exc}") from exc
    print(f"{args.loop}: ok: campaign {cfg.name!r}, {len(cfg.inputs)} input(s), {len(cfg.outputs)} output(s)")
    from orchestrator.policy import describe_target

    print(f"  target: {describe_target(cfg.target)}")
    for role, setup in setups.items():
        sim = cfg.sims.of(role)
        print(f"  {role}: {setup.binary} on {sim.ranks} rank(s), launcher {sim.launcher}")
        print(f"    mpi: {setup.mpi.describe()}")
        if sim.templates or sim.files:
            print(f"    inputs: {', '.join([*sim.templates, *(Path(f).name for f in sim.files)])} (per-run directory)")
        result = (f"parser {sim.parser}" if sim.parser else f"output file {sim.output.path}" if sim.output
                  else "simkit (--out)")
        print(f"    results: {result}")
        if role == "generate":
            points = (f"chosen by the coordinator ({cfg.points_per_generate} per run)" if cfg.chosen_points
                      else "drawn by the sim in a window")
            print(f"    points: {points}")
    if cfg.tracking.enabled:
        from orchestrator.sharedfs import read_mounts, sqlite_on_shared_fs
        from orchestrator.tracking import default_tracking_uri

        uri = cfg.tracking.uri or default_tracking_uri(Path(cfg.workdir))
        warning = sqlite_on_shared_fs(uri, read_mounts())
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    return ExitCode.OK


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.progress import Progress
    from orchestrator.runner import run_sync

    if args.loop is None and args.resume is None:
        raise _usage("run needs a loop.yml or --resume RUN_DIR")
    os.umask(0o077)  # what the campaign writes (run dir, mlflow.db, mlartifacts, sim logs) is its owner's only
    if args.steps is not None or args.data or args.model:
        if args.resume is not None or args.steps is None:
            raise _usage("--data and --model go with --steps, and --steps does not resume")
        from orchestrator.steps import main as steps_main

        return steps_main(args)
    progress = Progress(enabled=False if args.no_live else None)
    result = run_sync(args.loop, workdir=args.workdir, overrides=args.overrides, resume=args.resume,
                      new=args.new, progress=progress)
    s = result.summary
    reason = s.get("stop_reason")
    why = f" ({STOP_WORDS.get(reason, reason)})" if reason and not s["target_met"] else ""
    line = (f"{result.status.value}{why}: {s['rounds']} training round(s), successes {s['successes']}, "
            f"{s['data_points']} data points, {s['sims_launched']} sims ({s['sims_failed']} failed), "
            f"{s['wall_s']:.1f} s")
    print(line)
    if s.get("certified_statement"):
        print(f"evidence: {s['certified_statement']}")
    if s.get("registered_model"):
        reg = s["registered_model"]
        print(f"model registered as {reg['name']} version {reg['version']} (MLflow run {s['mlflow_run_id']})")
    print(f"run dir: {s['run_dir']}")
    if result.status.resumable:
        print(f"resume with: python -m orchestrator run --resume {s['run_dir']}")
    global PROMPT_EXIT
    PROMPT_EXIT = s.get("stop_reason") in SIGNAL_NAMES
    return result.status.exit_code


def cmd_report(args: argparse.Namespace) -> int:
    import json

    from orchestrator.report import format_summary, plot_timeline, summarize

    summary = summarize(args.run_dir)
    png = plot_timeline(args.run_dir, args.png or args.run_dir / "timeline.png")
    summary["timeline_png"] = str(png)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary) + f"\ntimeline       {png}")
    return ExitCode.OK


def cmd_status(args: argparse.Namespace) -> int:
    from orchestrator.report import status_text

    print(status_text(args.run_dir))
    return ExitCode.OK


def _usage(message: str) -> OrchestratorError:
    from orchestrator.errors import UsageError

    return UsageError(message)


def cmd_submit(args: argparse.Namespace) -> int:
    from orchestrator.submit import main as submit_main

    return submit_main(args)


def cmd_new_sim(args: argparse.Namespace) -> int:
    from orchestrator.scaffold import main as scaffold_main

    return scaffold_main(args)


def cmd_compare(args: argparse.Namespace) -> int:
    from orchestrator.compare import main as compare_main

    return compare_main(args)


def cmd_accuracy(args: argparse.Namespace) -> int:
    from orchestrator.accuracy import main as accuracy_main

    return accuracy_main(args)


def cmd_predict(args: argparse.Namespace) -> int:
    from orchestrator.predict import main as predict_main

    return predict_main(args)


def cmd_ui(args: argparse.Namespace) -> int:
    from orchestrator.ui import main as ui_main

    return ui_main(args)


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "report": cmd_report, "status": cmd_status,
            "submit": cmd_submit, "new-sim": cmd_new_sim, "predict": cmd_predict, "ui": cmd_ui,
            "compare": cmd_compare, "accuracy": cmd_accuracy}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(command_of(sys.argv[1:] if argv is None else argv)).parse_args(argv)
    setup_logging(args.verbose)
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not as an "Exception ignored" at exit
        return code
    except OrchestratorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return ExitCode.KEYBOARD
    except BrokenPipeError:  # `status RUN | head`: the reader has gone, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return ExitCode.SIGPIPE
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror}{where} (free space, fix permissions, or choose another --workdir)",
              file=sys.stderr)
        return ExitCode.ERROR
