"""The local Dask workers are forked from a warm server that imported Dask and torch beside the first sims.

Measured for issue 25 (sine bench, 2 cores): a spawned worker process imported Dask (about
0.8 s) and only then torch (1.5 s, 2.5 s on a busy box) before the first training could run,
so the first generate sim's data waited 1.6 s for the workers. Here :func:`prewarm` starts
Python's forkserver as the local backend starts, just after the first sims (starting it costs the
coordinator about 30 ms, which the first sim no longer waits for): a process of its
own that imports :data:`PRELOAD` on another core, and every local worker (a restart after a
crash included) is forked from it with all of it already in memory.

What stays as it was:
- the workers' environment: the server sets :mod:`~orchestrator.training.workerenv`'s variables
  in its own environment before it imports torch (Dask's nanny sets them in the *coordinator's*
  environment before each spawn, which leaked ``OMP_NUM_THREADS=1`` into every sim started afterwards; the local
  backend now tells Dask to set none, see :data:`DASK_CONFIG`);
- the guardian: the server starts after the guardian, so it carries the campaign's token and is
  ended, with the workers forked from it, when the coordinator is SIGKILLed; on a normal end
  the server exits by itself once the coordinator's end of its pipe closes;
- torch in the server is only imported, never run: no thread pool or device exists to fork.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading

from orchestrator.training.warmup import WARM_IMPORTS

log = logging.getLogger(__name__)

PRELOAD = ("orchestrator.training.workerenv", "distributed", "distributed.nanny", "orchestrator.training.warmup",
           *WARM_IMPORTS)
"""What the server imports once, for every worker forked from it (torch among it)."""

DASK_CONFIG = {"distributed.worker.multiprocessing-method": "forkserver", "distributed.nanny.pre-spawn-environ": {}}
"""The local backend's Dask settings: workers forked from the server, nothing set in the coordinator's environment."""

_lock = threading.Lock()
_started = False


def prewarm() -> None:
    """Start the server now, once per process (about 30 ms here; its imports run in the server)."""
    global _started
    with _lock:
        if _started:
            return
        _started = True
        from multiprocessing import forkserver

        multiprocessing.get_context("forkserver").set_forkserver_preload(list(PRELOAD))
        forkserver.ensure_running()
    log.debug("forkserver started, preloading %s", ", ".join(PRELOAD))


def _nothing() -> None:
    """A process that does nothing: forked once the server's imports are done (:func:`wait_ready`)."""


def wait_ready() -> None:
    """Block until the server has done its imports (by forking one empty process from it). The local
    backend waits here, in a thread, before it starts its workers: a cluster whose workers are starting
    cannot be closed, so a campaign stopped meanwhile (its time budget, a signal) would wait for the imports."""
    prewarm()
    child = multiprocessing.get_context("forkserver").Process(target=_nothing, name="orchestrator-forkserver-ready")
    child.start()
    child.join()


def use_forkserver() -> None:
    """Dask's local workers from the server from here on (Dask imported). Dask would otherwise
    set its own preload list at its first start (importing pandas and more into the coordinator
    to do so); the server here is already running with ours."""
    import dask
    import distributed.utils

    prewarm()
    dask.config.set(DASK_CONFIG)
    distributed.utils._forkserver_preload_set = True
