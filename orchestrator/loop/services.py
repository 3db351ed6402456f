"""Starting the campaign's services while its first sims already run: Dask and MLflow.

A campaign starts its first sims, then :meth:`Services.begin`: no sim waits for
Dask's imports, its TLS certificate, its worker processes or MLflow (measured
for issue 25: the 2 s head start the workers had cost the first sim up to 1.8 s
on a loaded 2-core box, while the first training waits for a sim's data anyway).
:meth:`Services.start` (``--steps``, which has no sims to start first) still
gives the workers a head start. MLflow starts after Dask (its imports hold the GIL).
A failed start stops the campaign: the loop awaits :attr:`Services.pending`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from orchestrator.loop.tracksink import CLOSE_PATIENCE_S, TrackingSink
from orchestrator.runlog import TrainingBackend
from orchestrator.store import RunStore
from orchestrator.training.backends import Backend, Trainer

BACKEND_HEAD_START_S = 2.0
"""The longest the first sims wait for the Dask workers' processes to be up (not warm)."""


class Services:
    """The Dask backend (workers up and warm) and the tracking sink's start."""

    def __init__(self, backend: Backend, trainer: Trainer, store: RunStore, sink: TrackingSink) -> None:
        self.backend = backend
        self.trainer = trainer
        self.store = store
        self.sink = sink
        self.backend_ready: asyncio.Future[None] | None = None
        self._up = asyncio.Event()
        self._begun = asyncio.Event()

    async def start(self, params: Mapping[str, Any], *, within: float | None = None,
                    until: asyncio.Future[Any] | None = None) -> None:
        """Start both; return once the Dask processes are up or the head start is over, and
        sooner when the campaign's time is up (``within`` s: the time budget, the walltime)
        or ``until`` is done (a signal): start-up never outlasts the campaign's time."""
        self.begin(params)
        head_start = BACKEND_HEAD_START_S if within is None else max(0.0, min(within, BACKEND_HEAD_START_S))
        up = asyncio.ensure_future(self._up.wait())
        try:
            await asyncio.wait([up, *([until] if until is not None else [])], timeout=head_start,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            up.cancel()

    def begin(self, params: Mapping[str, Any]) -> None:
        """Start both in the background (once): Dask's imports and TLS certificate run in the
        event loop at its next turn, after whatever the caller started before."""
        if self.backend_ready is not None:
            return
        self.backend_ready = asyncio.ensure_future(self._start_backend())
        self.sink.start(params, after=self.backend_ready)
        self._begun.set()

    async def _start_backend(self) -> None:
        try:
            await self.backend.start()
        finally:
            self._up.set()
        seconds = await self.trainer.warm_up()
        self.store.log(TrainingBackend(round(seconds, 3), extra=self.backend.describe()))

    @property
    def begun(self) -> bool:
        """Whether :meth:`begin` ran."""
        return self._begun.is_set()

    @property
    def trainer_up(self) -> bool:
        """Whether the workers are up and warm (the policy may count on training)."""
        return self.backend_ready is not None and self.backend_ready.done()

    async def trainer_ready(self) -> None:
        """Wait until the Dask workers are up and warm (their start begun first); raises what
        their start raised."""
        await self._begun.wait()
        assert self.backend_ready is not None
        await asyncio.shield(self.backend_ready)

    @property
    def pending(self) -> list[asyncio.Future[None]]:
        """Starts still under way: their end changes what the policy may start."""
        return [f for f in (self.backend_ready, self.sink.ready) if f is not None and not f.done()]

    def started(self, future: asyncio.Future[Any]) -> None:
        """One start ended: raise what it raised; flush metrics kept for MLflow."""
        future.result()
        if future is self.sink.ready:
            self.sink.flush()

    async def stop(self, patience: float = CLOSE_PATIENCE_S) -> None:
        """Stop a Dask start still under way (and MLflow's, if it has not begun: it waits for Dask);
        let MLflow's finish (it is needed to close the run), for at most ``patience`` s."""
        if self.backend_ready is not None and not self.backend_ready.done():
            self.backend_ready.cancel()
            with contextlib.suppress(BaseException):
                await self.backend_ready
            await self.sink.abandon("the campaign ended while its Dask workers were still starting")
        await self.sink.settle(patience)
