"""``compare``: what a sampling strategy saves, measured, never assumed.

::

    python -m orchestrator compare examples/front/loop.yml --strategies uniform,ensemble --seeds 1-5

Runs the campaign once per strategy and seed, one after the other (only
``policy.sampling`` and ``seed`` differ; everything else is loop.yml's), then prints a
table per seed and the medians: expensive (generate) sim runs, cheap check runs, data
rows, training rounds, wall time to the target and whether it was met; where the truth
is known (``--truth``, by default ``truth.py`` next to loop.yml), each final model's
true accuracy on a dense grid (:mod:`orchestrator.accuracy`: share within tolerance,
share where the function varies, RMSE). Writes a PNG of the same with, per strategy,
a map of where its expensive points went over the truth (for more than two inputs,
the two the truth varies most along), and logs it all to MLflow as one run of the
experiment ``<experiment>-compare``. Exit 0 when every campaign ended normally
(target met or stopped by a budget).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from orchestrator.config import BUILTIN_SAMPLING, LoopConfig, Sampling, load_config
from orchestrator.errors import OrchestratorError, UsageError

if TYPE_CHECKING:
    from orchestrator.accuracy import Function

log = logging.getLogger(__name__)

DEFAULT_ENSEMBLE = 4
"""Members for ``ensemble`` when loop.yml's ``policy.ensemble_size`` is 1."""
METRICS = ("generate_runs", "check_runs", "data_points", "rounds", "time_to_target_s", "within", "within_varying",
           "rmse", "expensive_in_varying")
LABELS = {"generate_runs": "expensive sim runs", "check_runs": "check runs", "data_points": "rows",
          "rounds": "training rounds", "time_to_target_s": "wall s to target", "within": "true: within tol",
          "within_varying": "true: within tol where it varies", "rmse": "true: RMSE",
          "expensive_in_varying": "expensive points where it varies"}
PLOTTED = ("generate_runs", "time_to_target_s", "within", "within_varying", "expensive_in_varying")
ACCURACY_POINTS = 40_000


@dataclass(frozen=True)
class Outcome:
    """One campaign of the comparison."""

    strategy: str
    seed: int
    status: str
    target_met: bool
    generate_runs: int
    """Generate sim runs started (attempts, retries included)."""
    data_points: int
    rounds: int
    time_to_target_s: float | None
    """From the campaign's first event to the check that met the target."""
    wall_s: float
    run_dir: str
    error: str | None = None
    check_runs: int = 0
    """Check sim runs started."""
    within: float | None = None
    """True accuracy of the final model on a dense grid (share within tolerance); None without a truth."""
    within_varying: float | None = None
    """The same where the function varies (:func:`orchestrator.accuracy.varying`)."""
    rmse: float | None = None
    expensive_in_varying: float | None = None
    """Share of the expensive (generate) points where the function varies: where the runs went."""

    @property
    def normal(self) -> bool:
        return self.error is None and self.status in ("target_met", "stopped")


def parse_seeds(text: str) -> list[int]:
    """``1-5`` or ``1,3,7`` (or both: ``1-3,9``)."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            seeds.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError as exc:
        raise UsageError(f"--seeds {text!r}: expected e.g. 1-5 or 1,3,7") from exc
    if not seeds:
        raise UsageError(f"--seeds {text!r}: no seeds")
    return seeds


def parse_strategies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    for name in names:
        if name not in BUILTIN_SAMPLING and ":" not in name:
            raise UsageError(f"--strategies: unknown strategy {name!r}; use {', '.join(BUILTIN_SAMPLING)} "
                             "or module:function")
    if not names:
        raise UsageError("--strategies: give at least one, e.g. uniform,ensemble")
    return names


def outcome_of(strategy: str, seed: int, run_dir: Path, status: str) -> Outcome:
    """Read one finished campaign's figures from its run directory."""
    from orchestrator.report import build_timeline
    from orchestrator.store import RunStore

    store = RunStore.open(run_dir)
    events = store.read_events()
    summary = json.loads((run_dir / "summary.json").read_text())
    runs = sum(1 for e in events if e["event"] == "sim_start" and e.get("role") == "generate")
    checks = sum(1 for e in events if e["event"] == "sim_start" and e.get("role") == "check")
    tl = build_timeline(events)
    return Outcome(strategy, seed, status, bool(summary["target_met"]), runs, int(summary["data_points"]),
                   int(summary["rounds"]), tl.target_at, float(summary["wall_s"]), str(run_dir), check_runs=checks)


