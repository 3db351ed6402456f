"""A campaign's steps one at a time: ``run LOOP.yml --steps generate,train,evaluate`` (any ordered subset).

* ``generate``: ``steps.generate_runs`` generate sims over the whole domain; their rows
  go to the command's run directory (``data/``), as a campaign's would.
* ``train``: one training of a fresh model on existing data -- this command's
  ``generate`` step, else the run directories or ``.npy`` files given with ``--data``
  or in ``steps.data`` -- saved in ``models/`` and registered under
  ``tracking.register_as``.
* ``evaluate``: a model -- ``--model NAME[:VERSION]`` from the MLflow registry, else
  the one this command trained, else the newest version of ``tracking.register_as``
  -- against ``steps.evaluate_checks`` check sims at fresh points; its error is
  printed and in ``summary.json``.

Seeds derive from ``seed`` and the step alone (not from what ran before in the same
command), so ``--steps generate``, ``--steps train --data RUN``, ``--steps evaluate``
in three commands give the same data, model and errors as one ``--steps
generate,train,evaluate``. Sims and training run where a campaign's do (mpiexec or
srun, the Dask backend); the coordinator never imports torch (a registered model is
evaluated on a worker).
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from orchestrator.config import LoopConfig, flat_dict, load_config
from orchestrator.errors import OrchestratorError, UsageError
from orchestrator.progress import Progress
from orchestrator.runlog import Check, DataAccepted, Evaluate, Status, StepsEnd, StepsStart, TrainEnd, TrainStart
from orchestrator.store import RunStore, atomic_write_json, data_file_problem

if TYPE_CHECKING:
    from orchestrator.loop.campaign import Campaign

log = logging.getLogger(__name__)

STEPS = ("generate", "train", "evaluate")


class NoData(UsageError):
    """``--steps train`` found no data where it looks."""


def parse_steps(text: str) -> list[str]:
    """``generate,train`` -> ["generate", "train"]; unknown or out-of-order steps are usage errors."""
    steps = [s.strip() for s in text.split(",") if s.strip()]
    if not steps:
        raise UsageError(f"--steps needs at least one of: {', '.join(STEPS)}")
    for step in steps:
        if step not in STEPS:
            close = difflib.get_close_matches(step, STEPS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"--steps: unknown step {step!r}{hint}; known steps: {', '.join(STEPS)}")
    if len(set(steps)) != len(steps) or steps != sorted(steps, key=STEPS.index):
        raise UsageError(f"--steps {text}: give each step once, in the order {','.join(STEPS)}")
    return steps


def step_seed(seed: int, step: str) -> np.random.Generator:
    """The random stream of one step: from the campaign's seed and the step only."""
    return np.random.default_rng([seed, STEPS.index(step)])


