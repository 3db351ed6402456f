"""The published loop's shape, as a baseline: one thing at a time, no Dask, no overlap.

Same sims (through the same mpiexec), same model and hyper-parameters (the very
``train``/``evaluate`` functions the orchestrator submits to Dask, called
in-process), same config; only the scheduling differs: check, then (on a
failure) generate, then train, then check the same point again.

    python benchmarks/sequential_baseline.py LOOP.yml [--seed S]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.config import LoopConfig, load_config, render_args, resolve_binaries
from orchestrator.launchers.mpiexec import find_mpiexec
from orchestrator.training import tasks


def _sim(mpiexec: str, binary: Path, args: list[str], ranks: int, out: Path) -> np.ndarray:
    argv = [mpiexec, "-n", str(ranks), str(binary), *args, "--out", str(out)]
    subprocess.run(argv, check=True, capture_output=True, env={**os.environ, "SIMKIT_EXPECT_RANKS": str(ranks)})
    table: np.ndarray = np.load(out)
    return table


def run_baseline(cfg: LoopConfig, loop_file: Path, seed: int) -> dict[str, Any]:
    """Run the sequential loop to the target; time from loop start (imports done)."""
    binaries = resolve_binaries(cfg, loop_file)
    mpiexec = find_mpiexec()
    rng = np.random.default_rng(seed)
    lo = np.array([i.lo for i in cfg.inputs])
    hi = np.array([i.hi for i in cfg.inputs])
    hparams = {"num_threads": 1, **cfg.training.hparams}
    n_in = len(cfg.inputs)
    state: bytes | None = None
    files: list[str] = []
    successes = rounds = points = sims = 0
    x: list[float] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        while successes < cfg.target.successes and rounds < cfg.target.max_rounds:
            if x is None:
                x = [float(v) for v in rng.uniform(lo, hi)]
            values = {**{s.name: v for s, v in zip(cfg.inputs, x, strict=True)},
                      "seed": 0, "run_id": sims, "attempt": 0, "ranks": cfg.sims.check.ranks}
            pred = None if state is None else tasks.evaluate(state, cfg.training.model,
                                                              dict(cfg.training.model_kwargs), [x])[0]
            truth = _sim(mpiexec, binaries["check"], render_args(cfg.sims.check.args, values),
                         cfg.sims.check.ranks, work / f"c{sims}.npy")[0, n_in:]
            sims += 1
            if pred is not None and max(abs(p - t) for p, t in zip(pred, truth, strict=True)) < cfg.target.tolerance:
                successes += 1
                x = None
                continue
            gen_values: dict[str, float | int] = {"seed": int(rng.integers(2**31)), "run_id": sims, "attempt": 0,
                                                  "ranks": cfg.sims.generate.ranks}
            for s in cfg.inputs:
                gen_values[f"{s.name}_lo"], gen_values[f"{s.name}_hi"] = s.lo, s.hi
            if n_in == 1:
                gen_values["lo"], gen_values["hi"] = cfg.inputs[0].lo, cfg.inputs[0].hi
            out = work / f"g{sims}.npy"
            table = _sim(mpiexec, binaries["generate"], render_args(cfg.sims.generate.args, gen_values),
                         cfg.sims.generate.ranks, out)
            sims += 1
            points += table.shape[0]
            files.append(str(out))
            state, _ = tasks.train(state, files, cfg.training.model, dict(cfg.training.model_kwargs), hparams,
                                   n_in, int(rng.integers(2**31)))
            rounds += 1
        wall = time.perf_counter() - t0
    return {"time_to_target_s": wall, "target_at": time.time(), "rounds": rounds, "data_points": points,
            "sims": sims, "target_met": successes >= cfg.target.successes}


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