def with_accuracy(o: Outcome, truth: Function) -> Outcome:
    """``o`` with its final model's true accuracy on a dense grid (torch is loaded here, after the campaigns)."""
    from orchestrator import accuracy

    if o.error is not None or not (Path(o.run_dir) / "models").is_dir():
        return o
    try:
        _, acc = accuracy.of_run(Path(o.run_dir), truth, points=ACCURACY_POINTS)
    except OrchestratorError as exc:  # no model at all: nothing to measure
        log.warning("compare: %s seed %s: no accuracy: %s", o.strategy, o.seed, exc)
        return o
    cfg = LoopConfig.model_validate(json.loads((Path(o.run_dir) / "state.json").read_text())["config"])
    lo, hi = [i.lo for i in cfg.inputs], [i.hi for i in cfg.inputs]
    xs, _ = accuracy.grid(lo, hi, 10_000)
    values = np.asarray(truth(xs), dtype=np.float64).reshape(xs.shape[0], -1)
    share = accuracy.share_varying(expensive_points(Path(o.run_dir), len(lo)), truth, lo, hi,
                                   list(values.max(axis=0) - values.min(axis=0)))
    return replace(o, within=acc.within, within_varying=acc.within_varying, rmse=acc.rmse,
                   expensive_in_varying=share)


def run_one(loop: Path, workdir: Path, strategy: str, seed: int, overrides: Sequence[str]) -> Outcome:
    """One campaign, to its end; a failure is an outcome, not an exception."""
    from orchestrator.runner import run_sync

    where = workdir / f"{strategy.replace(':', '.')}-seed{seed}"
    sets = [*overrides, f"seed={seed}", f"policy.sampling={strategy}", "tracking.enabled=false"]
    if strategy == Sampling.ENSEMBLE and load_config(loop, overrides).policy.ensemble_size < 2:
        sets.append(f"policy.ensemble_size={DEFAULT_ENSEMBLE}")  # loop.yml trains one model: ensemble needs more
    try:
        result = run_sync(loop, workdir=where, overrides=sets, new=True)
    except OrchestratorError as exc:
        log.warning("compare: %s seed %s failed: %s", strategy, seed, exc)
        return Outcome(strategy, seed, "failed", False, 0, 0, 0, None, 0.0, str(where), str(exc))
    return outcome_of(strategy, seed, Path(result.summary["run_dir"]), result.status.value)


def medians(outcomes: Sequence[Outcome], strategy: str) -> dict[str, float | None]:
    """Median of each figure over a strategy's seeds (time to target over the seeds that met it)."""
    mine = [o for o in outcomes if o.strategy == strategy]
    out: dict[str, float | None] = {}
    for m in METRICS:
        values = [getattr(o, m) for o in mine if getattr(o, m) is not None]
        out[m] = statistics.median(values) if values else None
    out["target_met"] = float(sum(o.target_met for o in mine))
    return out


def _cell(v: float | int | None, metric: str = "") -> str:
    if v is None:
        return "-"
    if metric in ("within", "within_varying", "expensive_in_varying"):
        return f"{v:.1%}"
    if metric == "rmse":
        return f"{v:.4f}"
    return f"{v:.1f}" if isinstance(v, float) and not float(v).is_integer() else f"{v:g}"


RATIOS = ("generate_runs", "check_runs", "data_points", "rounds", "time_to_target_s")
"""Figures whose ratio to the first strategy's means a saving."""