def data_files(paths: list[Path]) -> list[Path]:
    """The .npy files named: a run directory stands for its data/*.npy (in acceptance order)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted((p / "data" if (p / "data").is_dir() else p).glob("*.npy"))
        elif p.suffix == ".npy" and p.is_file():
            out.append(p)
        else:
            raise UsageError(f"--data {p}: not a run directory or an .npy file")
    return out


def find_data(cli: list[Path], cfg: LoopConfig, loop_file: Path, generated: list[Path] | None) -> list[Path]:
    """Data for the train step, or one line saying where it was looked for."""
    if generated:
        return generated
    named = list(cli) + [(loop_file.resolve().parent / d) for d in cfg.steps.data]
    files = data_files(named)
    if not files:
        looked = ", ".join(str(p) for p in named) or "nothing named"
        raise NoData(f"--steps train: no data; it is looked for in --data RUN_DIR|FILE.npy, in steps.data of "
                     f"{loop_file} and in this command's generate step (looked at: {looked}); "
                     "give --data, or run --steps generate,train")
    for f in files:  # a table of other columns would train a model of another output count
        if (why := data_file_problem(f, cfg.n_columns, [*cfg.input_names, *cfg.outputs])) is not None:
            raise UsageError(f"--data {f}: {why}")
    return files


@dataclass
class StepsResult:
    steps: list[str]
    run_dir: str
    data_files: list[str] = field(default_factory=list)
    data_points: int = 0
    model_file: str | None = None
    train_data: list[str] = field(default_factory=list)
    """The .npy files the train step read."""
    registered_model: dict[str, str] | None = None
    evaluation: dict[str, Any] | None = None


def parse_model(text: str | None) -> tuple[str, str | None] | None:
    if not text:
        return None
    name, _, version = text.partition(":")
    return name, version or None


async def run_steps(args: argparse.Namespace, progress: Progress) -> StepsResult:
    """Run the chosen steps of loop.yml in one fresh run directory."""
    from orchestrator.runner import build_campaign

    steps = parse_steps(args.steps)
    if args.loop is None:
        raise UsageError("--steps needs a loop.yml")
    cfg = load_config(args.loop, args.overrides)
    cli_data = [Path(p) for p in args.data]
    if steps[0] == "train":  # fail before anything starts
        find_data(cli_data, cfg, args.loop, None)
    wanted = parse_model(args.model)
    if "evaluate" in steps and "train" not in steps:
        wanted = wanted or _default_model(cfg)
        wanted = _check_registered(cfg, args.workdir, wanted)
    root = args.workdir or Path(cfg.workdir)
    store = RunStore.create(root, cfg.name, args.loop)
    c = build_campaign(cfg, store, args.loop, progress, root=root, tracking="train" in steps)
    result = StepsResult(steps, str(store.root))
    store.log(StepsStart(steps))
    try:
        with progress:
            await _run(c, steps, cli_data, args.loop, wanted, result)
    finally:
        await c.close()
        # Not resumable, and `status` reads it: a campaign that stopped, the reason being its steps.
        state = {"status": Status.STOPPED.value, "stop_reason": f"steps {','.join(steps)}", "steps": steps,
                 "config": flat_dict(cfg), "data_files": result.data_files, "data_points": result.data_points,
                 "model_file": result.model_file, "model_version": 1 if result.model_file else 0,
                 "sims_launched": c.state.sims_launched, "sims_failed": c.state.sims_failed,
                 "mlflow_run_id": c.state.mlflow_run_id}
        store.write_state(state)
        store.log(StepsEnd({k: v for k, v in result.__dict__.items() if k != "run_dir"}))
        store.close()
    atomic_write_json(store.root / "summary.json", result.__dict__)
    return result


async def _run(c: Campaign, steps: list[str], cli_data: list[Path], loop_file: Path,
               wanted: tuple[str, str | None] | None, result: StepsResult) -> None:
    generated: list[Path] | None = None
    model: bytes | None = None
    services = None
    if "train" in steps or "evaluate" in steps:  # Dask and MLflow start while the sims run
        services = asyncio.ensure_future(_start_services(c))
    try:
        if "generate" in steps:
            generated = await _generate(c, result)
        if services is not None:
            await services
    finally:
        if services is not None and not services.done():
            services.cancel()
            await asyncio.gather(services, return_exceptions=True)
    if "train" in steps:
        model = await _train(c, find_data(cli_data, c.cfg, loop_file, generated), result)
    if "evaluate" in steps:
        reg = result.registered_model
        if wanted is None and reg is not None:
            wanted = reg["name"], reg["version"]
        if wanted is None:
            assert model is not None
            await _evaluate(c, result, state=model)
        else:
            await _evaluate(c, result, registered=wanted)


async def _start_services(c: Campaign) -> None:
    """Dask (and MLflow, for a training to register) as a campaign starts them."""
    await c.services.start(flat_dict(c.cfg))
    await c.services.trainer_ready()
    if c.sink.ready is not None:
        await c.sink.ready


async def _generate(c: Campaign, result: StepsResult) -> list[Path]:
    rng = step_seed(c.cfg.seed, "generate")
    seeds = [int(rng.integers(2**31)) for _ in range(c.cfg.steps.generate_runs)]
    made = await asyncio.gather(*(c.generate(seed) for seed in seeds))
    kept = [(m.path, m.rows) for m in made if m.path is not None]
    if not kept:
        raise OrchestratorError("--steps generate: every generate sim failed; see the sims/ logs in "
                                f"{c.store.root}")
    for path, rows in kept:
        result.data_files.append(path)
        result.data_points += rows
        c.store.log(DataAccepted(path, rows, result.data_points))
    c.progress.note(f"generate: {result.data_points} rows in {len(kept)} file(s)")
    return [c.store.root / p for p, _ in kept]


async def _train(c: Campaign, files: list[Path], result: StepsResult) -> bytes:
    seed = int(step_seed(c.cfg.seed, "train").integers(2**31))
    rows = sum(int(np.load(f, mmap_mode="r").shape[0]) for f in files)
    c.store.log(TrainStart(1, len(files), rows, c.backend.describe().get("workers")))
    t0 = time.monotonic()
    model, metrics = await c.trainer.train(None, [str(f) for f in files], seed)
    path = c.store.save_model(1, model)
    result.model_file = str(path.relative_to(c.store.root))
    result.data_points = result.data_points or rows
    result.train_data = [str(f) for f in files]
    c.store.log(TrainEnd(1, extra={**metrics, "data_points": rows}))
    c.progress.note(f"train: {rows} rows from {len(files)} file(s), rmse {metrics.get('train_rmse', float('nan')):.4g}"
                    f", {time.monotonic() - t0:.1f} s")
    c.pictures.round(1, model, [str(f) for f in files], f"{c.cfg.name}: steps train, {rows} rows")
    await c.pictures.drain()
    c.sink.metrics({f"round_{k}": float(v) for k, v in metrics.items()}, 1)
    result.registered_model = await c.register_model(model)
    return bytes(model)


async def _evaluate(c: Campaign, result: StepsResult, state: bytes | None = None,
                    registered: tuple[str, str | None] | None = None) -> None:
    rng = step_seed(c.cfg.seed, "evaluate")
    xs = [c.draw_check_point(rng) for _ in range(c.cfg.steps.evaluate_checks)]
    truths_job = asyncio.gather(*(c.check_truth(x) for x in xs))
    if state is not None:
        preds_job: Any = c.trainer.evaluate(state, xs)
        which: dict[str, Any] = {"model_file": result.model_file}
    else:
        assert registered is not None
        name, version = registered
        preds_job = c.trainer.evaluate_registered(tracking_uri(c.cfg, c.store.root.parent), name, version, xs)
        which = {"name": name, "version": version or "latest"}
    truths, preds = await asyncio.gather(truths_job, preds_job)
    errors: list[float] = []
    rows: list[dict[str, Any]] = []
    for x, truth, pred in zip(xs, truths, preds, strict=True):
        if truth is None:
            continue
        err = max(abs(p - t) for p, t in zip(pred, truth, strict=True))
        errors.append(err)
        rows.append({"x": x, "truth": truth, "predicted": pred, "error": err})
        c.store.log(Check(x, 1, predicted=pred, truth=truth, error=err, success=err < c.cfg.target.tolerance))
    if not errors:
        raise OrchestratorError(f"--steps evaluate: every check sim failed; see the sims/ logs in {c.store.root}")
    tol = c.cfg.target.tolerance
    result.evaluation = {**which, "checks": len(errors), "max_error": max(errors),
                         "mean_error": sum(errors) / len(errors), "within_tolerance": sum(e < tol for e in errors),
                         "tolerance": tol, "points": rows}
    c.store.log(Evaluate({k: v for k, v in result.evaluation.items() if k != "points"}))


def _default_model(cfg: LoopConfig) -> tuple[str, str | None]:
    if not cfg.tracking.register_as:
        raise UsageError("--steps evaluate needs a model: --model NAME[:VERSION], or tracking.register_as in "
                         "loop.yml")
    return cfg.tracking.register_as, None


def tracking_uri(cfg: LoopConfig, root: Path) -> str:
    from orchestrator.tracking import default_tracking_uri

    return cfg.tracking.uri or default_tracking_uri(root)


def _check_registered(cfg: LoopConfig, workdir: Path | None, wanted: tuple[str, str | None]) -> tuple[str, str]:
    """The model with its version (given; else ``continual.champion_alias``'s; else the latest). A model that is
    not registered is a one-line error listing the registered ones."""
    from orchestrator.tracking import model_alias, registered_versions

    uri = tracking_uri(cfg, (workdir or Path(cfg.workdir)).resolve())
    name, version = wanted
    versions, names = registered_versions(uri, name)
    if not versions:
        listing = ", ".join(names) if names else "none"
        raise UsageError(f"--steps evaluate: no registered model {name!r} in {uri}; registered models: {listing}")
    if version is not None and version not in versions:
        raise UsageError(f"--steps evaluate: model {name!r} has no version {version} in {uri}; "
                         f"versions: {', '.join(versions)}")
    return name, version or model_alias(uri, name, cfg.continual.champion_alias) or versions[-1]


def main(args: argparse.Namespace) -> int:
    progress = Progress(enabled=False if args.no_live else None)
    r = asyncio.run(run_steps(args, progress))
    print(f"steps {','.join(r.steps)} done")
    if r.data_files:
        print(f"generate: {r.data_points} rows in {len(r.data_files)} file(s)")
    if r.model_file:
        print(f"train: model {r.model_file}" + (f", registered as {r.registered_model['name']} version "
                                                 f"{r.registered_model['version']}" if r.registered_model else ""))
    if r.evaluation:
        e = r.evaluation
        print(f"evaluate: max error {e['max_error']:.4g}, mean {e['mean_error']:.4g} over {e['checks']} checks, "
              f"{e['within_tolerance']} within tolerance {e['tolerance']}")
    print(f"run dir: {r.run_dir}")
    return 0
