"""Imported first by the local workers' forkserver (:mod:`orchestrator.training.forks`), never by the
coordinator: the environment Dask's nanny would have set for a spawned worker, before torch is imported."""

from __future__ import annotations

import os

WORKER_ENV = {"MALLOC_TRIM_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "OPENBLAS_NUM_THREADS": "1"}
"""Dask's default ``distributed.nanny.pre-spawn-environ`` (training sets its own thread count,
``training.hparams.num_threads``); a variable already set wins."""

for _name, _value in WORKER_ENV.items():
    os.environ.setdefault(_name, _value)
