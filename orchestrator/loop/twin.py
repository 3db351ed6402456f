"""Continual mode's driver: monitoring rounds, retraining on recent data, champion and challenger.

Runs after the campaign has met its target (:meth:`Campaign.run` hands over), on the
campaign's own sims, Dask workers, run directory and MLflow run, through the small
:class:`TwinPorts` interface. Each monitoring round:

1. advances ``{campaign_time}`` (the clock the sims see) and checks the champion
   -- and a pending challenger, on the same points -- at ``continual.checks`` fresh points;
2. with a challenger pending, decides (:func:`orchestrator.loop.continual.verdict`): the
   registry alias moves to it only when it wins;
3. applies the drift rule to the champion's checks; on drift, runs
   ``continual.generates`` generate sims and trains a challenger, warm-started from
   the champion, on the recent-data window only, and registers it as a new version.

Every completed step is checkpointed (``state.continual``); a signal cancels the
round in flight and a resume starts that round again. Decisions are the pure
functions of :mod:`orchestrator.loop.continual`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from orchestrator.config import LoopConfig
from orchestrator.loop import continual as ct
from orchestrator.runlog import (
    Challenger,
    Champion,
    Drift,
    Event,
    MonitorCheck,
    Retrain,
)

log = logging.getLogger(__name__)


class TwinPorts(Protocol):
    """What the driver needs from the campaign."""

    async def check_truth(self, x: list[float]) -> list[float] | None: ...
    async def generate(self, seed: int, lo: list[float], hi: list[float]) -> tuple[str, int] | None: ...
    async def evaluate(self, model: bytes, xs: list[list[float]]) -> list[list[float]]: ...
    async def train(self, model: bytes | None, files: list[str], seed: int) -> tuple[bytes, dict[str, float]]: ...
    async def register(self, model: bytes, key: str) -> str | None: ...
    async def set_champion(self, registered: str) -> None: ...
    def model_bytes(self, version: int) -> bytes: ...
    def save_model(self, model: bytes, metrics: dict[str, float], files: list[str]) -> int: ...
    def log(self, event: Event) -> None: ...
    def metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def note(self, text: str) -> None: ...
    def checked(self, x: list[float], truth: list[float], ok: bool, clock: int) -> None: ...
    def checkpoint(self) -> None: ...


@dataclass(frozen=True)
class RoundChecks:
    xs: list[list[float]]
    truths: list[list[float]]
    champion: list[float]
    challenger: list[float]


class Twin:
    """The continual phase of one campaign."""

    def __init__(self, cfg: LoopConfig, s: ct.ContinualState, ports: TwinPorts, rng: np.random.Generator,
                 elapsed: Callable[[], float]) -> None:
        self.cfg = cfg
        self.ccfg = cfg.continual
        self.s = s
        self.ports = ports
        self.rng = rng
        self.elapsed = elapsed
        self.lo = np.array([i.lo for i in cfg.inputs])
        self.hi = np.array([i.hi for i in cfg.inputs])

    def begin(self, champion_model: int, champion_registered: str | None, data: list[ct.DataFile]) -> None:
        """Enter the phase with the model that met the target as champion, and the data so far."""
        if self.s.active:
            return
        self.s.active = True
        self.s.data = [{"path": f.path, "rows": f.rows, "t": f.t} for f in data]
        self.s.started_elapsed_s = self.elapsed()
        self.s.champion_model = champion_model
        self.s.champion_registered = champion_registered
        self.ports.log(Champion(champion_model, champion_registered, self.s.clock, "target_met"))
        self.ports.checkpoint()

    async def run(self) -> None:
        """Monitoring rounds until the phase's round limit or time budget (cancel it to stop)."""
        if self.s.champion_registered is not None:
            await self.ports.set_champion(self.s.champion_registered)
        while not ct.phase_over(self.s, self.ccfg, self.elapsed()):
            saved, drawn = self.s.to_json(), dict(self.rng.bit_generator.state)
            try:
                await self.round()
            except asyncio.CancelledError:
                # A round counts only whole: a resume runs it again from its start, drawing the same
                # points and seeds (so its challenger is the one whose registration may have begun).
                self.s.__dict__.update(ct.ContinualState.from_json(saved).__dict__)
                self.rng.bit_generator.state = drawn
                raise
            if self.ccfg.cadence_s > 0 and not ct.phase_over(self.s, self.ccfg, self.elapsed()):
                await asyncio.sleep(self.ccfg.cadence_s)  # a timer, cancelled by a signal like the rest

    async def round(self) -> None:
        s = self.s
        clock = s.rounds_done + 1
        s.clock = clock  # the sims of this round see the new campaign time
        checks = await self._checks()
        self._record_checks(clock, checks)
        if s.challenger_model is not None:
            await self._decide(checks)
        elif ct.drift_detected(s.recent_failures, self.ccfg):
            s.drifting = True
            s.drift_events += 1
            rate = sum(s.recent_failures[-self.ccfg.drift_window:]) / self.ccfg.drift_window
            self.ports.log(Drift(clock, rate, self.ccfg.drift_window, s.champion_model))
            self.ports.note(f"drift at campaign time {clock}: {rate:.0%} of the champion's last "
                            f"{self.ccfg.drift_window} checks failed; retraining on recent data")
            self.ports.checkpoint()
            await self._retrain(clock)
        s.rounds_done += 1
        self.ports.checkpoint()

    async def _checks(self) -> RoundChecks:
        s = self.s
        assert s.champion_model is not None
        xs = [[float(v) for v in self.rng.uniform(self.lo, self.hi)] for _ in range(self.ccfg.checks)]
        champion = self.ports.model_bytes(s.champion_model)
        challenger = None if s.challenger_model is None else self.ports.model_bytes(s.challenger_model)
        jobs: list[Awaitable[Any]] = [asyncio.gather(*(self.ports.check_truth(x) for x in xs)),
                                      self.ports.evaluate(champion, xs)]
        if challenger is not None:
            jobs.append(self.ports.evaluate(challenger, xs))
        results = await asyncio.gather(*jobs)
        truths: list[list[float] | None] = results[0]
        kept = [i for i, t in enumerate(truths) if t is not None]
        good = [truths[i] for i in kept]
        return RoundChecks(
            [xs[i] for i in kept], [t for t in good if t is not None],
            [_error(results[1][i], truths[i]) for i in kept],
            [_error(results[2][i], truths[i]) for i in kept] if challenger is not None else [],
        )

    def _record_checks(self, clock: int, c: RoundChecks) -> None:
        s = self.s
        tol = self.cfg.target.tolerance
        for i, x in enumerate(c.xs):
            failed = c.champion[i] >= tol
            s.recent_failures.append(failed)
            self.ports.checked(x, c.truths[i], not failed, clock)
            self.ports.log(MonitorCheck(clock, x, c.truths[i], s.champion_model, c.champion[i], not failed,
                                        s.challenger_model, c.challenger[i] if c.challenger else None))
        s.recent_failures = s.recent_failures[-max(self.ccfg.drift_window, 1):]
        if c.champion:
            self.ports.metrics({"monitor_error": ct.mean_error(c.champion),
                                "monitor_failures": float(sum(e >= tol for e in c.champion))}, clock)

    async def _decide(self, c: RoundChecks) -> None:
        s = self.s
        assert s.challenger_model is not None
        result = ct.verdict(c.champion, c.challenger, self.ccfg)
        self.ports.log(Challenger(result.value, s.clock, s.challenger_model, s.challenger_registered,
                                  s.champion_model, ct.mean_error(c.champion), ct.mean_error(c.challenger), len(c.xs)))
        if result is ct.Verdict.PROMOTED:
            s.champion_model, s.champion_registered = s.challenger_model, s.challenger_registered
            s.promotions += 1
            if s.champion_registered is not None:
                await self.ports.set_champion(s.champion_registered)
            assert s.champion_model is not None
            self.ports.log(Champion(s.champion_model, s.champion_registered, s.clock, "promoted"))
        self.ports.note(f"challenger model {s.challenger_model} {result.value}: mean error "
                        f"{ct.mean_error(c.challenger):.4f} against the champion's {ct.mean_error(c.champion):.4f}")
        s.challenger_model = s.challenger_registered = None
        s.recent_failures = []
        s.drifting = False

    async def _retrain(self, clock: int) -> None:
        s = self.s
        assert s.champion_model is not None
        made = await asyncio.gather(*(self.ports.generate(int(self.rng.integers(2**31)),
                                                          [float(v) for v in self.lo], [float(v) for v in self.hi])
                                      for _ in range(self.ccfg.generates)))
        for item in made:
            if item is not None:
                s.data.append({"path": item[0], "rows": item[1], "t": time.time()})
        self.ports.checkpoint()
        window = ct.recent_window(s.data_files(), self.ccfg, time.time())
        files = [f.path for f in window]
        rows = sum(f.rows for f in window)
        model, metrics = await self.ports.train(self.ports.model_bytes(s.champion_model), files,
                                                int(self.rng.integers(2**31)))
        version = self.ports.save_model(model, metrics, files)
        # keyed by the round: a resumed round finds the version its cut-short registration made
        registered = await self.ports.register(model, f"challenger-c{clock}")
        s.challenger_model, s.challenger_registered = version, registered
        s.retrains += 1
        s.last_retrain = {"clock": clock, "model": version, "registered": registered, "files": files,
                          "rows": rows, "t": time.time()}
        self.ports.log(Retrain(clock, version, registered, files, rows, {k: float(v) for k, v in metrics.items()}))


def _error(predicted: list[float], truth: list[float] | None) -> float:
    assert truth is not None
    return max(abs(p - t) for p, t in zip(predicted, truth, strict=True))
