"""Data-parallel training throughput: ``ddp`` over 2 Dask workers against 1 worker.

The training: an MLP of 3 x 256 tanh units (133k parameters) on 40,000 rows of
sin(x), 8 full-batch Adam epochs, no L-BFGS: about 0.8 MFLOP per row and pass
(forward and backward), 32 GFLOP per epoch, so the gradient work, not the
rendezvous or the per-epoch all-reduce of 0.5 MB, dominates (one worker takes
about 7 s per training on an idle box). Both trainings run on one LocalCluster
of 2 workers, one thread each, warmed first: the baseline is ``strategy: single``
(one worker trains, the other idles) against ``strategy: ddp`` over both, same
data, same run, alternated ``REPEATS`` times; each figure is its best round, and
the note gives the load average (on a shared box, a speedup under load is not a
speedup).
rows/s = rows x epochs / wall time of the round as the coordinator sees it
(rendezvous, group set-up and result transfer included).
``python benchmarks/bench_ddp.py [cpu|cuda] [OUT.json]`` prints (and writes) the
single-worker figures for one device; ``scripts/gpu-check.sh`` uses that.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from orchestrator.config import TrainingConfig
from orchestrator.training.backends import LocalBackend, Trainer

ROWS = 40_000
EPOCHS = 8
REPEATS = 2
MODEL_KWARGS = {"hidden": 256, "layers": 3}


def _data(directory: Path) -> list[str]:
    rng = np.random.default_rng(0)
    x = rng.uniform(-np.pi, np.pi, size=ROWS)
    path = directory / "rows.npy"
    np.save(path, np.column_stack([x, np.sin(x)]))
    return [str(path)]


def _cfg(workers: int, strategy: Literal["single", "ddp"], device: str) -> TrainingConfig:
    return TrainingConfig.model_validate({"backend": "local", "workers": workers, "strategy": strategy,
                                          "device": device, "model_kwargs": MODEL_KWARGS,
                                          "hparams": {"epochs": EPOCHS, "lbfgs_iters": 0}})


async def _timed(trainer: Trainer, paths: list[str]) -> float:
    t0 = time.perf_counter()
    await trainer.train(None, paths, 0)
    return ROWS * EPOCHS / (time.perf_counter() - t0)


async def rows_per_s(workers: int, device: str, paths: list[str], repeats: int = 1) -> tuple[float, float | None]:
    """Best rows/s of one worker training alone, and of ddp over ``workers`` (None for 1), on one cluster."""
    ddp = _cfg(workers, "ddp", device)
    backend = LocalBackend(ddp)
    await backend.start()
    try:
        single = Trainer(backend, _cfg(workers, "single", device), 1, 1)
        parallel = Trainer(backend, ddp, 1, 1)
        await single.warm_up()  # every worker imports torch and builds the model once
        one: list[float] = []
        many: list[float] = []
        for _ in range(repeats):
            one.append(await _timed(single, paths))
            if workers > 1:
                many.append(await _timed(parallel, paths))
        return max(one), (max(many) if many else None)
    finally:
        await backend.close()


def run(record: Callable[[str, float, str], None]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        one, two = asyncio.run(rows_per_s(2, "cpu", _data(Path(tmp)), REPEATS))
    assert two is not None
    load = os.getloadavg()[0]
    record("ddp_speedup_2_workers", two / one,
           f"best rows/s of {REPEATS} alternated: ddp x2 {two:.0f} over 1 worker {one:.0f} (same cluster, same run); "
           f"MLP 3x256 on {ROWS} rows, {EPOCHS} full-batch epochs, CPU gloo, 1 thread per worker; "
           f"load avg {load:.1f} on {os.cpu_count()} CPUs")


def main(argv: list[str]) -> int:
    device = argv[0] if argv else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        figure: dict[str, Any] = {"device": device, "rows": ROWS, "epochs": EPOCHS,
                                  "rows_per_s": asyncio.run(rows_per_s(1, device, _data(Path(tmp))))[0]}
    text = json.dumps(figure)
    print(text)
    if len(argv) > 1:
        Path(argv[1]).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    raise SystemExit(main(sys.argv[1:]))
