"""``predict``: evaluate a registered surrogate at given inputs, as its own MLflow run.

::

    python -m orchestrator predict --model sine-surrogate --x 0.5 --x 1.0
    python -m orchestrator predict --model osc-surrogate/2 --x 2.5,0.1 --output y.npy
    python -m orchestrator predict --model osc-surrogate --input points.npy --workdir runs

The model is loaded from the MLflow registry (:func:`orchestrator.training.serving.load_registered_model`;
default tracking URI ``sqlite:///<workdir>/mlflow.db``, workdir ``./runs``). Each
``--x`` is one query point, its inputs separated by commas (``--x=-1,0.2`` when
the first is negative, or argparse takes it for a flag); ``--input`` is an
``.npy`` array of shape (points, n_inputs) (a 1-D array for a one-input model).
The predictions are printed as a table, or written to ``--output`` as an array of
shape (points, n_outputs). Every call is logged as a run of the ``predictions``
experiment: params model name and version, input source and point count, and
the artifact ``predictions.npy`` (inputs and outputs side by side).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from orchestrator.config import CHAMPION_ALIAS as CHAMPION
from orchestrator.errors import PredictError, UsageError
from orchestrator.training.serving import evaluate, n_inputs_of, spread_of

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

EXPERIMENT = "predictions"
Array = NDArray[np.float64]



@dataclass(frozen=True)
class ModelRef:
    """``NAME`` or ``NAME/VERSION``."""

    name: str
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        name, sep, version = text.strip().partition("/")
        if not name or (sep and not version.isdigit()):
            raise UsageError(f"--model: got {text!r}, expected NAME or NAME/VERSION, e.g. sine-surrogate/3")
        return cls(name, version or None)

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}/{self.version}"


@dataclass(frozen=True)
class Prediction:
    """Inputs, outputs and which model made them."""

    model: ModelRef
    """With the version resolved."""
    inputs: Array
    outputs: Array
    run_id: str | None = None
    names: tuple[list[str], list[str]] | None = None
    """The campaign's input and output names, as registered with the model."""
    spread: Array | None = None
    """The ensemble members' spread (standard deviation) per output; None for a single model."""


# -- inputs ---------------------------------------------------------------------------


def points_from_flags(values: Sequence[str]) -> Array:
    """``--x`` values (one point each, inputs comma-separated) as a (points, n) array."""
    rows: list[list[float]] = []
    for text in values:
        try:
            row = [float(v) for v in text.split(",")]
        except ValueError as exc:
            raise UsageError(f"--x {text!r}: expected numbers separated by commas, e.g. --x 2.5,0.1") from exc
        if rows and len(row) != len(rows[0]):
            first = values[0]
            raise UsageError(f"--x {text!r} has {len(row)} value(s), but --x {first!r} has {len(rows[0])}")
        rows.append(row)
    return _finite(np.asarray(rows, dtype=np.float64), "--x")


