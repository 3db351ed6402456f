"""What choosing the simulations saves, at equal certified accuracy, on two hard examples.

Every campaign runs to the certified target of its loop.yml (front: 95% of the domain within
tolerance at 95% confidence, 59 fresh checks of one model version, none failing; peaks: 99%,
299 checks, not pipelined), with
``target.max_rounds`` raised to ``MAX_ROUNDS`` so a slow arm is measured, not cut off.
Each certified model is then measured against the exact answer on a dense grid
(:mod:`orchestrator.accuracy`), and that figure is recorded beside the saving.

Figures (every baseline measured in this same run):
  expensive_sims_ratio        examples/front: generate sim runs to the certified target,
                              ensemble / uniform, medians over SEEDS (goal <= 0.5)
  expensive_sims_ratio_peaks  the same on examples/peaks (narrow peaks; goal <= 0.5)
  certified_accurate_front    examples/front: of the certified models (both arms), the share within tolerance
                              on >= 95% of a dense truth grid (goal: at least 4 of 5 in each arm; the bench
                              fails when an arm falls short, after recording)
  time_to_target_ratio_hard   examples/front, uniform: the pipelined campaign / the sequential
                              loop (benchmarks/sequential_baseline.py: same sims, model, ensemble
                              and certified rule, one thing at a time), both timed from the
                              command's launch to the check that met the target (goal <= 0.5)

Campaigns run as a user runs them (``python -m orchestrator run``), one after the other,
MLflow off so they stay independent. ``BENCH_SAMPLING_SEEDS=1-2`` (default 1-5) and
``BENCH_SAMPLING_PROBLEMS=front`` (default front,peaks) make it smaller while developing;
``BENCH_SAMPLING_BASELINE_SEEDS=1`` times the sequential loop on fewer seeds (default: all of them).
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
from typing import Any

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"
ARMS = ("uniform", "ensemble")
MAX_ROUNDS = 40
Record = Callable[[str, float, str], None]


def seeds() -> list[int]:
    from orchestrator.compare import parse_seeds

    return parse_seeds(os.environ.get("BENCH_SAMPLING_SEEDS", "1-5"))


def baseline_seeds() -> list[int]:
    from orchestrator.compare import parse_seeds

    given = os.environ.get("BENCH_SAMPLING_BASELINE_SEEDS")
    return seeds() if not given else parse_seeds(given)


def campaign(problem: str, work: Path, strategy: str, seed: int) -> dict[str, Any]:
    """One campaign to its end: expensive runs, time from launch to target, the final model's true accuracy."""
    from orchestrator import accuracy
    from orchestrator.compare import outcome_of

    loop = EXAMPLES / problem / "loop.yml"
    argv = [sys.executable, "-m", "orchestrator", "run", str(loop), "--workdir", str(work), "--no-live", "--new",
            "--set", f"seed={seed}", "--set", f"policy.sampling={strategy}", "--set", "tracking.enabled=false",
            "--set", f"target.max_rounds={MAX_ROUNDS}"]
    launched = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=7200,
                          env={**os.environ, "DASK_LOGGING__DISTRIBUTED": "error"})
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"{problem} {strategy} seed {seed}: exit {proc.returncode}: {proc.stderr[-1500:]}")
    run_dir = next(work.glob(f"{problem}-*"))
    o = outcome_of(strategy, seed, run_dir, "done")
    t0 = json.loads((run_dir / "events.jsonl").read_text().splitlines()[0])["t"]
    _, acc = accuracy.of_run(run_dir, accuracy.load_truth(EXAMPLES / problem / "truth.py"))
    return {"certified": o.target_met, "runs": o.generate_runs, "checks": o.check_runs, "rounds": o.rounds,
            "to_target": None if o.time_to_target_s is None else round(t0 + o.time_to_target_s - launched, 1),
            "within": round(acc.within, 4), "within_varying": round(acc.within_varying or 0.0, 4),
            "rmse": round(acc.rmse, 4)}


def baseline(seed: int) -> float | None:
    """The sequential loop on examples/front (uniform points, the same certified rule): seconds to target."""
    launched = time.time()
    out = subprocess.run([sys.executable, str(HERE / "sequential_baseline.py"), str(EXAMPLES / "front/loop.yml"),
                          "--seed", str(seed), "--set", "policy.sampling=uniform", "--set",
                          f"target.max_rounds={MAX_ROUNDS}"], capture_output=True, text=True, check=True,
                         timeout=7200)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return float(result["target_at"] - launched) if result["target_met"] else None


