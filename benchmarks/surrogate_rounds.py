"""Benchmark: training rounds the sin(x) surrogate needs to reach 5 successes.

Simulates the reference campaign without MPI or Dask: each round "generates"
256 rows (8 ranks x 32 points, x ~ U[-pi, pi], y = sin x) into a ``.npy`` file,
warm-start retrains on all files so far via
:func:`orchestrator.training.tasks.train`, then checks one random query x:
success if ``|surrogate(x) - sin(x)| < 0.05``. The campaign stops after 5
successes. Prints a markdown table per seed plus the median.

Usage::

    python benchmarks/surrogate_rounds.py [--seeds 1 2 3 4 5] [--hparams '{"epochs": 300}']
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from orchestrator.training.tasks import evaluate, train  # noqa: E402

logger = logging.getLogger(__name__)

MODEL = "models.mlp:MLP"
ROWS_PER_ROUND = 8 * 32
TOLERANCE = 0.05
SUCCESSES_NEEDED = 5
MAX_ROUNDS = 30


@dataclass
class CampaignResult:
    """Outcome of one simulated campaign."""

    seed: int
    rounds: int
    checks: int
    successes: int
    seconds: float
    max_train_seconds: float


def generate_round(rng: np.random.Generator, path: Path) -> None:
    """Write one round of (x, sin x) rows to ``path``."""
    x = rng.uniform(-np.pi, np.pi, size=ROWS_PER_ROUND)
    np.save(path, np.column_stack([x, np.sin(x)]))


def run_campaign(
    seed: int, hparams: dict[str, Any], workdir: Path, checks_per_round: int = 1
) -> CampaignResult:
    """Run generate -> train -> check rounds until 5 successes (or MAX_ROUNDS)."""
    rng = np.random.default_rng(seed)
    state: bytes | None = None
    paths: list[str] = []
    successes = checks = rounds = 0
    max_train = 0.0
    started = time.perf_counter()
    while successes < SUCCESSES_NEEDED and rounds < MAX_ROUNDS:
        rounds += 1
        path = workdir / f"seed{seed}_round{rounds}.npy"
        generate_round(rng, path)
        paths.append(str(path))
        state, metrics = train(state, paths, MODEL, {}, hparams, n_inputs=1, seed=seed)
        max_train = max(max_train, metrics["train_seconds"])
        queries = rng.uniform(-np.pi, np.pi, size=checks_per_round)
        preds = evaluate(state, MODEL, {}, [[float(q)] for q in queries])
        for query, pred in zip(queries, preds, strict=True):
            checks += 1
            if abs(pred[0] - np.sin(query)) < TOLERANCE:
                successes += 1
                if successes >= SUCCESSES_NEEDED:
                    break
        logger.info(
            "seed %d round %d: rmse=%.2e successes=%d", seed, rounds, metrics["train_rmse"], successes
        )
    return CampaignResult(seed, rounds, checks, successes, time.perf_counter() - started, max_train)


def format_table(results: list[CampaignResult]) -> str:
    """Markdown table of results plus the median row."""
    lines = [
        "| seed | training rounds to 5 successes | total checks | seconds | max train s/round |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rounds = str(r.rounds) if r.successes >= SUCCESSES_NEEDED else f">{r.rounds} (not reached)"
        lines.append(f"| {r.seed} | {rounds} | {r.checks} | {r.seconds:.2f} | {r.max_train_seconds:.2f} |")
    lines.append(
        f"| **median** | {statistics.median(r.rounds for r in results):g} | "
        f"{statistics.median(r.checks for r in results):g} | "
        f"{statistics.median(r.seconds for r in results):.2f} | "
        f"{statistics.median(r.max_train_seconds for r in results):.2f} |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run one campaign per seed and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--hparams", type=json.loads, default={}, help="JSON overrides of DEFAULT_HPARAMS")
    parser.add_argument("--checks-per-round", type=int, default=1)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="surrogate_rounds_") as tmp:
        results = [run_campaign(s, args.hparams, Path(tmp), args.checks_per_round) for s in args.seeds]
    print(format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
