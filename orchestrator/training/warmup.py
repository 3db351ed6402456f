"""A Dask worker preload: torch and the training tasks imported as the worker starts, beside its start.

A fresh worker process imported torch (about 2 s on a busy box) only when its first task
(the first training, or a warm-up) began, after it had connected to the scheduler: the
campaign's first training waited for both in turn. Named as the worker's preload
(``LocalCluster(preload=...)``, ``dask worker --preload``), :func:`dask_setup` starts a
daemon thread that imports :mod:`orchestrator.training.tasks` (and with it torch) while
the worker connects. A task that needs the module meanwhile waits on Python's per-module
import lock for the thread's import to finish, and gets the same module (no second
import, no deadlock: the thread takes no other lock). The thread holds nothing: a worker
killed or closed mid-import ends as it would have; an import that fails here is left for
the task to raise again, where it is reported.

Once torch is imported the worker installs :mod:`~orchestrator.training.lazydynamo`: its
optimizers no longer import ``torch._dynamo`` (1.2-1.7 s) while nothing is compiled. A worker
forked from the local backend's forkserver has torch already: there the hooks are installed
before the worker connects, ahead of any task.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from typing import Any

log = logging.getLogger(__name__)

MODULE = "orchestrator.training.warmup"
"""This module's name, as Dask's ``preload`` option takes it."""

WARM_IMPORTS = ("orchestrator.training.tasks",)
"""Imported in the background by every campaign worker as it starts (torch with it)."""

_started = threading.Event()


def _install_lazydynamo() -> None:
    from orchestrator.training import lazydynamo

    lazydynamo.install()


def _import_all() -> None:
    for name in WARM_IMPORTS:
        try:
            importlib.import_module(name)
        except Exception as exc:  # the task that needs it raises it again, with its own report
            log.debug("warm import of %s failed: %s", name, exc)
            return
    _install_lazydynamo()


def warm() -> threading.Thread | None:
    """Start the background imports once per process; the thread, or None when already started."""
    if _started.is_set():
        return None
    _started.set()
    thread = threading.Thread(target=_import_all, name="orchestrator-warm-imports", daemon=True)
    thread.start()
    return thread


def dask_setup(worker: Any) -> None:
    """Dask's preload hook, called as the worker starts (before it connects to the scheduler)."""
    if all(name in sys.modules for name in WARM_IMPORTS):  # forked from a server that imported them
        _install_lazydynamo()
    warm()
