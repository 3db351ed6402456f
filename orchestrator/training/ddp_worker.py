"""Worker side of data-parallel training: one rank of a ``torch.distributed`` group per Dask worker.

The coordinator (:mod:`orchestrator.training.ddp`) asks one worker for a free port
(:func:`rendezvous`), then submits :func:`train_rank` to every worker with its
rank. Each rank loads all the data, computes gradients on its own rows (every
``world``-th row from ``rank``), and the weighted gradients and losses are summed
over the group (:class:`AllReduce`), so every rank takes the same optimizer steps
as a single process would on all the rows. Rank 0 returns the state; the group is
destroyed in ``finally``, whatever happened. A peer that dies makes the others'
collectives fail (or time out after ``timeout_s``), so the round fails as a whole.
"""

from __future__ import annotations

import datetime
import socket
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from orchestrator.training import devices, tasks


def rendezvous() -> tuple[str, int]:
    """This worker's host (as the other workers reach it) and a port free on it now."""
    from distributed import get_worker

    host = get_worker().address.rsplit(":", 1)[0].split("://", 1)[-1].strip("[]")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = int(s.getsockname()[1])
    return host, port


class AllReduce(tasks.Reduce):
    """Sums weighted losses and gradients over the default process group."""

    def __init__(self, rank: int, world: int, n_rows: int) -> None:
        self.rank = rank
        self.world = world
        self.weight = len(range(rank, n_rows, world)) / n_rows

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[self.rank :: self.world], y[self.rank :: self.world]

    def grads(self, model: nn.Module) -> None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def value(self, loss: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(loss, op=dist.ReduceOp.SUM)
        return loss


def _count_rows(data_paths: list[str], n_inputs: int) -> int:
    return int(tasks.load_training_data(data_paths, n_inputs)[0].shape[0])


def train_rank(
    rank: int,
    world: int,
    host: str,
    port: int,
    args: tuple[Any, ...],
    device: str,
    timeout_s: float,
) -> tuple[bytes | None, dict[str, float]]:
    """One rank of a data-parallel round; ``args`` are :func:`tasks.train`'s first seven."""
    dev = devices.resolve(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        state, data_paths, model, model_kwargs, hparams, n_inputs, seed = args
        reduce = AllReduce(rank, world, _count_rows(data_paths, n_inputs))
        new_state, metrics = tasks.train(state, data_paths, model, model_kwargs, hparams, n_inputs, seed,
                                         device, reduce)
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        else:  # init failed after naming the group: reset the name counter, or this process's next
            dist.distributed_c10d._world.group_count = 0  # group would look for its peers under another name
    metrics.update(ddp_world_size=float(world))
    return (new_state if rank == 0 else None), metrics