def format_table(outcomes: Sequence[Outcome], strategies: Sequence[str]) -> str:
    """A markdown table per seed, then the medians and, for two or more strategies, ratios to the first."""
    shown = [m for m in METRICS if m in RATIOS or any(getattr(o, m) is not None for o in outcomes)]
    head = "| seed | strategy | " + " | ".join(LABELS[m] for m in shown) + " | target met |"
    lines = [head, "|" + "---:|" * (len(shown) + 3)]
    for o in sorted(outcomes, key=lambda o: (o.seed, strategies.index(o.strategy))):
        cells = [_cell(getattr(o, m), m) for m in shown]
        met = "yes" if o.target_met else ("error" if o.error else "no")
        lines.append(f"| {o.seed} | {o.strategy} | " + " | ".join(cells) + f" | {met} |")
    n = len({o.seed for o in outcomes})
    for s in strategies:
        med = medians(outcomes, s)
        cells = [_cell(med[m], m) for m in shown]
        lines.append(f"| median | {s} | " + " | ".join(cells) + f" | {_cell(med['target_met'])}/{n} |")
    base = medians(outcomes, strategies[0])
    for s in strategies[1:]:
        med = medians(outcomes, s)
        ratios = [_ratio(med[m], base[m]) if m in RATIOS else "" for m in shown]
        lines.append(f"| ratio | {s}/{strategies[0]} | " + " | ".join(ratios) + " | |")
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def expensive_points(run_dir: Path, n_inputs: int) -> np.ndarray:
    """The inputs of every generate row a campaign accepted (check rows left out)."""
    from orchestrator.runlog import data_role

    files = sorted(p for p in (run_dir / "data").glob("*.npy") if data_role(p.name) == "generate")
    rows = [np.load(p, allow_pickle=False)[:, :n_inputs] for p in files]
    return np.concatenate(rows) if rows else np.empty((0, n_inputs))


def most_varying(truth: Function | None, lo: np.ndarray, hi: np.ndarray) -> tuple[int, int]:
    """The two inputs the truth varies most along (mean |slope| in domain-scaled units); (0, 1) without a truth."""
    if truth is None or lo.size <= 2:
        return 0, 1
    rng = np.random.default_rng(0)
    x = rng.uniform(lo, hi, size=(2000, lo.size))
    step = 1e-4 * (hi - lo)
    base = np.asarray(truth(x), dtype=np.float64).reshape(len(x), -1)
    slopes = [np.abs(np.asarray(truth(x + np.eye(lo.size)[i] * step[i])).reshape(base.shape) - base).mean() / 1e-4
              for i in range(lo.size)]
    first, second = np.argsort(slopes)[::-1][:2]
    return int(first), int(second)


