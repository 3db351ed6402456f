"""Which torch device a training task uses on its worker (worker side: imports torch).

Each worker sees only its own GPU(s): under ``srun --gpus-per-task`` Slurm sets
``CUDA_VISIBLE_DEVICES`` per task, so ``cuda:0`` is the worker's GPU. Where one
process sees several GPUs (a LocalCluster on a multi-GPU box), the worker's index
in the cluster picks one, so two workers never share a GPU by accident.
"""

from __future__ import annotations

import os
import socket

import torch

NO_GPU_HINT = "set training.device: auto or cpu, or run the workers where a GPU is (training.gpus_per_worker)"


class NoGpuError(RuntimeError):
    """``training.device: cuda`` on a worker without a usable GPU."""


def _worker_index() -> int:
    """This worker's index (LocalCluster names its workers 0, 1, ...); 0 elsewhere."""
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return 0
    return int(name) if isinstance(name, int) or (isinstance(name, str) and name.isdigit()) else 0


def resolve(requested: str) -> torch.device:
    """The device for ``training.device`` (``auto`` | ``cpu`` | ``cuda``) on this worker."""
    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if requested == "cuda":
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise NoGpuError(f"training.device is cuda but worker {socket.gethostname()} has no usable GPU "
                             f"(CUDA_VISIBLE_DEVICES={visible!r}); {NO_GPU_HINT}")
        return torch.device("cpu")
    return torch.device("cuda", _worker_index() % torch.cuda.device_count())


def describe(device: torch.device) -> str:
    """``cpu`` or ``cuda:0 (NVIDIA H200)``, for logs and metrics."""
    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)})"