def _median(values: list[float | None], penalty: float) -> float:
    """Median, a campaign that missed the target counted as ``penalty`` (worse than any other)."""
    return float(statistics.median([penalty if v is None else v for v in values]))


def target_words(problem: str) -> str:
    """The certified target of the example's loop.yml, e.g. ``99%/95%`` (coverage/confidence)."""
    from orchestrator.config import load_config

    target = load_config(EXAMPLES / problem / "loop.yml").target
    return f"{target.coverage:.0%}/{target.confidence:.0%}"


def ratio(results: dict[str, list[dict[str, Any]]], target: str) -> tuple[float, str]:
    """Expensive runs to the certified target, best arm over uniform (medians; a miss counts as MAX_ROUNDS runs
    and more), and the note: every campaign's runs and true accuracy."""
    runs = {a: [r["runs"] if r["certified"] else None for r in rs] for a, rs in results.items()}
    miss = 10 * MAX_ROUNDS
    u, e = _median(runs["uniform"], miss), _median(runs["ensemble"], miss)
    acc = {a: [(r["within"], r["within_varying"]) for r in rs] for a, rs in results.items()}
    wall = {a: [r["to_target"] for r in rs] for a, rs in results.items()}
    note = (f"generate runs to the certified {target} target, ensemble {runs['ensemble']} / uniform "
            f"{runs['uniform']} (None: not certified in {MAX_ROUNDS} rounds); seconds from launch to the certified "
            f"target, ensemble {wall['ensemble']} / uniform {wall['uniform']}; true accuracy of each final model "
            f"(share within tolerance on a 200x200 grid, and where the function varies): ensemble {acc['ensemble']}, "
            f"uniform {acc['uniform']}; seeds {seeds()} (goal <= 0.5)")
    return e / u, note


ACCURATE = 0.95
"""A certified model counts as accurate when it is within tolerance on this share of the dense truth grid."""


def certified_accurate(results: dict[str, list[dict[str, Any]]]) -> tuple[float, str, list[str]]:
    """Of the certified models, the share truly within tolerance on >= ACCURATE of the grid; the note; and the
    arms that fall short of the goal (fewer than 4 of 5 of their certified models accurate)."""
    per_arm = {a: [r["within"] for r in rs if r["certified"]] for a, rs in results.items()}
    good = {a: sum(w >= ACCURATE for w in ws) for a, ws in per_arm.items()}
    short = [a for a, ws in per_arm.items() if not ws or good[a] < 0.8 * len(ws)]
    n = sum(len(ws) for ws in per_arm.values())
    note = "; ".join(f"{a}: {good[a]} of {len(ws)} certified within tolerance on >= {ACCURATE:.0%} of the grid "
                     f"{ws}" for a, ws in per_arm.items())
    return (sum(good.values()) / n if n else 0.0), f"{note}; seeds {seeds()} (goal: >= 4 of 5 per arm)", short


def run(record: Record) -> None:
    problems = os.environ.get("BENCH_SAMPLING_PROBLEMS", "front,peaks").split(",")
    base: list[float | None] = []
    missed: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for problem in problems:
            results: dict[str, list[dict[str, Any]]] = {a: [] for a in ARMS}
            for seed in seeds():
                for arm in ARMS:
                    results[arm].append(campaign(problem, Path(tmp) / f"{problem}-{arm}{seed}", arm, seed))
                    print(f"   {problem} {arm} seed {seed}: {results[arm][-1]}", flush=True)
                if problem == "front" and seed in baseline_seeds():
                    base.append(baseline(seed))
                    print(f"   front sequential seed {seed}: {base[-1]}", flush=True)
            value, note = ratio(results, target_words(problem))
            record("expensive_sims_ratio" + ("" if problem == "front" else f"_{problem}"), value, note)
            if problem == "front":
                timed = zip(seeds(), results["uniform"], strict=True)
                piped = [r["to_target"] for s, r in timed if s in baseline_seeds()]
                record("time_to_target_ratio_hard", _median(piped, 10**6) / _median(base, 10**6),
                       f"examples/front, uniform, certified {target_words('front')}: pipelined {piped} s / sequential "
                       f"{[None if v is None else round(v, 1) for v in base]} s, seeds {baseline_seeds()} "
                       "(goal <= 0.5)")
                share, note, short = certified_accurate(results)
                record("certified_accurate_front", share, note)
                if short:
                    missed.append(f"examples/front: fewer than 4 of 5 certified models truly accurate in "
                                  f"{', '.join(short)} ({note})")
    if missed:
        raise AssertionError("; ".join(missed))
