"""The campaign's side of MLflow: buffered metrics, registration, closing the run.

MLflow starts concurrently with the first sims, so metrics that arrive before it
is up are kept and flushed once it is. Registration loads the model, which needs
torch: it runs as a task on a Dask worker (:meth:`Trainer.register`), which logs
to the campaign's MLflow run by its tracking URI and run id. The coordinator never
imports torch. Every call into MLflow itself is in :mod:`orchestrator.tracking`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from orchestrator.errors import TrackingError
from orchestrator.runlog import EVIDENCE_FIELDS, ModelRegistered, State, Status
from orchestrator.store import RunStore

if TYPE_CHECKING:
    from orchestrator.tracking import Tracker
    from orchestrator.training.backends import Trainer

log = logging.getLogger(__name__)

_T = TypeVar("_T")

MLFLOW_STATUS = {Status.TARGET_MET: "FINISHED", Status.STOPPED: "FINISHED", Status.INTERRUPTED: "KILLED",
                 Status.REGISTERING: "KILLED"}

START_PATIENCE_S = 180.0
"""How long MLflow's start is retried (a busy database; campaigns creating a fresh schema together)."""
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 10.0
"""Back-off between attempts of one MLflow call."""
CLOSE_PATIENCE_S = 3.0
"""At the end, how long unsent metrics and the run's close may wait for MLflow; what is left is kept
in state.json (``unsent_metrics``) and sent by the resume."""


class TrackingSink:
    """Metrics, the registered model and the artifacts of one campaign, into one MLflow run."""

    def __init__(
        self, tracker: Tracker | None, store: RunStore, state: State, checkpoint: Callable[[], object]
    ) -> None:
        self.tracker = tracker
        self.store = store
        self.state = state
        self.checkpoint = checkpoint
        self.ready: asyncio.Future[None] | None = None
        self._pending: list[tuple[dict[str, float], int]] = [(dict(m), int(k)) for m, k in state.unsent_metrics]
        self._sender: asyncio.Future[None] | None = None
        self.failure: BaseException | None = None
        """Why MLflow's start failed (tracking is then off for the rest of this session)."""
        self._opening = False
        """MLflow's start has begun (it waits for the Dask start first)."""

    @property
    def enabled(self) -> bool:
        return self.tracker is not None

    def start(self, params: Mapping[str, Any], after: Awaitable[Any] | None) -> asyncio.Future[None]:
        """Open (or reopen) the MLflow run once ``after`` is done; metrics are kept meanwhile."""
        self.ready = asyncio.ensure_future(self._start(params, after))
        return self.ready

    async def _start(self, params: Mapping[str, Any], after: Awaitable[Any] | None) -> None:
        if self.tracker is None:
            return
        # MLflow's start is mostly imports, which hold the GIL: let the Dask start go first.
        if after is not None:
            await asyncio.wait([asyncio.ensure_future(after)])
        tracker = self.tracker
        self._opening = True
        run_id = await retrying("start tracking", lambda: tracker.start(params, self.state.mlflow_run_id),
                                START_PATIENCE_S)
        self.state.mlflow_run_id = run_id
        self.checkpoint()

    async def abandon(self, why: str) -> None:
        """Give up MLflow's start if it has not begun (the campaign ends during start-up): no run
        is opened, and metrics kept so far stay in state.json for a resume."""
        if self.tracker is None or self.ready is None or self.ready.done() or self._opening:
            return
        self.ready.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.ready
        self.tracker = None
        self.state.unsent_metrics = [[m, k] for m, k in self._pending]
        log.warning("MLflow: no run opened: %s (the run dir has everything)", why)

    def metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue metrics for MLflow; a worker thread sends them once its (concurrent) start is done."""
        if self.tracker is None:
            return
        self._pending.append((dict(metrics), step))
        if self.ready is not None and self.ready.done():
            self.flush()

    def flush(self) -> None:
        """Start sending what is queued (off the event loop), unless a send is under way."""
        if self.tracker is None or not self._pending:
            return
        if self._sender is None or self._sender.done():
            self._sender = asyncio.ensure_future(self._send())

    async def _send(self) -> None:
        tracker = self.tracker
        while self._pending and tracker is not None:
            metrics, step = self._pending[0]
            try:
                await retrying(f"log metrics at step {step}", functools.partial(tracker.log_metrics, metrics, step),
                               START_PATIENCE_S)
            except TrackingError as exc:  # loud: logged and kept for the resume, never dropped silently
                log.error("MLflow: %s; %d metric batches kept in state.json for the resume", exc, len(self._pending))
                return
            self._pending.pop(0)

    async def settle(self, patience: float | None = None) -> None:
        """Wait for MLflow's start (needed to close the run), at most ``patience`` s; a failed start
        disables tracking (loudly)."""
        if self.ready is None or self.ready.cancelled():
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.ready), patience)
            self.flush()
        except Exception as exc:  # already raised in the loop, or the campaign failed first
            log.error("MLflow tracking unavailable for this run: %s", str(exc) or "it was still starting")
            self.tracker = None
            self.failure = exc

    async def register(
        self, trainer: Trainer, model: bytes | list[bytes], name: str, key: str | None = None,
    ) -> dict[str, str] | None:
        """Register a model under ``name``, from a Dask worker. With ``key``, a version already
        registered from this run under the same key is returned instead (a resumed registration)."""
        await self.settle()
        if self.tracker is None or self.state.mlflow_run_id is None:
            # loud, and resumable: the target is met but the model is not in the registry yet
            raise TrackingError(f"MLflow tracking did not start ({self.failure}); the model is not registered "
                                "yet: resume the run once MLflow is reachable")
        reg_name, version = await trainer.register(model, self.tracker.tracking_uri, self.state.mlflow_run_id, name,
                                                   key)
        self.store.log(ModelRegistered(reg_name, version))
        return {"name": reg_name, "version": version}

    async def upload(self, path: Path, artifact_path: str) -> None:
        """One file into the run's artifacts, once MLflow's start is done (a no-op without tracking)."""
        if self.tracker is None:
            return
        if self.ready is not None:
            await asyncio.shield(self.ready)
        await off_loop(functools.partial(self.tracker.log_artifact, path, artifact_path))

    async def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point a registry alias (continual mode's champion) at ``version``, once MLflow's start is done."""
        await self.settle()
        if self.tracker is not None:
            await off_loop(functools.partial(self.tracker.set_alias, name, alias, version))

    async def close(self, status: Status, artifacts: Sequence[Path], summary: Mapping[str, Any],
                    patience: float = CLOSE_PATIENCE_S) -> None:
        """Send what is queued, upload the run's files, describe the run and end it with the campaign's
        status; all within ``patience`` s.

        Metrics MLflow did not take by then are kept in state.json for the resume (loudly).
        """
        if self.tracker is None:
            return
        tracker = self.tracker
        self.flush()
        try:
            await asyncio.wait_for(self._close(tracker, status, artifacts, describe(summary)), patience)
        except (TimeoutError, TrackingError) as exc:
            log.error("MLflow did not close run %s in time (%s); %d metric batches kept for the resume",
                      self.state.mlflow_run_id, exc or "busy", len(self._pending))
        finally:
            if self._sender is not None:
                self._sender.cancel()
            self.state.unsent_metrics = [[m, k] for m, k in self._pending]
            self.checkpoint()

    async def _close(self, tracker: Tracker, status: Status, artifacts: Sequence[Path],
                     tags: Mapping[str, str]) -> None:
        if self._sender is not None:
            await asyncio.shield(self._sender)
        if self._pending:
            raise TrackingError(f"{len(self._pending)} metric batches could not be sent")
        await off_loop(functools.partial(self._upload, tracker, status, artifacts, tags))

    @staticmethod
    def _upload(tracker: Tracker, status: Status, artifacts: Sequence[Path], tags: Mapping[str, str]) -> None:
        for artifact in artifacts:
            if artifact.exists():
                tracker.log_artifact(artifact)
        with contextlib.suppress(Exception):  # a description is not worth losing the run's status
            tracker.set_tags(tags)
        tracker.finish(MLFLOW_STATUS.get(status, "FAILED"))  # type: ignore[arg-type]


