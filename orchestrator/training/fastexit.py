"""A Dask worker process that has closed cleanly exits at once, without torch's slow teardown.

An interpreter that imported torch takes 1-2 s to exit (the interpreter's own
finalization: 1.4 s after a bare ``import torch`` here, 0.07 s when ``os._exit``
ends it from ``atexit``), and a LocalCluster's close waits for every worker
process to exit: closing one warmed-up worker took 2.9-4.2 s, and 0.1-0.2 s
with this. Every campaign's end paid it, and a time budget's end overran by it.
A worker that has closed has nothing left that matters: its results went back
over the wire, and its logs and streams are flushed here. :class:`FastExit` is a worker plugin: its ``teardown`` (run by
``Worker.close``) marks the close as clean, and an ``atexit`` hook installed by
its ``setup`` then runs the other ``atexit`` hooks and ends the process with
``os._exit(0)``. A worker that ends any
other way (an exception, a signal) exits as it would have, with its own code.
Only the campaign's own worker processes get it (registered by the backend).
A heartbeat in flight when the close began fails on the closed connection pool;
that traceback (the worker's, on the user's terminal) says nothing and is dropped.
:class:`OneLineDaskFaults`, the other worker plugin, puts Dask's passing faults in one line.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

_state = {"installed": False, "closed": False}


class _ClosingHeartbeat(logging.Filter):
    """Drops the worker's "Failed to communicate with scheduler during heartbeat" once it is closing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to communicate with scheduler during heartbeat")


def _exit_if_closed() -> None:
    """The other ``atexit`` hooks first, as at any exit (multiprocessing's finalizers among them:
    they unregister the worker's semaphores from the resource tracker, which otherwise outlives
    the campaign cleaning them up); then only the interpreter's own teardown is skipped."""
    if not _state["closed"]:
        return
    atexit.unregister(_exit_if_closed)
    run_others = getattr(atexit, "_run_exitfuncs", None)
    if run_others is not None:
        with contextlib.suppress(Exception):
            run_others()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


class FastExit(WorkerPlugin):
    """Registered on the campaign's workers; see the module's docstring."""

    name = "orchestrator-fast-exit"

    def setup(self, worker: Any) -> None:
        if not _state["installed"]:
            _state["installed"] = True
            atexit.register(_exit_if_closed)  # runs the other atexit hooks itself, then skips the teardown

    def teardown(self, worker: Any) -> None:  # early in Worker.close, before its connections close
        _state["closed"] = True
        logging.getLogger("distributed.worker").addFilter(_ClosingHeartbeat())


class _OneLine(logging.Filter):
    """Dask's own passing faults in one line: a heartbeat that could not reach the scheduler (a busy
    box, or the scheduler closing first) is logged by ``distributed`` with a whole traceback."""

    PASSING = ("Failed to communicate with scheduler during heartbeat",)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.getMessage().startswith(self.PASSING):
            exc = record.exc_info[1]
            record.msg, record.args = f"{record.getMessage()} ({type(exc).__name__}: {exc})", None
            record.exc_info = record.exc_text = None
        return True


class OneLineDaskFaults(WorkerPlugin):
    """On every worker of a local cluster (their stderr is the user's terminal): :class:`_OneLine`."""

    name = "orchestrator-one-line-faults"

    def setup(self, worker: Any) -> None:
        target = logging.getLogger("distributed.worker")
        if not any(isinstance(f, _OneLine) for f in target.filters):
            target.addFilter(_OneLine())