def plot(outcomes: Sequence[Outcome], strategies: Sequence[str], out: Path, cfg: LoopConfig | None = None,
         truth: Function | None = None) -> Path:
    """Top row: a bar per strategy (the median) and a dot per seed for the main figures; bottom row (two or
    more inputs): per strategy, its first seed's expensive points over the truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [m for m in PLOTTED if any(getattr(o, m) is not None for o in outcomes)]
    maps = cfg is not None and len(cfg.inputs) >= 2
    cols = max(len(panels), len(strategies) if maps else 0)
    fig, axes = plt.subplots(2 if maps else 1, cols, figsize=(3.6 * cols, 7.4 if maps else 3.4), squeeze=False)
    for ax, m in zip(axes[0], panels, strict=False):
        _bars(ax, outcomes, strategies, m)
    for ax in axes[0][len(panels):]:
        ax.axis("off")
    if maps:
        assert cfg is not None
        for k, ax in enumerate(axes[1]):
            if k < len(strategies):
                _map(ax, outcomes, strategies[k], cfg, truth)
            else:
                ax.axis("off")
    seeds = sorted({o.seed for o in outcomes})
    fig.suptitle(f"sampling strategies, seeds {seeds[0]}..{seeds[-1]} (bars: median, dots: seeds)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _bars(ax: Any, outcomes: Sequence[Outcome], strategies: Sequence[str], m: str) -> None:
    for i, s in enumerate(strategies):
        values = [getattr(o, m) for o in outcomes if o.strategy == s and getattr(o, m) is not None]
        med = medians(outcomes, s)[m]
        ax.bar(i, med or 0, color=f"C{i}", alpha=0.6)
        ax.plot([i] * len(values), values, "k.", markersize=6)
    ax.set_xticks(range(len(strategies)), strategies, rotation=20)
    ax.set_title(LABELS[m], fontsize=10)
    if m in ("within", "within_varying"):
        ax.set_ylim(min(0.5, *(getattr(o, m) or 1.0 for o in outcomes)), 1.0)


def _map(ax: Any, outcomes: Sequence[Outcome], strategy: str, cfg: LoopConfig, truth: Function | None) -> None:
    """One strategy's expensive points (its first seed) over the truth, in the two most varying inputs."""
    lo = np.array([i.lo for i in cfg.inputs])
    hi = np.array([i.hi for i in cfg.inputs])
    a, b = most_varying(truth, lo, hi)
    if truth is not None:
        ga, gb = np.meshgrid(np.linspace(lo[a], hi[a], 150), np.linspace(lo[b], hi[b], 150))
        grid = np.tile((lo + hi) / 2, (ga.size, 1))
        grid[:, a], grid[:, b] = ga.ravel(), gb.ravel()
        u = np.asarray(truth(grid), dtype=np.float64).reshape(ga.size, -1)[:, 0]
        ax.pcolormesh(ga, gb, u.reshape(ga.shape), cmap="coolwarm", shading="auto")
    mine = sorted((o for o in outcomes if o.strategy == strategy and o.error is None), key=lambda o: o.seed)
    if mine:
        pts = expensive_points(Path(mine[0].run_dir), len(cfg.inputs))
        ax.scatter(pts[:, a], pts[:, b], s=4, c="k")
        ax.set_title(f"{strategy}, seed {mine[0].seed}: {len(pts)} expensive points", fontsize=9)
    ax.set_xlim(lo[a], hi[a])
    ax.set_ylim(lo[b], hi[b])
    ax.set_xlabel(cfg.input_names[a])
    ax.set_ylabel(cfg.input_names[b])


def track(uri: str, experiment: str, outcomes: Sequence[Outcome], strategies: Sequence[str], params: dict[str, Any],
          files: Sequence[Path]) -> str:
    """One MLflow run: every campaign's figures (step = seed), the medians, the table and the PNG."""
    from orchestrator.tracking import Tracker

    tracker = Tracker(uri, experiment, f"compare-{'-vs-'.join(s.replace(':', '.') for s in strategies)}")
    run_id = tracker.start(params)
    try:
        for o in outcomes:
            key = o.strategy.replace(":", ".")
            figures = {f"{key}_{m}": float(v) for m in METRICS if (v := getattr(o, m)) is not None}
            tracker.log_metrics({**figures, f"{key}_target_met": float(o.target_met)}, step=o.seed)
        for s in strategies:
            med = medians(outcomes, s)
            tracker.log_metrics({f"median_{s.replace(':', '.')}_{m}": float(v) for m, v in med.items()
                                 if v is not None}, step=0)
        for f in files:
            tracker.log_artifact(f)
    except Exception:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    return run_id


