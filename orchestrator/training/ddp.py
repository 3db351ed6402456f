"""Data-parallel training of one model over the Dask workers (``training.strategy: ddp``).

A round: a first task on one worker finds its address and a free port (the
rendezvous); then one task per worker, pinned to it, joins a ``torch.distributed``
group of ``world`` ranks there (gloo on CPU, nccl on GPU) and trains its share of
the rows (:mod:`orchestrator.training.ddp_worker`). A rank that fails or a worker
that dies fails the whole round: the other ranks are cancelled, the coordinator
waits for ``world`` workers again (the nanny restarts a killed one) and reruns the
round from the same starting state, up to ``retries`` times. Torch-free: only
the workers import torch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, cast

from orchestrator.errors import TrainingDiverged, TrainingError
from orchestrator.training import remote

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

GROUP_TIMEOUT_S = 60.0
"""A rank waits this long for its peers (to join, or in a collective) before it fails."""
WORKERS_BACK_TIMEOUT_S = 180.0
"""After a failed round, the workers must be ``world`` again within this."""


def pick_workers(workers: dict[str, Any], world: int, resource: str = "train") -> list[str]:
    """``world`` worker addresses that advertise ``resource``, in a stable order."""
    able = sorted(a for a, w in workers.items() if w.get("resources", {}).get(resource, 0) >= 1)
    if len(able) < world:
        raise TrainingError(f"ddp needs {world} workers with the Dask resource {resource!r}, "
                            f"{len(able)} are connected")
    return able[:world]


async def _one_round(client: Client, addrs: Sequence[str], args: tuple[Any, ...], device: str
                     ) -> tuple[bytes, dict[str, float]]:
    c = cast(Any, client)
    host, port = await c.submit(remote.call_ddp, "rendezvous", workers=[addrs[0]], allow_other_workers=False,
                                pure=False)
    log.info("ddp: %d ranks, rendezvous tcp://%s:%d", len(addrs), host, port)
    futures = [
        c.submit(remote.call_ddp, "train_rank", rank, len(addrs), host, port, args, device, GROUP_TIMEOUT_S,
                 workers=[addr], allow_other_workers=False, pure=False)
        for rank, addr in enumerate(addrs)
    ]
    try:
        results: list[tuple[bytes | None, dict[str, float]]] = await _first_failure(futures)
    finally:
        await c.cancel(futures, force=True)
    state, metrics = results[0]
    assert state is not None
    return state, metrics


async def _first_failure(futures: list[Any]) -> list[Any]:
    """All results, or the first error as soon as any rank fails (the others are then cancelled)."""
    pending = [asyncio.ensure_future(cast(Awaitable[Any], f)) for f in futures]
    try:
        done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise cast(BaseException, t.exception())
        return [t.result() for t in pending]
    finally:
        for t in pending:
            t.cancel()


async def train(client: Client, world: int, args: tuple[Any, ...], device: str, retries: int
                ) -> tuple[bytes, dict[str, float]]:
    """One data-parallel round over ``world`` workers; ``args`` as for ``tasks.train``."""
    c = cast(Any, client)
    last: BaseException | None = None
    for attempt in range(retries + 1):
        if attempt:
            await c.wait_for_workers(world, timeout=WORKERS_BACK_TIMEOUT_S)
        try:
            addrs = pick_workers((await c.scheduler.identity(n_workers=-1))["workers"], world)
            state, metrics = await _one_round(client, addrs, args, device)
        except FloatingPointError as exc:  # the loss went non-finite: the data and the seed, not a worker
            raise TrainingDiverged(f"{exc} (ddp over {world} workers)") from exc
        except Exception as exc:  # a rank raised or its worker died: the round is lost as a whole
            last = exc
            log.warning("ddp round attempt %d/%d failed: %s: %s", attempt + 1, retries + 1,
                        type(exc).__name__, exc)
            continue
        metrics["ddp_attempts"] = float(attempt + 1)
        return state, metrics
    raise TrainingError(f"ddp training failed {retries + 1} time(s) over {world} workers: "
                        f"{type(last).__name__}: {last}") from last
