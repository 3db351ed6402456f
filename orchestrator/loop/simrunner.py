"""Running one sim for the campaign: slots, retries with back-off, the run log.

The campaign asks for "a check sim at these values"; :class:`SimRunner` turns that
into attempts (each with its own run id, slots and directory), retries a failed
attempt after an exponential back-off, and stops the campaign
(:class:`SimKindFailed`) when one kind fails too often in a row.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.allocation import SlotPool
from orchestrator.config import ROLES, LoopConfig, Role, SimConfig, render_args
from orchestrator.errors import ResourceError, SimKindFailed
from orchestrator.launchers.base import Launcher, LaunchRequest, Outcome, SimResult
from orchestrator.loop.acceptance import refused_rows
from orchestrator.loop.diskfull import disk_full_error, full, says_full
from orchestrator.progress import Progress
from orchestrator.rundeck import write_points
from orchestrator.runlog import SimEnd, SimStart, State
from orchestrator.store import RunStore

log = logging.getLogger(__name__)


class SimRunner:
    """Attempts of check and generate sims, with retries; counts go into the campaign's state."""

    def __init__(
        self, cfg: LoopConfig, store: RunStore, binaries: Mapping[str, Path], launchers: Mapping[str, Launcher],
        pool: SlotPool, state: State, progress: Progress, on_launch: Callable[[], None],
        fits: Callable[[str], bool] = lambda role: True, on_end: Callable[[str, SimResult], None] | None = None,
        clock: Callable[[], int] = lambda: 0, reference: Callable[[], np.ndarray] | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.binaries = binaries
        self.launchers = launchers
        self.pool = pool
        self.state = state
        self.progress = progress
        self.on_launch = on_launch
        self.fits = fits
        """Whether a run of a role may start now (walltime): an attempt that does not fit is not made."""
        self.on_end = on_end
        self.clock = clock
        """``{campaign_time}`` for the sims' args: continual mode's monitoring round (0 before it)."""
        self.reference = reference or (lambda: np.empty((0, len(cfg.outputs))))
        """The outputs of the data accepted so far, for the outlier rule (:mod:`orchestrator.loop.acceptance`)."""
        self._consecutive_failures = dict.fromkeys(ROLES, 0)
        self._ever_ok = dict.fromkeys(ROLES, False)
        self._column_mismatches: dict[str, list[int]] = {role: [] for role in ROLES}

    async def run(self, role: Role, values: Mapping[str, float | int], points: np.ndarray | None = None
                  ) -> SimResult | None:
        """Run one sim with retries; None when every attempt failed. ``points``: the points a
        generate run must evaluate (written to its ``{points_file}``); it returns one row each."""
        sim = self.cfg.sims.of(role)
        last: SimResult | None = None
        for attempt in range(sim.retries + 1):
            if attempt:
                await asyncio.sleep(sim.backoff_s * 2 ** (attempt - 1))
            last = await self._attempt(role, sim, values, attempt, points)
            if last is None:  # it would not end before the allocation does
                return None
            if last.info.get("allocation_gone"):
                return None  # the campaign stops (its on_end saw it): no retry, not the sim kind's failure
            if last.ok:
                self._consecutive_failures[role] = 0
                self._ever_ok[role] = True
                return last
            self._stop_if_disk_full(last)
            self._failed(role, sim, last)
        return None

    def _stop_if_disk_full(self, last: SimResult) -> None:
        """A sim that failed on a full disk is not the sim's fault: the campaign stops, resumable,
        instead of retrying into the same wall (and calling the sim kind broken)."""
        said = f"{last.message} {last.info.get('log_error') or ''}"
        if full(self.store.root) or says_full(said):
            raise disk_full_error(self.store.root, f"sim {last.request.run_id} failed on it: {last.message}")

    def _failed(self, role: Role, sim: SimConfig, last: SimResult) -> None:
        self._consecutive_failures[role] += 1
        self._stop_if_columns_never_fit(role, sim, last)
        if self._consecutive_failures[role] >= sim.max_consecutive_failures:
            raise SimKindFailed(
                f"sim kind {role!r} ({sim.binary}) failed {self._consecutive_failures[role]} times in a row; "
                f"last failure ({last.request.run_id}): {last.message}"
            )

    def _stop_if_columns_never_fit(self, role: Role, sim: SimConfig, last: SimResult) -> None:
        """A sim that has never returned the declared columns, and twice in a row returned the same
        other count, disagrees with loop.yml: retrying cannot help (a sim that worked before may
        have a passing fault, and is retried as usual)."""
        seen = self._column_mismatches[role]
        got = last.info.get("columns_returned")
        if got is None or self._ever_ok[role]:
            seen.clear()
            return
        seen.append(int(got))
        if len(seen) >= 2 and seen[-1] == seen[-2]:
            names = ", ".join([*self.cfg.input_names, *self.cfg.outputs])
            raise SimKindFailed(
                f"sim kind {role!r} ({sim.binary}) returns {got} columns but loop.yml declares "
                f"{self.cfg.n_columns} ({names}): fix `inputs`/`outputs` or the sim (not retried: every run "
                f"so far returned {got}; last: {last.request.run_id})"
            )

    def _screen(self, result: SimResult) -> None:
        """Refuse the rows that would poison the training (``acceptance``): they are dropped and
        counted in the run's sim_end event; a run left with none is malformed (retried as usual)."""
        if not result.ok or result.table is None:
            return
        acc = self.cfg.acceptance
        refusal = refused_rows(result.table, len(self.cfg.inputs), self.cfg.outputs, self.reference(),
                               ranges=acc.ranges, max_abs=acc.max_abs, outlier_k=acc.outlier_k)
        if refusal is None:
            return
        rows = int(result.table.shape[0])
        result.info.update(refused_rows=refusal.count, refused=refusal.reason)
        log.warning("sim %s: %d of %d rows refused: %s", result.request.run_id, refusal.count, rows, refusal.reason)
        if refusal.count == rows:
            result.outcome, result.table = Outcome.MALFORMED, None
            result.message = f"every row refused (acceptance): {refusal.reason}"
        else:
            result.table = result.table[~refusal.rows]

    def _request(self, role: Role, sim: SimConfig, values: Mapping[str, float | int], attempt: int,
                 points: np.ndarray | None = None) -> LaunchRequest:
        self.state.launch_counter += 1
        run_id = f"{role}-{self.state.launch_counter:06d}"
        fields: dict[str, Any] = {**values, "run_id": self.state.launch_counter, "attempt": attempt,
                                  "ranks": sim.ranks, "campaign_time": self.clock()}
        nrows = 1 if role == "check" else None
        if points is not None:  # the file for {points_file}; the points themselves for templates
            workdir = self.store.sim_dir(run_id)
            workdir.mkdir(parents=True, exist_ok=True)
            fields["points_file"] = str(write_points(workdir / "points.txt", points))
            fields["points"] = points.tolist()
            nrows = int(points.shape[0])
        return LaunchRequest(
            run_id=run_id, role=role, binary=self.binaries[role], args=render_args(sim.args, fields),
            ranks=sim.ranks, workdir=self.store.sim_dir(run_id), timeout_s=sim.timeout_s,
            ncols=self.cfg.n_columns, nrows=nrows, ranks_per_node=sim.ranks_per_node,
            env=sim.env, fields=fields,
        )

    async def _attempt(
        self, role: Role, sim: SimConfig, values: Mapping[str, float | int], attempt: int,
        points: np.ndarray | None = None,
    ) -> SimResult | None:
        """One attempt; None when, once its slots are free, it no longer fits in the allocation's time."""
        try:
            placement = await self.pool.acquire(sim.ranks, per_node=sim.ranks_per_node)
        except ValueError as exc:
            raise ResourceError(f"sims.{role}: {exc}") from exc
        if not self.fits(role):
            self.pool.release(placement)
            return None
        req = self._request(role, sim, values, attempt, points)
        try:
            req = dataclasses.replace(req, placement=placement)
            launcher = self.launchers[role]
            self.state.sims_launched += 1
            self.store.log(SimStart(req.run_id, role, attempt, sim.ranks, launcher.name, placement.per_node,
                                    launcher.command(req)))
            self.on_launch()
            try:
                result = await launcher.run(req)
            except asyncio.CancelledError:
                self.store.log(SimEnd(req.run_id, role, Outcome.CANCELLED.value))
                raise
        finally:
            self.pool.release(placement)
        self._screen(result)
        if self.on_end is not None:
            self.on_end(role, result)
        if not result.ok:
            self.state.sims_failed += 1
            log.info("sim %s: %s: %s", req.run_id, result.outcome.value, result.message)  # progress shows it
            self.progress.note(f"sim {req.run_id} {result.outcome.value}: {result.message.splitlines()[0][:160]}")
        self.store.log(SimEnd(
            req.run_id, role, result.outcome.value, attempt=attempt, returncode=result.returncode,
            wall_s=round(result.wall_s, 4), message=result.message,
            rows=None if result.table is None else int(result.table.shape[0]), extra=dict(result.info),
        ))
        return result

