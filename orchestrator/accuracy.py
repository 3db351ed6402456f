"""``accuracy``: a surrogate measured against the known truth on a dense grid.

::

    python -m orchestrator accuracy runs/front-20261207-021500 --truth examples/front/truth.py

For examples whose answer is known in closed form (``examples/*/truth.py``: a numpy
function ``truth(x) -> y``, ``x`` of shape (n, n_inputs), ``y`` of shape
(n, n_outputs), the same function the C sims compute), the run's final checkpoint
(every ensemble member, their mean) is evaluated on a regular grid over the domain
(``--points`` in all, 40,000 by default) and compared with the truth:

- ``within``: the share of the grid where every output is within ``target.tolerance``
  (the campaign's own tolerance; a check's success, everywhere);
- ``within_varying``: the same share over the region where the function varies, the
  grid points where some output is steeper than a straight ramp across the domain
  (``|grad u|`` in domain-scaled units at least the output's range over the grid);
  for a front this is the band around it, where a model is most easily wrong;
- ``rmse`` and ``max_error`` over the whole grid.

The measuring is pure numpy (:func:`measure`); only :func:`final_checkpoint` reads files
and the CLI evaluates the model with :mod:`orchestrator.training.tasks` (torch).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from orchestrator.errors import UsageError

Array = NDArray[np.float64]
Function = Callable[[Array], Array]
DEFAULT_POINTS = 40_000
"""Grid points in all (200 x 200 for two inputs)."""
_CHECKPOINT = re.compile(r"model-(\d{4,})(?:-m(\d+))?\.pt$")


@dataclass(frozen=True)
class Accuracy:
    """A model against the truth on a grid."""

    points: int
    """Grid points in all."""
    tolerance: float
    within: float
    """Share of the grid where every output is within ``tolerance`` of the truth."""
    varying_points: int
    """Grid points where the function varies (steeper than a ramp across the domain)."""
    within_varying: float | None
    """Share of those within tolerance; None when the function is flat everywhere."""
    rmse: float
    max_error: float

    def line(self) -> str:
        varying = "-" if self.within_varying is None else f"{self.within_varying:.1%}"
        return (f"within {self.tolerance:g}: {self.within:.1%} of the domain, {varying} where it varies "
                f"({self.varying_points} of {self.points} grid points); RMSE {self.rmse:.4f}, "
                f"max error {self.max_error:.4f}")


def grid(lo: Sequence[float], hi: Sequence[float], points: int = DEFAULT_POINTS) -> tuple[Array, tuple[int, ...]]:
    """A regular grid over the box, about ``points`` in all: (rows, n_inputs) and its shape per axis."""
    d = len(lo)
    per_axis = max(3, round(points ** (1.0 / d)))
    axes = [np.linspace(a, b, per_axis) for a, b in zip(lo, hi, strict=True)]
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1), (per_axis,) * d


def varying(truth: Array, shape: tuple[int, ...]) -> NDArray[np.bool_]:
    """Grid points where some output is steeper than a straight ramp across the domain.

    ``truth`` is (rows, n_outputs) on a :func:`grid` of ``shape``; slopes are taken in
    domain-scaled units (each input's range is 1), so the ramp's slope is the output's range.
    """
    steep = np.zeros(truth.shape[0], dtype=bool)
    for j in range(truth.shape[1]):
        u = truth[:, j].reshape(shape)
        spread = float(u.max() - u.min())
        if spread == 0.0:
            continue
        grads = np.gradient(u, *[1.0 / (n - 1) for n in shape])
        grads = grads if isinstance(grads, list | tuple) else [grads]
        slope = np.sqrt(sum(g**2 for g in grads))
        steep |= (slope >= spread).ravel()
    return steep


def measure(predict: Function, truth: Function, lo: Sequence[float], hi: Sequence[float], tolerance: float,
            points: int = DEFAULT_POINTS) -> Accuracy:
    """``predict`` against ``truth`` on a grid of about ``points`` over ``lo..hi``."""
    xs, shape = grid(lo, hi, points)
    want = np.asarray(truth(xs), dtype=np.float64).reshape(xs.shape[0], -1)
    got = np.asarray(predict(xs), dtype=np.float64).reshape(want.shape)
    err = np.abs(got - want).max(axis=1)
    ok = err < tolerance
    steep = varying(want, shape)
    n_steep = int(steep.sum())
    return Accuracy(
        points=xs.shape[0], tolerance=tolerance, within=float(ok.mean()), varying_points=n_steep,
        within_varying=float(ok[steep].mean()) if n_steep else None,
        rmse=float(np.sqrt(np.mean((got - want) ** 2))), max_error=float(err.max()),
    )


def share_varying(points: Array, truth: Function, lo: Sequence[float], hi: Sequence[float],
                  spread: Sequence[float]) -> float | None:
    """The share of ``points`` where the truth varies: some output steeper than a straight ramp
    across the domain (slopes by central differences, in domain-scaled units; ``spread`` is each
    output's range over the domain). None for no points."""
    if points.shape[0] == 0:
        return None
    span = np.asarray(hi, dtype=np.float64) - np.asarray(lo, dtype=np.float64)
    h = 1e-4
    sq = np.zeros((points.shape[0], len(spread)))
    for i in range(points.shape[1]):
        step = np.zeros(points.shape[1])
        step[i] = h * span[i]
        up = np.asarray(truth(points + step), dtype=np.float64).reshape(sq.shape)
        down = np.asarray(truth(points - step), dtype=np.float64).reshape(sq.shape)
        sq += ((up - down) / (2 * h)) ** 2
    ranges = np.asarray(spread, dtype=np.float64)
    steep = (np.sqrt(sq) >= ranges) & (ranges > 0)
    return float(steep.any(axis=1).mean())


def load_truth(spec: str | Path) -> Function:
    """``path/to/truth.py`` (its function ``truth``) or ``path/to/truth.py:name``."""
    text = str(spec)
    path_text, _, name = text.rpartition(":") if ".py:" in text else (text, "", "truth")
    path = Path(path_text)
    if not path.is_file():
        raise UsageError(f"--truth {text!r}: no such file {path}")
    module_spec = importlib.util.spec_from_file_location(f"_truth_{path.parent.name}", path)
    assert module_spec and module_spec.loader
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # a user's file: one line
        raise UsageError(f"--truth {text!r}: importing {path} raised {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"--truth {text!r}: {path} has no function {name!r}")
    found: Function = fn
    return found


def final_checkpoint(run_dir: Path, version: int | None = None) -> tuple[int, list[Path]]:
    """The last (or the given) model version in ``run_dir/models``: its member checkpoints, member 0 first."""
    found: dict[int, dict[int, Path]] = {}
    for p in (run_dir / "models").glob("model-*.pt"):
        if m := _CHECKPOINT.match(p.name):
            found.setdefault(int(m[1]), {})[int(m[2] or 0)] = p
    if not found:
        raise UsageError(f"{run_dir}: no model checkpoints in {run_dir / 'models'} (did a training finish?)")
    v = max(found) if version is None else version
    if v not in found:
        raise UsageError(f"--version {v}: {run_dir} has model versions {sorted(found)}")
    return v, [found[v][k] for k in sorted(found[v])]


def checkpoint_predictor(paths: Sequence[Path], model: str, model_kwargs: dict[str, Any]) -> Function:
    """The members' mean prediction (torch, loaded here: this is a command, not the coordinator)."""
    from orchestrator.training.tasks import evaluate_ensemble

    states = [p.read_bytes() for p in paths]

    def predict(xs: Array) -> Array:
        mean, _ = evaluate_ensemble(states, model, model_kwargs, xs.tolist())
        return np.asarray(mean, dtype=np.float64)

    return predict


def of_run(run_dir: Path, truth: Function, version: int | None = None, points: int = DEFAULT_POINTS
           ) -> tuple[int, Accuracy]:
    """A run directory's final (or given) model version, measured against ``truth``."""
    from orchestrator.config import LoopConfig
    from orchestrator.store import RunStore

    store = RunStore.open(run_dir)
    cfg = LoopConfig.model_validate(store.read_state()["config"])
    v, paths = final_checkpoint(store.root, version)
    predict = checkpoint_predictor(paths, cfg.training.model, dict(cfg.training.model_kwargs))
    lo, hi = [i.lo for i in cfg.inputs], [i.hi for i in cfg.inputs]
    return v, measure(predict, truth, lo, hi, cfg.target.tolerance, points)


def add_parser(sub: Any) -> None:
    """The ``accuracy`` subcommand's flags."""
    p = sub.add_parser("accuracy", help="a run's final model against the known truth on a dense grid")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--truth", required=True, help="truth.py (function `truth(x)`) or FILE.py:FUNCTION, "
                                                  "e.g. examples/front/truth.py")
    p.add_argument("--version", type=int, help="model version (default: the last)")
    p.add_argument("--points", type=int, default=DEFAULT_POINTS, help=f"grid points (default {DEFAULT_POINTS})")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


def main(args: argparse.Namespace) -> int:
    """``python -m orchestrator accuracy``."""
    if args.points < 2:
        raise UsageError(f"--points {args.points}: give at least 2")
    truth = load_truth(args.truth)
    version, acc = of_run(args.run_dir, truth, args.version, args.points)
    if args.json:
        print(json.dumps({"run_dir": str(args.run_dir), "version": version, **asdict(acc)}))
    else:
        print(f"model v{version} of {args.run_dir}: {acc.line()}")
    return 0
