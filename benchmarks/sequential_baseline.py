"""The published loop's shape, as a baseline: one thing at a time, no Dask, no overlap.

Same sims (through the same mpiexec), same model and hyper-parameters (the very
``train``/``evaluate`` functions the orchestrator submits to Dask, called
in-process), same config; only the scheduling differs: check, then (on a
failure) generate, then train, then check the same point again.

    python benchmarks/sequential_baseline.py LOOP.yml [--seed S]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator import policy
from orchestrator.config import LoopConfig, load_config, render_args, resolve_binaries
from orchestrator.launchers.mpiexec import find_mpiexec
from orchestrator.mpi import merged_env, mpi_for
from orchestrator.rundeck import write_points
from orchestrator.training import tasks
from orchestrator.training.ensemble import member_seed


@functools.cache
def _sim_env(binary: Path, ranks: int) -> dict[str, str]:
    """The node-local MPI settings the orchestrator's mpiexec launcher gives this sim (found once)."""
    return {**merged_env(os.environ, mpi_for(binary), ranks), "SIMKIT_EXPECT_RANKS": str(ranks)}


def _sim(mpiexec: str, binary: Path, args: list[str], ranks: int, out: Path) -> np.ndarray:
    argv = [mpiexec, "-n", str(ranks), str(binary), *args, "--out", str(out)]
    subprocess.run(argv, check=True, capture_output=True, env=_sim_env(binary, ranks))
    table: np.ndarray = np.load(out)
    return table


def _predict(states: list[bytes], cfg: LoopConfig, x: list[float]) -> list[float]:
    """The ensemble mean (one member: its prediction), as the campaign checks it."""
    kw = dict(cfg.training.model_kwargs)
    preds = np.array([tasks.evaluate(s, cfg.training.model, kw, [x])[0] for s in states])
    return [float(v) for v in preds.mean(axis=0)]


def _generate_values(cfg: LoopConfig, rng: np.random.Generator, sims: int, work: Path) -> dict[str, Any]:
    values: dict[str, Any] = {"seed": int(rng.integers(2**31)), "run_id": sims, "attempt": 0,
                              "ranks": cfg.sims.generate.ranks}
    for s in cfg.inputs:
        values[f"{s.name}_lo"], values[f"{s.name}_hi"] = s.lo, s.hi
    if len(cfg.inputs) == 1:
        values["lo"], values["hi"] = cfg.inputs[0].lo, cfg.inputs[0].hi
    if cfg.chosen_points:  # the same sim told its points: uniform ones, as uniform sampling chooses
        lo = np.array([i.lo for i in cfg.inputs])
        hi = np.array([i.hi for i in cfg.inputs])
        pts = rng.uniform(lo, hi, size=(cfg.points_per_generate, lo.size))
        values["points_file"] = str(write_points(work / f"p{sims}.txt", pts))
    return values


def run_baseline(cfg: LoopConfig, loop_file: Path, seed: int) -> dict[str, Any]:
    """Run the sequential loop to the target; time from loop start (imports done).

    With ``target.per_version`` a model version passes only when ``checks_per_round``
    fresh points, checked one after the other, are all within tolerance; with the
    certified rule (``target.coverage``/``confidence``) when the plan's checks of one
    version pass (at most its allowed failures), a failing version going back to
    training at once, every check row joining the data as the campaign's do
    (``policy.train_on_checks``)."""
    binaries = resolve_binaries(cfg, loop_file)
    mpiexec = find_mpiexec()
    rng = np.random.default_rng(seed)
    lo = np.array([i.lo for i in cfg.inputs])
    hi = np.array([i.hi for i in cfg.inputs])
    hparams = {"num_threads": 1, **cfg.training.hparams.model_dump(exclude_unset=True)}
    n_in = len(cfg.inputs)
    members: list[bytes | None] = [None] * cfg.policy.ensemble_size
    files: list[str] = []
    plan = policy.plan(cfg.target)
    needed = cfg.target.successes if plan is None else plan.passes_needed
    successes = failed = rounds = points = sims = 0
    x: list[float] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        while successes < needed and rounds < cfg.target.max_rounds:
            if x is None:
                x = [float(v) for v in rng.uniform(lo, hi)]
            values = {**{s.name: v for s, v in zip(cfg.inputs, x, strict=True)},
                      "seed": 0, "run_id": sims, "attempt": 0, "ranks": cfg.sims.check.ranks}
            ready = [m for m in members if m is not None]
            pred = _predict(ready, cfg, x) if ready else None
            row = _sim(mpiexec, binaries["check"], render_args(cfg.sims.check.args, values),
                       cfg.sims.check.ranks, work / f"c{sims}.npy")
            truth = row[0, n_in:]
            sims += 1
            if plan is not None and pred is not None and cfg.policy.train_on_checks:
                files.append(str(work / f"c{sims - 1}.npy"))  # a check's truth is data
            if pred is not None and max(abs(p - t) for p, t in zip(pred, truth, strict=True)) < cfg.target.tolerance:
                successes += 1
                x = None
                continue
            if plan is not None:
                failed += pred is not None
                if pred is not None and failed <= plan.allowed_failures:
                    x = None
                    continue
                successes, failed, x = 0, 0, None  # a rejected version: fresh points for the next
            elif cfg.target.per_version:
                successes, x = 0, None  # the strict test: fresh points for the next model
            out = work / f"g{sims}.npy"
            gen_values = _generate_values(cfg, rng, sims, work)
            table = _sim(mpiexec, binaries["generate"], render_args(cfg.sims.generate.args, gen_values),
                         cfg.sims.generate.ranks, out)
            sims += 1
            points += table.shape[0]
            files.append(str(out))
            round_seed = int(rng.integers(2**31))
            members = [tasks.train(m, files, cfg.training.model, dict(cfg.training.model_kwargs), hparams, n_in,
                                   member_seed(round_seed, k))[0] for k, m in enumerate(members)]
            rounds += 1
        wall = time.perf_counter() - t0
    return {"time_to_target_s": wall, "target_at": time.time(), "rounds": rounds, "data_points": points,
            "sims": sims, "target_met": successes >= needed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("loop", type=Path)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(args.loop, args.overrides)
    print(json.dumps(run_baseline(cfg, args.loop, cfg.seed if args.seed is None else args.seed)))


if __name__ == "__main__":
    main()
