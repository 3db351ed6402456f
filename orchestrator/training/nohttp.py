"""No Dask HTTP server answers anyone: the scheduler's and every worker's are stopped once up.

Dask starts an HTTP server beside every scheduler and worker (health, Prometheus metrics,
the scheduler's info and JSON pages: its identity, the workers, task counts, and a proxy
to the workers' pages), in plain HTTP even with the dashboard off, on the comm's host,
loopback included, which every account on a node shares. The campaign uses none of it;
the comm ports demand the campaign's TLS client certificate, these would not. So:

* the routes are emptied in the Dask config of the coordinator (:data:`ROUTES_OFF`) and of
  every worker (:data:`WORKER_ENV` for workers that are processes of their own), so that in
  the moment between a server's start and its stop a request gets a 404 and nothing else;
* the scheduler's server is stopped as soon as it is up (:func:`stop_http`), and each
  worker's by :class:`NoHTTP`, a worker plugin that runs on every worker, present and future.
"""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

ROUTES_OFF: dict[str, Any] = {"distributed.scheduler.http.routes": [], "distributed.worker.http.routes": []}
WORKER_ENV = {"DASK_DISTRIBUTED__WORKER__HTTP__ROUTES": "[]", "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False"}
"""The Dask settings a worker that is a process of its own (a Slurm step's, a batch job's) takes from its
environment: no HTTP routes, and no statistical profiler (backends.QUIET_DASK says why)."""


def stop_http(server: Any) -> None:
    """Close a Dask server's (scheduler's or worker's) HTTP listening sockets; closing it again later is a no-op."""
    http = getattr(server, "http_server", None)
    if http is not None:
        http.stop()


class NoHTTP(WorkerPlugin):
    """Stops the worker's HTTP server; registered by every backend."""

    name = "orchestrator-no-http"

    def setup(self, worker: Any) -> None:
        stop_http(worker)
