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
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.runlog import ModelRegistered, State, Status
from orchestrator.store import RunStore

if TYPE_CHECKING:
    from orchestrator.tracking import Tracker
    from orchestrator.training.backends import Trainer

log = logging.getLogger(__name__)

MLFLOW_STATUS = {Status.TARGET_MET: "FINISHED", Status.STOPPED: "FINISHED", Status.INTERRUPTED: "KILLED"}


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
        self._pending: list[tuple[dict[str, float], int]] = []

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
        run_id = await asyncio.to_thread(self.tracker.start, params, self.state.mlflow_run_id)
        self.state.mlflow_run_id = run_id
        self.checkpoint()

    def metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log to MLflow, or keep the metrics until its (concurrent) start is done."""
        if self.tracker is None:
            return
        self._pending.append((dict(metrics), step))
        if self.ready is not None and self.ready.done():
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        if self.tracker is None:
            return
        for metrics, step in pending:
            self.tracker.log_metrics(metrics, step=step)

    async def settle(self) -> None:
        """Wait for MLflow's start (needed to close the run); a failed start disables tracking."""
        if self.ready is None:
            return
        try:
            await self.ready
            self.flush()
        except Exception as exc:  # already raised in the loop, or the campaign failed first
            log.warning("MLflow tracking unavailable for this run: %s", exc)
            self.tracker = None

    async def register(self, trainer: Trainer, model: bytes, name: str) -> dict[str, str] | None:
        """Register the final model under ``name``, from a Dask worker; None without tracking."""
        await self.settle()
        if self.tracker is None or self.state.mlflow_run_id is None:
            return None
        reg_name, version = await trainer.register(model, self.tracker.tracking_uri, self.state.mlflow_run_id, name)
        self.store.log(ModelRegistered(reg_name, version))
        return {"name": reg_name, "version": version}

    async def upload(self, path: Path, artifact_path: str) -> None:
        """One file into the run's artifacts, once MLflow's start is done (a no-op without tracking)."""
        if self.tracker is None:
            return
        if self.ready is not None:
            await asyncio.shield(self.ready)
        await asyncio.to_thread(self.tracker.log_artifact, path, artifact_path)

    async def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point a registry alias (continual mode's champion) at ``version``, once MLflow's start is done."""
        await self.settle()
        if self.tracker is not None:
            await asyncio.to_thread(self.tracker.set_alias, name, alias, version)

    async def close(self, status: Status, artifacts: Sequence[Path], summary: Mapping[str, Any]) -> None:
        """Upload the run's files, describe the run, and end it with the campaign's status."""
        if self.tracker is not None:
            await asyncio.to_thread(self._close, self.tracker, status, artifacts, describe(summary))

    @staticmethod
    def _close(tracker: Tracker, status: Status, artifacts: Sequence[Path], tags: Mapping[str, str]) -> None:
        for artifact in artifacts:
            if artifact.exists():
                tracker.log_artifact(artifact)
        with contextlib.suppress(Exception):  # a description is not worth losing the run's status
            tracker.set_tags(tags)
        with contextlib.suppress(Exception):
            tracker.finish(MLFLOW_STATUS.get(status, "FAILED"))  # type: ignore[arg-type]


def describe(summary: Mapping[str, Any]) -> dict[str, str]:
    """Tags for the campaign's MLflow run: its outcome in words (the UI's description) and its run dir."""
    reg = summary.get("registered_model")
    model = f"; registered as {reg['name']} version {reg['version']}" if reg else ""
    why = f" ({summary['stop_reason']})" if summary.get("stop_reason") and not summary.get("target_met") else ""
    text = (f"{summary['status']}{why}: {summary['rounds']} training round(s), successes {summary['successes']}, "
            f"{summary['data_points']} rows, {summary['sims_launched']} sims ({summary['sims_failed']} failed), "
            f"{summary['wall_s']:.1f} s{model}. Run dir: {summary['run_dir']}")
    return {"mlflow.note.content": text, "campaign.status": str(summary["status"]),
            "campaign.run_dir": str(summary["run_dir"])}
