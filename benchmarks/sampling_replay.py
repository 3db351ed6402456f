"""The sampling question alone: a campaign's loop replayed in one process, no MPI, no Dask.

    python benchmarks/sampling_replay.py front --strategy ensemble --seed 1
    python benchmarks/sampling_replay.py peaks --strategy uniform --seed 2 --max-runs 40
    python benchmarks/sampling_replay.py peaks --strategy ensemble --set target.coverage=0.99

Uses the example's loop.yml and the project's own pieces: the first run's Latin hypercube,
the strategy (:mod:`orchestrator.sampling`, on a fresh candidate pool scored by the
ensemble after every training), the training task (``ensemble_size`` members, each warm
from its own state, :func:`orchestrator.training.tasks.train`), the certified plan
(:func:`orchestrator.policy.plan`: fresh uniform checks of one version, stop at the first
failure beyond the allowed ones, every check row joining the data as
``policy.train_on_checks`` says), and the truth (``examples/NAME/truth.py``) in place of
the sims. One generate run of ``points_per_run`` points per training round, one thing at
a time: what it counts is how many expensive runs a strategy needs to certify, free of
the pipeline's timing (which generates more runs while a slow training runs). ``--set
key.path=value`` overrides loop.yml as ``orchestrator run --set`` does (``--seed`` and
``--strategy`` win over a ``--set`` of theirs). Prints one
line per model version and, last, a JSON line: runs, certified, the final model's true
accuracy on a dense grid.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from orchestrator import accuracy, policy, sampling  # noqa: E402
from orchestrator.certify import Verdict, verdict  # noqa: E402
from orchestrator.config import LoopConfig, load_config  # noqa: E402
from orchestrator.training.ensemble import member_seed  # noqa: E402
from orchestrator.training.tasks import evaluate_ensemble, train  # noqa: E402


class Replay:
    """One campaign's data, members and counters."""

    def __init__(self, cfg: LoopConfig, truth: accuracy.Function, seed: int, work: Path) -> None:
        self.cfg, self.truth, self.seed, self.work = cfg, truth, seed, work
        self.lo = np.array([i.lo for i in cfg.inputs])
        self.hi = np.array([i.hi for i in cfg.inputs])
        self.files: list[str] = []
        self.x = np.empty((0, self.lo.size))
        self.y = np.empty((0, len(cfg.outputs)))
        self.failed = np.empty((0, self.lo.size))
        self.expensive = np.empty((0, self.lo.size))
        self.members: list[bytes | None] = [None] * cfg.policy.ensemble_size
        self.kw = dict(cfg.training.model_kwargs)
        self.hp = {"num_threads": 1, **cfg.training.hparams.model_dump(exclude_unset=True)}

    def add(self, name: str, pts: np.ndarray) -> np.ndarray:
        vals = np.asarray(self.truth(pts), dtype=np.float64).reshape(len(pts), -1)
        path = self.work / f"{name}.npy"
        np.save(path, np.hstack([pts, vals]))
        self.files.append(str(path))
        self.x, self.y = np.vstack([self.x, pts]), np.vstack([self.y, vals])
        if name.startswith("generate"):
            self.expensive = np.vstack([self.expensive, pts])
        return vals

    def predict(self, xs: np.ndarray) -> np.ndarray:
        states = [m for m in self.members if m is not None]
        return np.asarray(evaluate_ensemble(states, self.cfg.training.model, self.kw, xs.tolist())[0])

    def train(self, version: int) -> None:
        self.members = [train(m, self.files, self.cfg.training.model, self.kw, self.hp, self.lo.size,
                              member_seed(self.seed * 1000 + version, k))[0] for k, m in enumerate(self.members)]

    def certify(self, rng: np.random.Generator, version: int) -> tuple[int, bool]:
        """Fresh uniform checks of this version until the plan passes or fails; rows join the data."""
        plan = policy.plan(self.cfg.target)
        assert plan is not None, "the replay measures the certified rule: set target.coverage"
        passed = failed = 0
        while verdict(passed, failed, plan) is Verdict.OPEN:
            q = rng.uniform(self.lo, self.hi, size=(1, self.lo.size))
            t = np.asarray(self.truth(q)).reshape(1, -1)
            ok = bool(np.max(np.abs(self.predict(q) - t)) < self.cfg.target.tolerance)
            passed, failed = passed + ok, failed + (not ok)
            if not ok:
                self.failed = np.vstack([self.failed, q])
            if self.cfg.policy.train_on_checks:
                self.add(f"check-{version}-{passed + failed}", q)
        return passed, verdict(passed, failed, plan) is Verdict.CERTIFIED


def replay(problem: str, strategy: str, seed: int, max_runs: int,
           overrides: Sequence[str] = ()) -> dict[str, Any]:
    loop = ROOT / "examples" / problem / "loop.yml"
    cfg = load_config(loop, [*overrides, f"seed={seed}", f"policy.sampling={strategy}"])
    truth = accuracy.load_truth(loop.parent / "truth.py")
    choose = sampling.builtin(strategy, cfg.policy)
    rng, checks_rng = np.random.default_rng([seed, 14]), np.random.default_rng([seed, 99])
    t0 = time.monotonic()
    scores: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        r = Replay(cfg, truth, seed, Path(tmp))
        for run in range(1, max_runs + 1):
            c, m, s = scores if scores else (np.empty((0, r.lo.size)), None, None)
            req = sampling.SampleRequest(cfg.policy.points_per_run, r.lo, r.hi, c, m, s, r.x, r.y,
                                         np.empty((0, r.lo.size)), r.failed, rng, run - 1)
            pts = sampling.space_filling(req) if run == 1 else sampling.validate_points(choose(req), req, strategy)
            r.add(f"generate-{run}", pts)
            r.train(run)
            passed, certified = r.certify(checks_rng, run)
            acc = accuracy.measure(r.predict, truth, list(r.lo), list(r.hi), cfg.target.tolerance)
            print(f"  v{run}: {len(r.x)} rows, {passed} checks passed, certified {certified}; {acc.line()}",
                  flush=True)
            if certified:
                break
            c = rng.uniform(r.lo, r.hi, size=(cfg.policy.candidates, r.lo.size))
            mean, spread = evaluate_ensemble([b for b in r.members if b], cfg.training.model, r.kw, c.tolist())
            scores = (c, np.asarray(mean), np.asarray(spread))
    grid, _ = accuracy.grid(list(r.lo), list(r.hi), 10_000)
    values = np.asarray(truth(grid)).reshape(len(grid), -1)
    share = accuracy.share_varying(r.expensive, truth, list(r.lo), list(r.hi),
                                   list(values.max(axis=0) - values.min(axis=0)))
    return {"problem": problem, "strategy": strategy, "seed": seed, "runs": run, "certified": certified,
            "within": round(acc.within, 4), "within_varying": round(acc.within_varying or 0.0, 4),
            "rmse": round(acc.rmse, 4), "expensive_in_varying": None if share is None else round(share, 3),
            "s": round(time.monotonic() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("problem", help="an example with a truth.py: front, peaks")
    ap.add_argument("--strategy", default="ensemble")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-runs", type=int, default=40)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override a loop.yml value, e.g. --set target.coverage=0.99 (repeatable)")
    args = ap.parse_args()
    out = replay(args.problem, args.strategy, args.seed, args.max_runs, args.overrides)
    print(json.dumps({**out, "set": args.overrides}), flush=True)


if __name__ == "__main__":
    main()
