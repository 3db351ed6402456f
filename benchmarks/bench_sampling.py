"""What choosing the simulations saves, on the hard example (examples/front), median of 5 seeds.

Figures (every baseline measured in this same run):
  expensive_sims_ratio        generate sim runs to the target, ensemble / uniform (goal <= 0.5)
  uniform_rounds_hard         training rounds uniform sampling needs (goal >= 6: the example is hard)
  time_to_target_ratio_hard   pipelined campaign (uniform) / the sequential baseline
                              (benchmarks/sequential_baseline.py: same sims, model, ensemble and
                              strict check, one thing at a time), both timed from the command's
                              launch to the check that met the target (goal <= 0.4)

Campaigns run as a user runs them (``python -m orchestrator run``), one after the other,
MLflow off so they stay independent.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOOP = HERE.parent / "examples" / "front" / "loop.yml"
SEEDS = [1, 2, 3, 4, 5]
Record = Callable[[str, float, str], None]


def campaign(work: Path, strategy: str, seed: int) -> tuple[dict[str, float | None], float]:
    """One campaign; its figures and its launch time."""
    from orchestrator.compare import outcome_of

    argv = [sys.executable, "-m", "orchestrator", "run", str(LOOP), "--workdir", str(work), "--no-live", "--new",
            "--set", f"seed={seed}", "--set", f"policy.sampling={strategy}", "--set", "tracking.enabled=false"]
    launched = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "DASK_LOGGING__DISTRIBUTED": "error"})
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"{strategy} seed {seed}: exit {proc.returncode}: {proc.stderr[-1500:]}")
    run_dir = next(work.glob("front-*"))
    o = outcome_of(strategy, seed, run_dir, "done")
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    t0 = events[0]["t"]
    reached = None if o.time_to_target_s is None else t0 + o.time_to_target_s - launched
    return {"runs": o.generate_runs if o.target_met else None, "rounds": o.rounds if o.target_met else None,
            "to_target": reached}, launched


def baseline(seed: int) -> float | None:
    launched = time.time()
    out = subprocess.run([sys.executable, str(HERE / "sequential_baseline.py"), str(LOOP), "--seed", str(seed),
                          "--set", "policy.sampling=uniform"], capture_output=True, text=True, check=True, timeout=3600)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return float(result["target_at"] - launched) if result["target_met"] else None


def _median(values: list[float | None], penalty: float) -> float:
    """Median, a campaign that missed the target counted as ``penalty`` (worse than any other)."""
    return float(statistics.median([penalty if v is None else v for v in values]))


def run(record: Record) -> None:
    figures: dict[str, list[dict[str, float | None]]] = {"uniform": [], "ensemble": []}
    base: list[float | None] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in SEEDS:
            for strategy in figures:
                result, _ = campaign(Path(tmp) / f"{strategy}{seed}", strategy, seed)
                figures[strategy].append(result)
                print(f"   {strategy} seed {seed}: {result}", flush=True)
            base.append(baseline(seed))
            print(f"   sequential seed {seed}: {base[-1]}", flush=True)
    runs = {s: [r["runs"] for r in rs] for s, rs in figures.items()}
    rounds = [r["rounds"] for r in figures["uniform"]]
    pipelined = [r["to_target"] for r in figures["uniform"]]
    miss = 10**6
    u, e = _median(runs["uniform"], miss), _median(runs["ensemble"], miss)
    record("expensive_sims_ratio", e / u,
           f"generate runs to target, ensemble {runs['ensemble']} / uniform {runs['uniform']} "
           f"(seeds {SEEDS}; None: target missed) (goal <= 0.5)")
    record("uniform_rounds_hard", _median(rounds, miss), f"uniform training rounds per seed {rounds} (goal >= 6)")
    p, b = _median(pipelined, miss), _median(base, miss)
    record("time_to_target_ratio_hard", p / b,
           f"pipelined uniform {[None if v is None else round(v, 1) for v in pipelined]} s / sequential "
           f"{[None if v is None else round(v, 1) for v in base]} s (goal <= 0.4)")
