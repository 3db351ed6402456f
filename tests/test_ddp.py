"""Data-parallel training over real Dask workers (gloo on CPU), devices and resources.

Tolerance: ddp sums each rank's row-weighted loss and gradient, so it takes the
same optimizer steps as one process on all rows up to float rounding; L-BFGS
amplifies rounding a little, so the validation RMSE of the two models must agree
within 25% (relative) or 2e-3 (absolute), and both must fit sin(x) to 0.02.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchestrator.config import TrainingConfig
from orchestrator.errors import ResourceError
from orchestrator.runlog import EventKind
from orchestrator.store import read_events
from orchestrator.training import tasks
from orchestrator.training.backends import LocalBackend, Trainer, check_local_device
from tests.conftest import REPO, fast_loop, write_loop

MODEL = "models.mlp:MLP"
HP: dict[str, Any] = {"epochs": 100, "lbfgs_iters": 100}


def _data(tmp_path: Path, n: int = 400, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-np.pi, np.pi, size=n)
    path = tmp_path / "d.npy"
    np.save(path, np.column_stack([x, np.sin(x)]))
    return [str(path)]


def _val_rmse(state: bytes) -> float:
    grid = np.linspace(-np.pi, np.pi, 201)
    pred = np.asarray(tasks.evaluate(state, MODEL, {}, [[v] for v in grid]))[:, 0]
    return float(np.sqrt(np.mean((pred - np.sin(grid)) ** 2)))


async def _ddp_round(cfg: TrainingConfig, paths: list[str]) -> tuple[bytes, dict[str, float]]:
    backend = LocalBackend(cfg)
    await backend.start()
    try:
        trainer = Trainer(backend, cfg, 1, 1)
        await trainer.warm_up()
        return await trainer.train(None, paths, 7)
    finally:
        await backend.close()


def test_ddp_over_two_cpu_workers_matches_single_worker(tmp_path: Path) -> None:
    paths = _data(tmp_path)
    single, _ = tasks.train(None, paths, MODEL, {}, {**HP}, 1, 7)
    cfg = TrainingConfig(backend="local", workers=2, strategy="ddp", device="cpu", hparams=HP)
    state, metrics = asyncio.run(_ddp_round(cfg, paths))
    assert metrics["ddp_world_size"] == 2 and metrics["ddp_attempts"] == 1
    r_single, r_ddp = _val_rmse(single), _val_rmse(state)
    assert r_single < 0.02 and r_ddp < 0.02
    assert abs(r_ddp - r_single) <= max(0.25 * r_single, 2e-3), (r_single, r_ddp)


def _pids_with_env(key: str, value: str) -> list[int]:
    """Live processes whose environment has key=value (every descendant of a coordinator started with it)."""
    want = f"{key}={value}".encode()
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and want in (d / "environ").read_bytes().split(b"\0"):
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
                found += [int(d.name)] if state not in ("Z", "X") else []
        except (OSError, IndexError):
            continue
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""  # ended since it was listed


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float = 180) -> Path:
    """The first file matching pattern under path, as soon as it appears (fails if the campaign ends first)."""
    deadline = time.monotonic() + timeout
    while not (found := sorted(path.glob(pattern))):
        assert proc.poll() is None, f"the campaign ended ({proc.returncode}) before a ddp rank was held"
        assert time.monotonic() < deadline, f"no {pattern} under {path} after {timeout:g} s"
        time.sleep(0.02)
    return found[0]


@pytest.mark.integration
def test_worker_killed_in_a_ddp_round_retries_it_and_the_campaign_meets_its_target(tmp_path: Path) -> None:
    """A whole campaign, ddp over 2 local workers; rank 1's worker is SIGKILLed inside the first round."""
    hold = tmp_path / "hold"
    hold.mkdir()
    cfg = fast_loop(**{"training.backend": "local", "training.workers": 2, "training.strategy": "ddp",
                       "training.device": "cpu", "training.model": "tests.ddp_models:HeldMLP"})
    loop = write_loop(tmp_path, cfg)
    work = tmp_path / "runs"
    env = {**os.environ, "ORCH_TEST_HOLD_DIR": str(hold), "PYTHONPATH": str(REPO)}
    log = tmp_path / "coordinator.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", str(loop), "--workdir", str(work),
                                 "--no-live"], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        held = _wait_for(hold, "held-*", proc)
        (hold / "released").touch()
        os.kill(int(held.read_text()), signal.SIGKILL)  # a Dask worker, inside its ddp round
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-3000:]
    run_dir = next(work.glob("sine-*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["target_met"] is True and summary["successes"] >= 5
    attempts = [e["ddp_attempts"] for e in read_events(run_dir) if e.kind is EventKind.TRAIN_END]
    assert attempts[0] == 2 and all(a == 1 for a in attempts[1:]), attempts  # the first round, retried once
    assert sorted(hold.glob("held-*")) == [held]  # the retried round's rank 1 trained on
    # nothing of the campaign outlived it but its guardian (procs.guardian) and multiprocessing's
    # resource tracker (it ends once the last process holding its pipe is gone), which end by themselves
    ending = (b"ORCHESTRATOR_GUARD", b"multiprocessing.resource_tracker")
    others = [c[:200] for p in _pids_with_env("ORCH_TEST_HOLD_DIR", str(hold))
              if (c := _cmdline(p)) and not any(mark in c for mark in ending)]
    assert others == [], others
    deadline = time.monotonic() + 15
    while (left := _pids_with_env("ORCH_TEST_HOLD_DIR", str(hold))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], f"still there 15 s after the coordinator: {[_cmdline(p)[:200] for p in left]}"


def test_training_tasks_need_a_training_worker() -> None:
    cpu = TrainingConfig(workers=2)
    gpu = TrainingConfig(workers=2, device="cuda")
    assert cpu.worker_resources == {"train": 1} and gpu.worker_resources == {"train": 1, "GPU": 1}
    assert TrainingConfig(device="cuda", gpus_per_worker=2).gpus == 2
    assert Trainer(LocalBackend(gpu), gpu, 1, 1).train_options["resources"] == {"train": 1, "GPU": 1}


def test_cuda_without_a_gpu_is_one_line_at_start() -> None:
    with pytest.raises(ResourceError) as info:
        check_local_device(TrainingConfig(backend="local", device="cuda"), gpus=0)
    assert "\n" not in str(info.value) and "training.device" in str(info.value)
    check_local_device(TrainingConfig(backend="local", device="auto"), gpus=0)


def test_cuda_on_a_worker_without_one_is_one_line(tmp_path: Path) -> None:
    if tasks.torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match=r"training.device is cuda but worker .* has no usable GPU") as info:
        tasks.warm_up(MODEL, {}, 1, 1, "cuda")
    assert "\n" not in str(info.value)
    state, _ = tasks.train(None, _data(tmp_path, 64), MODEL, {}, {"epochs": 2, "lbfgs_iters": 0}, 1, 0, "auto")
    assert all(t.device.type == "cpu" for t in tasks._deserialise(state)["model"].values())


needs_gpu = pytest.mark.skipif(not tasks.torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu-check.sh)")


@needs_gpu
def test_cuda_training_saves_cpu_tensors_that_load_anywhere(tmp_path: Path) -> None:
    paths = _data(tmp_path)
    state, _ = tasks.train(None, paths, MODEL, {}, {**HP}, 1, 7, "cuda")
    blob = tasks._deserialise(state)
    assert all(t.device.type == "cpu" for t in blob["model"].values())
    assert _val_rmse(state) < 0.02  # evaluate() runs on the CPU
    warm, _ = tasks.train(state, paths, MODEL, {}, {"epochs": 5, "lbfgs_iters": 0}, 1, 7, "cuda")
    assert tasks._deserialise(warm)["rounds_done"] == 2


@needs_gpu
def test_ddp_over_gpu_workers_uses_nccl(tmp_path: Path) -> None:
    world = min(2, tasks.torch.cuda.device_count())
    cfg = TrainingConfig(backend="local", workers=world, strategy="ddp", device="cuda", hparams=HP)
    state, metrics = asyncio.run(_ddp_round(cfg, _data(tmp_path)))
    assert metrics["ddp_world_size"] == world and _val_rmse(state) < 0.02


@pytest.mark.skipif(Path("/dev/nvidia0").exists(), reason="this machine has a GPU")
def test_run_with_cuda_and_no_gpu_is_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    loop = Path(__file__).resolve().parent.parent / "examples" / "sine" / "loop.yml"
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(loop), "--workdir", str(tmp_path),
                           "--set", "training.device=cuda"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "training.device is cuda" in proc.stderr, proc.stderr
