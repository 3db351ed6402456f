"""Data-parallel training throughput: ``ddp`` over 2 Dask workers against 1 worker.

The training: an MLP of 3 x 256 tanh units on 40,000 rows of sin(x), 30 full-batch
Adam epochs, no L-BFGS: about 1.2 GFLOP per epoch, enough that the gradient work,
not the rendezvous or the all-reduce of 133k parameters, dominates on one worker.
rows/s = rows x epochs / wall time of the round as the coordinator sees it
(rendezvous, group set-up and result transfer included), workers warmed first.
``python benchmarks/bench_ddp.py [cpu|cuda] [OUT.json]`` prints (and writes) the
single-worker figures for one device; ``scripts/gpu-check.sh`` uses that.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.config import TrainingConfig
from orchestrator.training.backends import LocalBackend, Trainer

ROWS = 40_000
EPOCHS = 30
MODEL_KWARGS = {"hidden": 256, "layers": 3}


def _data(directory: Path) -> list[str]:
    rng = np.random.default_rng(0)
    x = rng.uniform(-np.pi, np.pi, size=ROWS)
    path = directory / "rows.npy"
    np.save(path, np.column_stack([x, np.sin(x)]))
    return [str(path)]


async def rows_per_s(workers: int, strategy: str, device: str, paths: list[str]) -> float:
    cfg = TrainingConfig(backend="local", workers=workers, strategy=strategy, device=device,  # type: ignore[arg-type]
                         model_kwargs=MODEL_KWARGS, hparams={"epochs": EPOCHS, "lbfgs_iters": 0})
    backend = LocalBackend(cfg)
    await backend.start()
    try:
        trainer = Trainer(backend, cfg, 1, 1)
        await trainer.warm_up()
        t0 = time.perf_counter()
        await trainer.train(None, paths, 0)
        return ROWS * EPOCHS / (time.perf_counter() - t0)
    finally:
        await backend.close()


def run(record: Callable[[str, float, str], None]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths = _data(Path(tmp))
        one = asyncio.run(rows_per_s(1, "single", "cpu", paths))
        two = asyncio.run(rows_per_s(2, "ddp", "cpu", paths))
    record("ddp_speedup_2_workers", two / one,
           f"rows/s ddp x2 {two:.0f} over 1 worker {one:.0f}; MLP 3x256 on {ROWS} rows, {EPOCHS} epochs, CPU gloo")


def main(argv: list[str]) -> int:
    device = argv[0] if argv else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        figure: dict[str, Any] = {"device": device, "rows": ROWS, "epochs": EPOCHS,
                                  "rows_per_s": asyncio.run(rows_per_s(1, "single", device, _data(Path(tmp))))}
    text = json.dumps(figure)
    print(text)
    if len(argv) > 1:
        Path(argv[1]).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    raise SystemExit(main(sys.argv[1:]))