def add_parser(sub: Any) -> None:
    """The ``compare`` subcommand's flags."""
    p = sub.add_parser("compare", help="run a campaign per sampling strategy and seed; table, PNG, MLflow")
    p.add_argument("loop", type=Path)
    p.add_argument("--strategies", default="uniform,ensemble", help="comma-separated (default uniform,ensemble)")
    p.add_argument("--seeds", default="1-5", help="e.g. 1-5 or 1,3,7 (default 1-5)")
    p.add_argument("--workdir", type=Path, help="where the campaigns' run dirs go (default: loop.yml's "
                                                "workdir/compare-NAME)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a loop.yml value in every campaign (repeatable)")
    p.add_argument("--png", type=Path, help="where the PNG goes (default WORKDIR/compare.png)")
    p.add_argument("--no-track", action="store_true", help="do not log the comparison to MLflow")
    p.add_argument("--from-json", action="store_true", help="run no campaign: re-make the table, PNG and MLflow "
                                                             "run from WORKDIR/compare.json (e.g. with a --truth)")
    p.add_argument("--truth", help="the known answer, FILE.py (function `truth`) or FILE.py:FUNCTION, to measure "
                                   "each final model on a dense grid (default: truth.py next to loop.yml, if any)")


def load_outcomes(path: Path, strategies: Sequence[str]) -> list[Outcome]:
    """A finished comparison's campaigns (``compare.json``), those of ``strategies``."""
    if not path.is_file():
        raise UsageError(f"--from-json: no {path} (give the --workdir of a finished compare)")
    fields = set(Outcome.__dataclass_fields__)
    rows = [Outcome(**{k: v for k, v in row.items() if k in fields}) for row in json.loads(path.read_text())]
    kept = [o for o in rows if o.strategy in strategies]
    if not kept:
        raise UsageError(f"--from-json: {path} has no campaign of {', '.join(strategies)} "
                         f"(it has {', '.join(sorted({o.strategy for o in rows})) or 'none'})")
    return kept


def find_truth(loop: Path, given: str | None) -> Function | None:
    """``--truth``, else ``truth.py`` next to loop.yml, else None (no true accuracy)."""
    from orchestrator.accuracy import load_truth

    if given:
        return load_truth(given)
    beside = loop.resolve().parent / "truth.py"
    return load_truth(beside) if beside.is_file() else None


def main(args: argparse.Namespace) -> int:
    """``python -m orchestrator compare``."""
    cfg = load_config(args.loop, args.overrides)
    strategies, seeds = parse_strategies(args.strategies), parse_seeds(args.seeds)
    truth = find_truth(args.loop, args.truth)
    workdir = (args.workdir or Path(cfg.workdir) / f"compare-{cfg.name}").resolve()
    outcomes: list[Outcome] = []
    if args.from_json:
        outcomes = load_outcomes(workdir / "compare.json", strategies)
    for seed in [] if args.from_json else seeds:
        for strategy in strategies:
            print(f"compare: {cfg.name} seed {seed}, sampling {strategy} ...", flush=True)
            outcomes.append(run_one(args.loop, workdir, strategy, seed, args.overrides))
            o = outcomes[-1]
            print(f"  {o.status}: {o.generate_runs} expensive runs, {o.check_runs} checks, {o.data_points} rows, "
                  f"{o.rounds} rounds, {_cell(o.time_to_target_s)} s to target"
                  + (f" ({o.error})" if o.error else ""), flush=True)
    if truth is not None:
        outcomes = [with_accuracy(o, truth) for o in outcomes]
    table = format_table(outcomes, strategies)
    print(table)
    png = plot(outcomes, strategies, args.png or workdir / "compare.png", cfg, truth)
    data = workdir / "compare.json"
    data.write_text(json.dumps([asdict(o) for o in outcomes], indent=2) + "\n")
    (workdir / "compare.md").write_text(table + "\n")
    print(f"wrote {png}, {data}")
    if not args.no_track:
        from orchestrator.tracking import default_tracking_uri

        uri = cfg.tracking.uri or default_tracking_uri(workdir)
        params = {"loop": str(args.loop), "strategies": strategies, "seeds": seeds, "overrides": args.overrides}
        run_id = track(uri, f"{cfg.tracking.experiment}-compare", outcomes, strategies, params,
                       [png, data, workdir / "compare.md"])
        print(f"logged as MLflow run {run_id} in {uri}")
    bad = [o for o in outcomes if not o.normal]
    for o in bad:
        print(f"error: {o.strategy} seed {o.seed} did not end normally: {o.error or o.status}")
    return 0 if not bad else 1
