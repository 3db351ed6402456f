"""GPU workers on the test cluster's GRES-declared nodes (placeholder GPUs: scheduled, never computing).

A driver inside ``salloc --gres=gpu:1`` starts the allocation backend from a
loop.yml that asks for one GPU per worker, and checks from Slurm and from inside
the step that the worker step carried the request and got its own GPU on each node.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import fast_loop, pids_of, write_loop
from tests.slurm_cluster import has_gres
from tests.test_slurm import in_allocation, listed_steps

pytestmark = [pytest.mark.slurm, pytest.mark.integration]


def gpu_env() -> dict[str, str | None]:
    """Run on each worker: the node and the GPUs Slurm gave its task."""
    return {k: os.environ.get(k) for k in ("SLURMD_NODENAME", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES")}


async def _gpu_workers(work: Path) -> dict[str, Any]:
    """Driver (inside salloc): GPU workers from loop.yml, one tiny training, then a request Slurm refuses."""
    from orchestrator.allocation import Allocation
    from orchestrator.config import load_config
    from orchestrator.errors import TrainingError
    from orchestrator.training.backends import Trainer
    from orchestrator.training.slurm import AllocationBackend

    cfg = load_config(work / "loop.yml").training
    alloc = Allocation.detect()
    x = np.linspace(-3, 3, 64)
    np.save(work / "d.npy", np.column_stack([x, np.sin(x)]))
    backend = AllocationBackend(cfg, allocation=alloc, nodes=list(alloc.nodes), run_dir=work / "sine-gpu")
    try:
        client: Any = await backend.start()
        info = backend.describe()
        step = subprocess.run(["scontrol", "show", "step", info["step_id"]], capture_output=True, text=True,
                              timeout=30, check=True).stdout
        seen = await client.run(gpu_env)
        workers = (await client.scheduler.identity(n_workers=-1))["workers"]
        _, metrics = await Trainer(backend, cfg, 1, 1).train(None, [str(work / "d.npy")], 0)
    finally:
        await backend.close()
    assert alloc.job_id is not None
    report = {"step": step, "seen": sorted(seen.values(), key=str), "info": info, "rows": metrics["n_samples"],
              "resources": [w["resources"] for w in workers.values()], "steps": listed_steps(alloc.job_id),
              "left": pids_of(str(work / "sine-gpu"))}
    greedy = AllocationBackend(cfg.model_copy(update={"gpus_per_worker": 3}), allocation=alloc,
                               nodes=list(alloc.nodes), run_dir=work / "sine-greedy")
    try:
        await greedy.start()
    except TrainingError as exc:
        report["refused"] = str(exc)
    finally:
        await greedy.close()
    return report


def gpu_driver() -> None:
    work = Path(os.environ["ORCH_WORK"])
    (work / "report.json").write_text(json.dumps(asyncio.run(_gpu_workers(work))))


def test_gpu_worker_step_runs_on_gres_nodes(slurm_env: dict[str, str], tmp_path: Path) -> None:
    if not has_gres():
        pytest.skip("the running test cluster predates GRES: scripts/slurm-test-cluster.sh stop, then start")
    work = tmp_path / "work"
    work.mkdir()
    write_loop(work, fast_loop(**{"training.backend": "allocation", "training.workers": 2,
                                  "training.gpus_per_worker": 1, "training.hparams": {"epochs": 2}}))
    proc, probed = in_allocation(
        slurm_env, tmp_path / "probe", [sys.executable, "-c", "from tests.test_gres import gpu_driver as d; d()"],
        salloc=["salloc", "-N", "2", "--ntasks-per-node=1", "--gres=gpu:1", "-t", "5"],
        extra_env={"ORCH_WORK": str(work)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((work / "report.json").read_text())
    # Slurm scheduled the worker step with one GPU per task, on two GRES nodes, each task seeing its own GPU
    assert "TresPerTask=cpu:1,gres:gpu:1" in report["step"] and "TresBind=gpu:per_task:1" in report["step"]
    assert len(report["info"]["nodes"]) == 2, report["info"]
    assert [(s["SLURM_STEP_GPUS"], s["CUDA_VISIBLE_DEVICES"]) for s in report["seen"]] == [("0", "0")] * 2
    assert sorted(s["SLURMD_NODENAME"] for s in report["seen"]) == sorted(report["info"]["nodes"])
    # workers advertise the GPU, the training task needed it and ran (on the CPU: the GPUs are placeholders)
    assert report["resources"] == [{"train": 1, "GPU": 1}] * 2 and report["rows"] == 64
    assert report["steps"] == [] and report["left"] == [] and probed["stepds"] == []
    # more GPUs than the nodes declare: Slurm refuses the step, start() says so at once
    assert "Invalid generic resource" in report["refused"], report["refused"]
