"""The campaign: one asyncio event loop wiring policy, launchers, trainer, store, tracker.

The coordinator never blocks: sim runs, Dask futures, the time budget and
signals are awaited together, and after every completed step the policy
(:mod:`orchestrator.policy`) decides what to start next. Every completed step
is written to the run directory before it counts, so a kill at any moment
loses no accepted data and no finished training (``run --resume``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from orchestrator import policy as pol
from orchestrator.allocation import SlotPool
from orchestrator.config import LoopConfig, flat_dict
from orchestrator.continual import ContinualState, DataFile
from orchestrator.errors import Interrupted, OrchestratorError, StoreError
from orchestrator.launchers.base import Launcher, SimResult
from orchestrator.pictures import Pictures
from orchestrator.progress import Progress, Snapshot
from orchestrator.runlog import (
    CampaignEnd,
    CampaignError,
    CampaignStart,
    Check,
    DataAccepted,
    Registering,
    State,
    Status,
    TrainEnd,
    TrainStart,
    build_summary,
)
from orchestrator.services import Services
from orchestrator.simrunner import SimRunner
from orchestrator.store import EVENTS, LOOP, RunStore
from orchestrator.tracksink import CLOSE_PATIENCE_S, TrackingSink
from orchestrator.training.backends import Backend, Trainer

if TYPE_CHECKING:
    from orchestrator.tracking import Tracker

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
SIGNALLED_CLOSE_S = 1.0
"""After a signal, how long MLflow may take to close the run (a busy database must not delay the exit)."""

__all__ = ["Campaign", "CampaignResult", "State", "Status", "TaskKind"]


class TaskKind(enum.Enum):
    """What an in-flight task of the campaign does."""

    CHECK = "check"
    PRECHECK = "precheck"
    GENERATE = "generate"
    TRAIN = "train"


@dataclass(frozen=True)
class CheckResult:
    x: list[float]
    version: int
    predicted: list[float] | None
    truth: list[float] | None
    prechecked: bool = False
    """The truth came from a check sim run ahead, while the model trained."""


@dataclass(frozen=True)
class PrecheckResult:
    x: list[float]
    truth: list[float] | None


@dataclass(frozen=True)
class GenerateResult:
    path: str | None
    """The accepted data file, relative to the run dir; None when every attempt failed."""
    rows: int = 0


@dataclass(frozen=True)
class TrainResult:
    model: bytes
    metrics: dict[str, float]


TaskResult = CheckResult | PrecheckResult | GenerateResult | TrainResult


@dataclass(frozen=True)
class CampaignResult:
    """How :meth:`Campaign.run` ended."""

    status: Status
    summary: dict[str, Any]


class Campaign:
    """One campaign, from a fresh or resumed run directory to its summary."""

    def __init__(
        self,
        cfg: LoopConfig,
        store: RunStore,
        binaries: Mapping[str, Path],
        launchers: Mapping[str, Launcher],
        pool: SlotPool,
        backend: Backend,
        tracker: Tracker | None = None,
        progress: Progress | None = None,
        state: State | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.launchers = launchers
        self.pool = pool
        self.backend = backend
        self.trainer = Trainer(backend, cfg.training, len(cfg.inputs), len(cfg.outputs))
        self.progress = progress or Progress(enabled=False)
        self.resumed = state is not None
        self.state = state or State()
        self.continual = ContinualState.from_json(self.state.continual)
        self.rng = np.random.default_rng(cfg.seed)
        if self.state.rng:
            self.rng.bit_generator.state = self.state.rng
        self.model_state: bytes | None = None
        if self.state.model_file:
            self.model_state = (store.root / self.state.model_file).read_bytes()
        self.lo = np.array([i.lo for i in cfg.inputs])
        self.hi = np.array([i.hi for i in cfg.inputs])
        self.sims = SimRunner(cfg, store, binaries, launchers, pool, self.state, self.progress, self._show,
                              clock=lambda: self.continual.clock)
        self.sink = TrackingSink(tracker, store, self.state, self.checkpoint)
        self.services = Services(backend, self.trainer, store, self.sink)
        self.pictures = Pictures(cfg, store.root, self.trainer, self.sink.upload, self.services.trainer_ready)
        self._tasks: dict[asyncio.Task[TaskResult], TaskKind] = {}
        self._training_files: set[str] = set()
        """Data files the in-flight training uses; they leave ``untrained`` only when it ends."""
        self._known: list[tuple[list[float], list[float] | None]] = []
        """Query points whose check sim already ran (prechecks), with their truth."""
        self._interrupt = asyncio.Event()
        self._signal: str | None = None
        self._t0 = time.monotonic()

    # -- bookkeeping ------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return self.state.elapsed_s + time.monotonic() - self._t0

    def _inflight(self, kind: TaskKind) -> int:
        return sum(1 for k in self._tasks.values() if k is kind)

    def view(self) -> pol.View:
        s = self.state
        return pol.View(
            model_version=s.model_version, training=self._inflight(TaskKind.TRAIN) > 0,
            checks_inflight=self._inflight(TaskKind.CHECK), failed_current=s.failed_current,
            checks_known=len(self._known), prechecks_inflight=self._inflight(TaskKind.PRECHECK),
            generates_inflight=self._inflight(TaskKind.GENERATE),
            untrained_runs=sum(1 for f in s.untrained if f not in self._training_files),
            successes=s.successes, data_points=s.data_points, elapsed_s=self.elapsed,
            trainer_ready=self.services.trainer_up,
        )

    def checkpoint(self) -> float:
        """Rewrite state.json (atomically) with the RNG and elapsed time; returns that elapsed time."""
        self.state.rng = dict(self.rng.bit_generator.state)
        self.state.continual = self.continual.to_json()
        snapshot = self.state.to_json()
        snapshot["elapsed_s"] = elapsed = self.elapsed
        snapshot["config"] = flat_dict(self.cfg)
        self.store.write_state(snapshot)
        return elapsed

    def _show(self) -> None:
        s = self.state
        self.progress.update(Snapshot(
            self.cfg.name, s.model_version, self.cfg.target.max_rounds, s.successes, self.cfg.target.successes,
            s.data_points, self._inflight(TaskKind.CHECK) + self._inflight(TaskKind.PRECHECK),
            self._inflight(TaskKind.GENERATE), self._inflight(TaskKind.TRAIN) > 0,
            s.sims_launched, s.sims_failed, s.last_error, self.elapsed,
        ))

    # -- actions ----------------------------------------------------------
    def _spawn(self, kind: TaskKind, coro: Coroutine[Any, Any, TaskResult]) -> None:
        self._tasks[asyncio.ensure_future(coro)] = kind

    def _random_point(self) -> list[float]:
        return [float(v) for v in self.rng.uniform(self.lo, self.hi)]

    def _next_query(self) -> tuple[list[float], list[float] | None]:
        """A failed point again first, then a point whose truth a precheck already knows."""
        if self.state.recheck:
            return self.state.recheck.pop(0), None
        if self._known:
            return self._known.pop(0)
        return self._random_point(), None

    def _values(self, x: list[float]) -> dict[str, float | int]:
        return {spec.name: v for spec, v in zip(self.cfg.inputs, x, strict=True)}

    @staticmethod
    def _truth_of(sim: SimResult | None, x: list[float]) -> list[float] | None:
        return None if sim is None or sim.table is None else [float(v) for v in sim.table[0, len(x):]]

    async def _precheck(self, x: list[float]) -> PrecheckResult:
        """The check sim at a future query point: its truth does not depend on the model."""
        return PrecheckResult(x, self._truth_of(await self.sims.run("check", self._values(x)), x))

    async def _check(self, x: list[float], version: int, model: bytes, known: list[float] | None) -> CheckResult:
        await self.services.trainer_ready()
        pred_task = asyncio.ensure_future(self.trainer.evaluate(model, [x]))
        try:
            sim = None if known is not None else await self.sims.run("check", self._values(x))
            predicted = (await pred_task)[0]
        except asyncio.CancelledError:
            if x in self.state.failed_points:  # a re-check: keep it for the resumed run
                self.state.recheck.insert(0, x)
            raise
        finally:
            pred_task.cancel()
        return CheckResult(x, version, predicted, known if known is not None else self._truth_of(sim, x),
                           prechecked=known is not None)

    async def _generate(self, seed: int, lo: list[float], hi: list[float]) -> GenerateResult:
        values: dict[str, float | int] = {"seed": seed}
        for spec, a, b in zip(self.cfg.inputs, lo, hi, strict=True):
            values[f"{spec.name}_lo"], values[f"{spec.name}_hi"] = a, b
        if len(self.cfg.inputs) == 1:
            values["lo"], values["hi"] = lo[0], hi[0]
        sim = await self.sims.run("generate", values)
        if sim is None or sim.table is None:
            return GenerateResult(None)
        path = self.store.accept_data(sim.request.run_id, sim.table)
        return GenerateResult(str(path.relative_to(self.store.root)), int(sim.table.shape[0]))

    async def _train(self, files: list[str], seed: int) -> TrainResult:
        await self.services.trainer_ready()
        paths = [str(self.store.root / f) for f in files]
        self.store.log(TrainStart(self.state.model_version + 1, len(files), self.state.data_points,
                                  self.backend.describe().get("workers")))
        return TrainResult(*await self.trainer.train(self.model_state, paths, seed))

    def _apply(self, actions: list[pol.Action]) -> pol.StopReason | None:
        for action in actions:
            if isinstance(action, pol.Stop):
                return action.reason
            if isinstance(action, pol.StartTraining):
                files = list(self.state.data_files)
                self._training_files = set(files)
                self._spawn(TaskKind.TRAIN, self._train(files, int(self.rng.integers(2**31))))
            elif isinstance(action, pol.StartGenerates):
                for _ in range(action.count):
                    wlo, whi = pol.sampling_window(self.lo, self.hi, self.state.failed_points,
                                                   self.cfg.policy.sampling, self.cfg.policy.near_failures_width,
                                                   self.rng)
                    seed = int(self.rng.integers(2**31))
                    self._spawn(TaskKind.GENERATE,
                                self._generate(seed, [float(v) for v in wlo], [float(v) for v in whi]))
            elif isinstance(action, pol.StartChecks):
                assert self.model_state is not None
                for _ in range(action.count):
                    x, known = self._next_query()
                    self._spawn(TaskKind.CHECK, self._check(x, self.state.model_version, self.model_state, known))
            elif isinstance(action, pol.StartPrechecks):
                for _ in range(action.count):
                    self._spawn(TaskKind.PRECHECK, self._precheck(self._random_point()))
        return None

    # -- results ----------------------------------------------------------
    def _on_check(self, r: CheckResult) -> None:
        s = self.state
        if r.truth is None or r.predicted is None:
            self.store.log(Check(r.x, r.version, outcome="no_truth"))
            return
        error = max(abs(p - t) for p, t in zip(r.predicted, r.truth, strict=True))
        success = error < self.cfg.target.tolerance
        stale = r.version != s.model_version
        s.checks_done += 1
        s.last_error = error
        if not stale:
            if success:
                s.successes += 1
            else:
                s.failed_current = True
                s.failed_points.append(r.x)
                s.recheck.append(r.x)
        self.pictures.add_check(r.x, r.truth, success)
        self.store.log(Check(r.x, r.version, predicted=r.predicted, truth=r.truth, error=error, success=success,
                             stale=stale, successes=s.successes, prechecked=r.prechecked))
        mark = "ok  " if success else "FAIL"
        self.progress.note(f"check {mark} x={_fmt(r.x)} surrogate={_fmt(r.predicted)} truth={_fmt(r.truth)} "
                           f"error={error:.4f} (model v{r.version}, successes {s.successes}/"
                           f"{self.cfg.target.successes})")
        self.sink.metrics({"check_error": error, "successes": s.successes}, s.checks_done)

    def _on_precheck(self, r: PrecheckResult) -> None:
        if r.truth is not None:
            self._known.append((r.x, r.truth))

    def _on_generate(self, r: GenerateResult) -> None:
        if r.path is None:
            return
        self.state.data_files.append(r.path)
        self.state.untrained.append(r.path)
        self.state.data_points += r.rows
        self.store.log(DataAccepted(r.path, r.rows, self.state.data_points))

    def _on_train(self, r: TrainResult) -> None:
        s = self.state
        version = s.model_version + 1
        path = self.store.save_model(version, r.model)
        self.model_state = r.model
        s.model_version = version
        s.model_file = str(path.relative_to(self.store.root))
        s.failed_current = False
        s.untrained = [f for f in s.untrained if f not in self._training_files]
        self.pictures.round(version, r.model, [f for f in s.data_files if f in self._training_files],
                            f"{self.cfg.name}: round {version}, {s.data_points} rows")
        self._training_files = set()
        metrics = {**r.metrics, "data_points": s.data_points, "successes": s.successes,
                   "sims_launched": s.sims_launched, "sims_failed": s.sims_failed, "wall_s": round(self.elapsed, 3)}
        s.rounds.append({"round": version, **metrics})
        self.store.log(TrainEnd(version, extra=metrics))
        trained = int(metrics.get("n_samples", s.data_points))
        self.progress.note(f"training round {version} done: trained on {trained} rows ({s.data_points} accepted), "
                           f"rmse {metrics.get('train_rmse', float('nan')):.4g}, "
                           f"{metrics.get('train_seconds', 0):.1f} s")
        self.sink.metrics({f"round_{k}": float(v) for k, v in metrics.items()}, version)
        self.pictures.scalars({f"round/{k}": float(v) for k, v in metrics.items()}, version)

    def _collect(self, task: asyncio.Task[TaskResult]) -> None:
        result = task.result()  # a SimKindFailed or TrainingError propagates: the campaign stops
        if isinstance(result, CheckResult):
            self._on_check(result)
        elif isinstance(result, PrecheckResult):
            self._on_precheck(result)
        elif isinstance(result, GenerateResult):
            self._on_generate(result)
        else:
            self._on_train(result)
        self.checkpoint()

    # -- the loop ---------------------------------------------------------
    def _install_signals(self) -> Callable[[], None]:
        loop = asyncio.get_running_loop()

        def handler(sig: signal.Signals) -> None:
            self._signal = sig.name
            self._interrupt.set()

        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, handler, sig)

        def remove() -> None:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)

        return remove

    async def _cancel_all(self) -> None:
        """Cancel what is in flight; data a generate already stored still counts (it is on disk)."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for task in self._tasks:
            if not task.cancelled() and task.exception() is None and isinstance(task.result(), GenerateResult):
                self._on_generate(task.result())  # type: ignore[arg-type]
        self._tasks.clear()

    def _timeout(self) -> float | None:
        budget = self.cfg.target.time_budget_s
        return None if budget is None else max(0.0, budget - self.elapsed) + 0.01

    async def loop(self) -> pol.StopReason | None:
        """Decide, start, wait for the next completion; until a Stop or a signal (None)."""
        interrupt = asyncio.ensure_future(self._interrupt.wait())
        try:
            while not self._interrupt.is_set():
                reason = self._apply(pol.decide(self.view(), self.cfg.target, self.cfg.policy))
                self._show()
                if reason is not None:
                    return reason
                if not self._tasks and self.services.trainer_up:
                    raise StoreError("the policy started nothing and nothing is in flight (a bug); state saved")
                # Ready workers change what the policy may start; a failed start stops the campaign.
                starting = self.services.pending
                waiting: list[asyncio.Future[Any]] = [*self._tasks, interrupt, *starting]
                done, _ = await asyncio.wait(waiting, timeout=self._timeout(), return_when=asyncio.FIRST_COMPLETED)
                if interrupt in done:
                    return None
                for service in [f for f in starting if f in done]:
                    self.services.started(service)
                for task in [t for t in self._tasks if t in done]:
                    del self._tasks[task]
                    self._collect(task)
            return None
        finally:
            interrupt.cancel()

    async def run(self) -> CampaignResult:
        """The whole campaign: start everything, loop, end cleanly whatever happens.

        The signal handlers stay until the very end, so a signal during the shutdown is noted
        (and shortens it) instead of killing the coordinator with 143. A met target is
        committed as ``registering`` first and as ``target_met`` only once the model is
        registered; a resume of a ``registering`` run goes straight to the registration.
        """
        remove_signals = self._install_signals()
        status, reason, error, registered = Status.FAILED, None, None, None
        registering = self.state.status is Status.REGISTERING
        self.store.log(CampaignStart(self.resumed, str(self.store.root), self.cfg.seed, self.pool.free))
        try:
            try:
                await self.services.start(flat_dict(self.cfg))  # Dask and MLflow start while the first sims run
                reason = pol.StopReason.TARGET_MET if registering else await self.loop()
                if reason is pol.StopReason.TARGET_MET and self.cfg.continual.enabled and not registering:
                    reason = await self._keep_current()
                status = (Status.INTERRUPTED if reason is None
                          else Status.TARGET_MET if reason is pol.StopReason.TARGET_MET else Status.STOPPED)
                if status is Status.TARGET_MET:
                    status, registered = await self._register()
            except OrchestratorError as exc:
                error = exc
                self.store.log(CampaignError(type(exc).__name__, str(exc)))
                if exc.transient:  # a passing fault (a worker death, a locked database): resumable
                    status = Status.INTERRUPTED
                    error = Interrupted(f"{exc} (the run is resumable: python -m orchestrator run --resume "
                                        f"{self.store.root})")
            finally:
                if self._signal is None:  # after a signal the exit is prompt: pictures are not waited for
                    await self.pictures.drain()
                await self._cancel_all()
                await self.services.stop(SIGNALLED_CLOSE_S if self._signal else CLOSE_PATIENCE_S)
                if status in (Status.INTERRUPTED, Status.FAILED) and self.state.status is Status.REGISTERING:
                    status = Status.REGISTERING  # interrupted while registering: the resume finishes it
                self.state.stop_reason = reason.value if reason and status is not Status.REGISTERING else self._signal
                if status is not Status.TARGET_MET:
                    self.state.status = status
                self.checkpoint()
                for launcher in {id(x): x for x in self.launchers.values()}.values():
                    await launcher.close()
                await self._close_backend()
            summary = await self._finish(status, registered)
            # The commit point: only now does state.json say target_met (a kill before it leaves
            # `registering`, which a resume finishes without a second model version).
            self.state.status = status
            self.checkpoint()
        finally:
            remove_signals()
        if error is not None:
            raise error
        return CampaignResult(status, summary)

    async def _keep_current(self) -> pol.StopReason | None:
        """Continual mode (:mod:`orchestrator.twin`) until its end (TARGET_MET) or a signal (None)."""
        from orchestrator.twin import CampaignPorts, Twin

        twin = Twin(self.cfg, self.continual, CampaignPorts(self), self.rng, lambda: self.elapsed)
        if not self.continual.active:
            assert self.model_state is not None
            reg = await self.register_model(self.model_state)
            twin.begin(self.state.model_version, None if reg is None else reg["version"], self._data_so_far())
        task = asyncio.ensure_future(twin.run())
        interrupt = asyncio.ensure_future(self._interrupt.wait())
        try:
            await asyncio.wait([task, interrupt], return_when=asyncio.FIRST_COMPLETED)
        finally:
            interrupt.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            return None
        task.result()
        return pol.StopReason.TARGET_MET

    def _data_so_far(self) -> list[DataFile]:
        out = []
        for f in self.state.data_files:
            path = self.store.root / f
            out.append(DataFile(f, int(np.load(path, mmap_mode="r").shape[0]), path.stat().st_mtime))
        return out

    async def register_model(self, model: bytes) -> dict[str, str] | None:
        """Register ``model`` under ``tracking.register_as``, from a Dask worker (None without tracking)."""
        name = self.cfg.tracking.register_as
        if not self.sink.enabled or not name:
            return None
        await self.services.trainer_ready()
        return await self.sink.register(self.trainer, model, name)

    async def _close_backend(self) -> None:
        """Close the Dask backend; after a signal at most SIGNALLED_CLOSE_S (the exit must be prompt:
        what is still closing then is ended by the process guardian once the coordinator exits)."""
        if self._signal is None:
            await self.backend.close()
            return
        try:
            await asyncio.wait_for(self.backend.close(), SIGNALLED_CLOSE_S)
        except TimeoutError:
            log.warning("the Dask backend did not close within %.1f s of the signal; the process guardian "
                        "ends its processes", SIGNALLED_CLOSE_S)

    async def _register(self) -> tuple[Status, dict[str, str] | None]:
        """The target is met: the final model into MLflow's registry (from a Dask worker: torch lives there).

        state.json says ``registering`` while it runs; a signal interrupts it (the resume registers,
        and the registry never gets a second version from one MLflow run).
        """
        if self.continual.active:  # registered when the phase began; the champion is what counts
            c = self.continual
            return Status.TARGET_MET, (None if c.champion_registered is None else {
                "name": str(self.cfg.tracking.register_as), "version": c.champion_registered})
        name = self.cfg.tracking.register_as
        if not self.sink.enabled or not name or self.model_state is None:
            return Status.TARGET_MET, None
        self.state.status = Status.REGISTERING
        self.checkpoint()
        self.store.log(Registering(name))
        task = asyncio.ensure_future(self.sink.register(self.trainer, self.model_state, name))
        interrupt = asyncio.ensure_future(self._interrupt.wait())
        try:
            await asyncio.wait([task, interrupt], return_when=asyncio.FIRST_COMPLETED)
        finally:
            interrupt.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            return Status.INTERRUPTED, None
        return Status.TARGET_MET, task.result()

    async def _finish(self, status: Status, registered: dict[str, str] | None) -> dict[str, Any]:
        # The same wall time in state.json (`status`, `report`) as in the summary.
        wall = self.checkpoint()
        summary = build_summary(dataclasses.replace(self.state, status=status), wall, str(self.store.root), registered)
        path = self.store.write_summary(summary)
        self.store.log(CampaignEnd(extra={k: v for k, v in summary.items() if k != "run_dir"}))
        self.store.close()
        artifacts = [self.store.root / LOOP, self.store.root / EVENTS, path]
        if self.sink.enabled and self._signal is None:  # after a signal the exit is prompt: no picture
            artifacts.append(await asyncio.to_thread(self._timeline))
        await self.sink.close(status, artifacts, summary,
                              patience=SIGNALLED_CLOSE_S if self._signal else CLOSE_PATIENCE_S)
        return summary

    def _timeline(self) -> Path:
        """timeline.png in the run dir (what `report` draws), for the MLflow run; best effort."""
        out = self.store.root / "timeline.png"
        try:
            from orchestrator.report import plot_timeline

            plot_timeline(self.store.root, out)
        except Exception as exc:  # a picture is never worth failing the campaign's ending
            log.warning("campaign %s: no timeline picture: %s", self.cfg.name, exc)
        return out


def _fmt(v: list[float] | None) -> str:
    if v is None:
        return "-"
    return ",".join(f"{x:+.4f}" for x in v)