def points_from_file(path: Path) -> Array:
    """An ``.npy`` of shape (points, n) or (points,)."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise UsageError(f"--input: {path}: no such file") from exc
    except (OSError, ValueError) as exc:
        raise UsageError(f"--input: {path}: not a numeric .npy array ({exc})") from exc
    numeric = isinstance(array, np.ndarray) and np.issubdtype(array.dtype, np.number)
    if not numeric or np.iscomplexobj(array):
        raise UsageError(f"--input: {path}: expected a real numeric array")
    if array.ndim == 1:
        array = array.reshape(-1, 1)
    if array.ndim != 2 or array.shape[0] == 0:
        raise UsageError(f"--input: {path}: expected shape (points, n_inputs), got {array.shape}")
    return _finite(array.astype(np.float64), f"--input {path}")


def _finite(array: Array, where: str) -> Array:
    if not np.all(np.isfinite(array)):
        raise UsageError(f"{where}: inputs must be finite numbers (found NaN or Inf)")
    return array


def check_width(points: Array, n_inputs: int | None, ref: ModelRef) -> Array:
    """Refuse points of the wrong width; a 1-D column fits a one-input model."""
    if n_inputs is not None and points.shape[1] != n_inputs:
        raise UsageError(
            f"the points have {points.shape[1]} input(s) each but model {ref} expects n_inputs={n_inputs}"
            + (" (give each --x as comma-separated values)" if n_inputs > 1 else "")
        )
    return points


# -- the model ------------------------------------------------------------------------


def resolve_version(uri: str, ref: ModelRef, alias: str = CHAMPION) -> ModelRef:
    """``ref`` with its version checked; when none was given, the ``champion`` alias's, else the latest.

    An unknown name or version is a :class:`UsageError` that lists what exists.
    """
    from orchestrator.tracking import TrackingError, registered_versions

    try:
        versions, names = registered_versions(uri, ref.name)
    except TrackingError as exc:
        raise PredictError(str(exc)) from exc
    except Exception as exc:  # MlflowException from a search: one line for the user
        raise PredictError(f"cannot look up model {ref.name!r} in {uri}: {exc}") from exc
    if not versions:
        listing = ", ".join(names) if names else "(none)"
        raise UsageError(f"no registered model named {ref.name!r} in {uri}; registered models: {listing}")
    if ref.version is not None and ref.version not in versions:
        raise UsageError(f"model {ref.name!r} has no version {ref.version} in {uri}; "
                         f"versions: {', '.join(versions)}")
    return ModelRef(ref.name, ref.version or _champion(uri, ref.name, alias) or versions[-1])


def _champion(uri: str, name: str, alias: str) -> str | None:
    """The version continual mode keeps in service (its ``continual.champion_alias``), if the model has one."""
    from orchestrator.tracking import TrackingError, model_alias

    try:
        return model_alias(uri, name, alias)
    except TrackingError as exc:
        raise PredictError(str(exc)) from exc


def load(uri: str, ref: ModelRef) -> torch.nn.Module:
    from orchestrator.errors import TrackingError
    from orchestrator.training.serving import load_registered_model

    try:
        return load_registered_model(uri, ref.name, ref.version)
    except TrackingError as exc:
        raise PredictError(str(exc)) from exc


# -- tracking ---------------------------------------------------------------------------


def log_run(uri: str, experiment: str, pred: Prediction, source: str) -> str:
    """One MLflow run for this prediction: params and the predictions.npy artifact."""
    from orchestrator.tracking import Tracker, TrackingError

    tracker = Tracker(uri, experiment, f"predict-{pred.model.name}-v{pred.model.version}")
    model = {"name": pred.model.name, "version": pred.model.version, "uri": f"models:/{pred.model}"}
    params = {"model": model, "input": source, "points": pred.inputs.shape[0],
              "n_inputs": pred.inputs.shape[1], "n_outputs": pred.outputs.shape[1]}
    try:
        run_id = tracker.start(params)
        try:
            with tempfile.TemporaryDirectory(prefix="predict-") as tmp:
                table = Path(tmp) / "predictions.npy"
                np.save(table, np.hstack([pred.inputs, pred.outputs]), allow_pickle=False)
                tracker.log_artifact(table)
            tracker.log_metrics({"points": float(pred.inputs.shape[0])}, step=0)
        except TrackingError:
            tracker.finish("FAILED")
            raise
        tracker.finish("FINISHED")
    except TrackingError as exc:
        raise PredictError(f"predictions computed but not logged: {exc}") from exc
    return run_id


def predict(
    uri: str, ref: ModelRef, points: Array, *, experiment: str | None = EXPERIMENT, source: str = "--x",
    alias: str = CHAMPION,
) -> Prediction:
    """Load ``ref`` from the registry at ``uri`` (no version: ``alias``'s, else the latest), evaluate it at
    ``points``, log the run."""
    ref = resolve_version(uri, ref, alias)
    model = load(uri, ref)
    points = check_width(points, n_inputs_of(model), ref)
    try:
        outputs = evaluate(model, points)
        spread = spread_of(model, points)
    except RuntimeError as exc:  # a shape mismatch inside a model that declares no n_inputs
        raise PredictError(f"model {ref} failed on inputs of shape {points.shape}: {exc}") from exc
    from orchestrator.tracking import column_names

    pred = Prediction(ref, points, outputs, names=column_names(uri, ref.name, str(ref.version)), spread=spread)
    if experiment is None:
        return pred
    return dataclasses.replace(pred, run_id=log_run(uri, experiment, pred, source))


def format_table(pred: Prediction) -> str:
    """Inputs and outputs (an ensemble's mean, then its spread) as aligned columns."""
    n_in, n_out = pred.inputs.shape[1], pred.outputs.shape[1]
    names = pred.names
    if names is not None and (len(names[0]), len(names[1])) == (n_in, n_out):
        inputs, outputs = names
    else:
        inputs, outputs = [f"x{i}" for i in range(n_in)], [f"y{j}" for j in range(n_out)]
    header = [*inputs, *outputs]
    table = np.hstack([pred.inputs, pred.outputs])
    if pred.spread is not None:
        header += [f"{name}_spread" for name in outputs]
        table = np.hstack([table, pred.spread])
    rows = [[_num(v) for v in row] for row in table]
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _num(v: float) -> str:
    return f"{v:.6g}" if math.isfinite(v) else str(v)


# -- the command ------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """The ``predict`` subcommand's flags."""
    p = sub.add_parser("predict", help="evaluate a registered surrogate (logged as an MLflow run)")
    p.add_argument("--model", required=True, metavar="NAME[/VERSION]",
                   help="registered model (default version: the one under --alias, else the latest)")
    p.add_argument("--alias", default=CHAMPION, metavar="ALIAS",
                   help=f"without /VERSION, the version under this alias if the model has it: continual mode's "
                        f"continual.champion_alias (default {CHAMPION})")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", type=Path, metavar="FILE.npy", help="points, shape (points, n_inputs)")
    src.add_argument("--x", action="append", metavar="V[,V...]",
                     help="one query point, its inputs comma-separated (repeatable); "
                          "write --x=-1,0.2 when it starts with a minus")
    p.add_argument("--output", type=Path, metavar="FILE.npy",
                   help="write the outputs here instead of printing a table")
    p.add_argument("--tracking-uri", help="MLflow URI (default: sqlite:///WORKDIR/mlflow.db)")
    p.add_argument("--workdir", type=Path, help="run root whose mlflow.db holds the model (default ./runs)")
    p.add_argument("--experiment", default=EXPERIMENT,
                   help=f"experiment of the logged run (default {EXPERIMENT})")


def main(args: argparse.Namespace) -> int:
    """``python -m orchestrator predict``."""
    from orchestrator.tracking import default_tracking_uri, sqlite_path

    ref = ModelRef.parse(args.model)
    if args.output is not None and not args.output.parent.is_dir():
        raise UsageError(f"--output {args.output}: no directory {args.output.parent}; create it first")
    if args.tracking_uri and args.workdir:
        raise UsageError("give --tracking-uri or --workdir, not both")
    uri = args.tracking_uri or default_tracking_uri(args.workdir or Path("runs"))
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise UsageError(f"no MLflow database at {db}; point --workdir at the campaign's run root "
                         "or give --tracking-uri")
    points = points_from_file(args.input) if args.input is not None else points_from_flags(args.x)
    source = str(args.input) if args.input is not None else "--x"
    pred = predict(uri, ref, points, experiment=args.experiment, source=source, alias=args.alias)
    if args.output is not None:
        with args.output.open("wb") as f:  # np.save(path) would append .npy to another suffix
            np.save(f, pred.outputs, allow_pickle=False)
        print(f"wrote {pred.outputs.shape[0]} prediction(s) of {pred.model} to {args.output}")
    else:
        print(format_table(pred))
    print(f"model {pred.model.name} version {pred.model.version}; logged as MLflow run {pred.run_id} "
          f"(experiment {args.experiment!r})")
    return 0