def off_loop(call: Callable[[], _T]) -> asyncio.Future[_T]:
    """``call()`` in a daemon thread of its own: the event loop goes on meanwhile, and a call stuck
    in a locked database neither delays a signal's exit nor keeps the process alive at the end
    (``asyncio.to_thread``'s pool is joined when the loop closes)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        result: _T | None = None
        error: BaseException | None = None
        try:
            result = call()
        except BaseException as exc:  # handed to the awaiting coroutine
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name="mlflow", daemon=True).start()
    return future


async def retrying(what: str, call: Callable[[], _T], patience: float) -> _T:
    """``call()`` in a worker thread, retried with back-off on a TrackingError until ``patience`` s
    have passed (sqlite's "database is locked", a schema another campaign is creating)."""
    deadline = time.monotonic() + patience
    delay = RETRY_FIRST_S
    while True:
        try:
            return await off_loop(call)
        except TrackingError as exc:
            if not exc.transient or time.monotonic() + delay > deadline:  # a wrong URI does not pass
                raise
            log.warning("MLflow: could not %s (%s); retrying in %.1f s", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(RETRY_MAX_S, delay * 2)


def describe(summary: Mapping[str, Any]) -> dict[str, str]:
    """Tags for the campaign's MLflow run: its outcome in words (the UI's description) and its run dir."""
    reg = summary.get("registered_model")
    model = f"; registered as {reg['name']} version {reg['version']}" if reg else ""
    why = f" ({summary['stop_reason']})" if summary.get("stop_reason") and not summary.get("target_met") else ""
    text = (f"{summary['status']}{why}: {summary['rounds']} training round(s), successes {summary['successes']}, "
            f"{summary['data_points']} rows, {summary['sims_launched']} sims ({summary['sims_failed']} failed), "
            f"{summary['wall_s']:.1f} s{model}. Run dir: {summary['run_dir']}")
    if summary.get("certified_statement"):
        text += f". Evidence: {summary['certified_statement']}"
    tags = {"mlflow.note.content": text, "campaign.status": str(summary["status"]),
            "campaign.run_dir": str(summary["run_dir"])}
    tags.update({f"campaign.{k}": str(summary[k]) for k in EVIDENCE_FIELDS if summary.get(k) is not None})
    return tags


def evidence_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of what the checks certify, and the check rows in the data, as MLflow metrics."""
    keys = ("certified_coverage", "confidence", "checks_used", "checks_failed", "checks_needed", "check_rows")
    return {k: float(summary[k]) for k in keys if isinstance(summary.get(k), int | float)}
