"""The campaign: one asyncio event loop wiring policy, launchers, trainer, store, tracker.

The coordinator never blocks: sim runs, Dask futures, the time budget and
signals are awaited together, and after every completed step the policy
(:mod:`orchestrator.policy`) decides what to start next. Every completed step
is written to the run directory before it counts, so a kill at any moment
loses no accepted data and no finished training (``run --resume``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from orchestrator import policy as pol
from orchestrator import sampling
from orchestrator.allocation import SlotPool
from orchestrator.certify import Verdict
from orchestrator.config import LoopConfig, flat_dict
from orchestrator.errors import DiskFull, Interrupted, OrchestratorError, StoreError, TrainingDiverged, TrainingError
from orchestrator.launchers.base import Launcher, SimResult
from orchestrator.loop.continual import ContinualState, DataFile
from orchestrator.loop.diskfull import disk_full_error, full, is_full_error
from orchestrator.loop.pictures import Pictures
from orchestrator.loop.services import Services
from orchestrator.loop.simrunner import SimRunner
from orchestrator.loop.tracksink import CLOSE_PATIENCE_S, TrackingSink, evidence_metrics
from orchestrator.loop.twin import Twin, TwinPorts
from orchestrator.loop.walltime import WalltimeGuard
from orchestrator.progress import Progress, Snapshot
from orchestrator.runlog import (
    CampaignEnd,
    CampaignError,
    CampaignStart,
    Check,
    DataAccepted,
    Event,
    Registering,
    Scores,
    State,
    Status,
    TrainEnd,
    TrainFailed,
    TrainStart,
    WalltimeSkip,
    build_summary,
)
from orchestrator.slurm import JobWatch
from orchestrator.store import EVENTS, LOOP, AcceptedRows, RunStore
from orchestrator.training.backends import Backend, Trainer

if TYPE_CHECKING:
    from orchestrator.tracking import Tracker

log = logging.getLogger(__name__)
_T = TypeVar("_T")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
MAX_DIVERGED = 3
"""Training rounds in a row whose loss went non-finite before the campaign stops."""
ALLOCATION_GONE = "allocation_gone"
"""The stop reason when the Slurm job ended under the campaign (scancel, a node failure)."""
SIGNALLED_CLOSE_S = 1.0
"""After a signal, how long MLflow may take to close the run (a busy database must not delay the exit)."""

__all__ = ["Campaign", "CampaignParts", "CampaignResult", "State", "Status", "TaskKind"]


class TaskKind(enum.Enum):
    """What an in-flight task of the campaign does."""

    CHECK = "check"
    PRECHECK = "precheck"
    GENERATE = "generate"
    TRAIN = "train"
    SCORE = "score"
    """The ensemble on the candidate pool, for the sampling strategy."""


@dataclass(frozen=True)
class CheckResult:
    x: list[float]
    version: int
    predicted: list[float] | None
    truth: list[float] | None
    prechecked: bool = False
    """The truth came from a check sim run ahead, while the model trained."""
    spread: list[float] | None = None
    """The ensemble members' spread (standard deviation) at x, per output; None for one model."""
    run_id: str | None = None
    """The check sim's run id (names the row's file when it joins the training data)."""


@dataclass(frozen=True)
class PrecheckResult:
    x: list[float]
    truth: list[float] | None
    run_id: str | None = None


@dataclass(frozen=True)
class GenerateResult:
    path: str | None
    """The accepted data file, relative to the run dir; None when every attempt failed."""
    rows: int = 0


@dataclass(frozen=True)
class TrainResult:
    members: list[bytes]
    """One state per ensemble member (one for a single model)."""
    metrics: dict[str, float]
    diverged: str | None = None
    """The round's loss went non-finite (its message): no new model, the campaign goes on."""


@dataclass(frozen=True)
class ScoreResult:
    version: int


TaskResult = CheckResult | PrecheckResult | GenerateResult | TrainResult | ScoreResult


@dataclass(frozen=True)
class CampaignResult:
    """How :meth:`Campaign.run` ended."""

    status: Status
    summary: dict[str, Any]


@dataclass(frozen=True)
class CampaignParts:
    """What a campaign is given, finished: :func:`orchestrator.runner.build_campaign` builds it,
    for ``run``, ``--resume``, ``--steps``, continual mode and the benchmarks alike."""

    binaries: Mapping[str, Path]
    launchers: Mapping[str, Launcher]
    pool: SlotPool
    backend: Backend
    trainer: Trainer
    sampler: sampling.Sampler
    tracker: Tracker | None = None
    walltime: WalltimeGuard | None = None
    """With its durations already restored from the run's state."""
    model: bytes | None = None
    """The current model of a resumed run."""
    members: list[bytes] = dataclasses.field(default_factory=list)
    """The current ensemble members of a resumed run (the model alone for one model)."""
    check_draw: sampling.CheckDraw | None = None
    """Draws a check point (``target.check_points``); None: uniform over the domain."""
    job_watch: JobWatch | None = None
    """Inside Slurm: tells when the allocation itself is gone (scancel), which no signal reports."""


class Campaign:
    """One campaign, from a fresh or resumed run directory to its summary."""

    def __init__(
        self, cfg: LoopConfig, store: RunStore, parts: CampaignParts, state: State, *, resumed: bool,
        progress: Progress | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.launchers = parts.launchers
        self.pool = parts.pool
        self.backend = parts.backend
        self.trainer = parts.trainer
        self.progress = progress or Progress(enabled=False)
        self.resumed = resumed
        self.state = state
        self.continual = ContinualState.from_json(self.state.continual)
        self.rng = np.random.default_rng(cfg.seed)
        if self.state.rng:
            self.rng.bit_generator.state = self.state.rng
        self.model_state: bytes | None = parts.model
        self.members: list[bytes] = list(parts.members)
        self.sampler = parts.sampler
        self._check_draw = parts.check_draw
        self._scoring: asyncio.Task[TaskResult] | None = None
        self._rows = AcceptedRows(store.root, cfg.n_columns)
        self.lo = np.array([i.lo for i in cfg.inputs])
        self.hi = np.array([i.hi for i in cfg.inputs])
        self.walltime = parts.walltime
        self._out_of_time = False
        """A sim was not started because it would overrun the allocation."""
        self.sims = SimRunner(cfg, store, parts.binaries, parts.launchers, parts.pool, self.state, self.progress,
                              self._show,
                              fits=self._fits, on_end=self._sim_ended,
                              clock=lambda: self.continual.clock, reference=lambda: self._data_xy()[1])
        self.sink = TrackingSink(parts.tracker, store, self.state, self.checkpoint)
        self.services = Services(parts.backend, self.trainer, store, self.sink)
        self.pictures = Pictures(cfg, store.root, self.trainer, self.sink.upload, self.services.trainer_ready)
        self._tasks: dict[asyncio.Task[TaskResult], TaskKind] = {}
        self._counts: Counter[TaskKind] = Counter()
        """Tasks in flight per kind (kept with ``_tasks``, so the view costs the same at any scale)."""
        self._finished: deque[asyncio.Task[TaskResult]] = deque()
        """Tasks done and not yet collected, in completion order."""
        self._finished_event = asyncio.Event()
        self._untrained_in_training = 0
        """How many of ``state.untrained`` the in-flight training uses."""
        self._training_files: set[str] = set()
        """Data files the in-flight training uses; they leave ``untrained`` only when it ends."""
        self._known: list[tuple[list[float], list[float], str | None]] = []
        """Query points whose check sim already ran (prechecks), with their truth and run id."""
        self._dropped: set[asyncio.Task[TaskResult]] = set()
        """Checks cancelled when their version was decided (awaited at the end)."""
        self._check_slots = max(1, parts.pool.capacity // max(1, cfg.sims.check.ranks))
        if not self.state.evidence:
            self._update_evidence()
        self._interrupt = asyncio.Event()
        self._signal: str | None = None
        self._diverged = 0
        """Training rounds that diverged in a row."""
        self.job_watch = parts.job_watch
        """Inside Slurm: tells when the allocation itself is gone (scancel), which no signal reports."""
        self._t0 = time.monotonic()

    # -- bookkeeping ------------------------------------------------------
    @property
    def _successes_needed(self) -> int:
        plan = pol.plan(self.cfg.target)
        return self.cfg.target.successes if plan is None else plan.passes_needed

    @property
    def elapsed(self) -> float:
        return self.state.elapsed_s + time.monotonic() - self._t0

    def _inflight(self, kind: TaskKind) -> int:
        return self._counts[kind]

    def view(self) -> pol.View:
        s = self.state
        return pol.View(
            model_version=s.model_version, training=self._inflight(TaskKind.TRAIN) > 0,
            checks_inflight=self._inflight(TaskKind.CHECK), failed_current=s.failed_current,
            checks_known=len(self._known), prechecks_inflight=self._inflight(TaskKind.PRECHECK),
            generates_inflight=self._inflight(TaskKind.GENERATE),
            untrained_runs=len(s.untrained) - self._untrained_in_training,
            successes=s.successes, data_points=s.data_points, elapsed_s=self.elapsed,
            trainer_ready=self.services.trainer_up, failures_current=s.version_failed,
            check_slots=self._check_slots,
        )

    def checkpoint(self, elapsed: float | None = None) -> float:
        """Rewrite state.json (atomically) with the RNG and elapsed time (now, or as given); returns it."""
        self.state.rng = dict(self.rng.bit_generator.state)
        self.state.continual = self.continual.to_json()
        self.state.sampling_rng = self.sampler.rng_state()
        snapshot = self.state.to_json()
        snapshot["elapsed_s"] = elapsed = self.elapsed if elapsed is None else elapsed
        snapshot["config"] = flat_dict(self.cfg)
        if self.store.full_error is not None:  # an event did not fit: stop at the last state that did
            raise disk_full_error(self.store.root, self.store.full_error)
        self.store.write_state(snapshot)
        return elapsed

    def _show(self) -> None:
        s = self.state
        self.progress.update(Snapshot(
            self.cfg.name, s.model_version, self.cfg.target.max_rounds, s.successes, self._successes_needed,
            s.data_points, self._inflight(TaskKind.CHECK) + self._inflight(TaskKind.PRECHECK),
            self._inflight(TaskKind.GENERATE), self._inflight(TaskKind.TRAIN) > 0,
            s.sims_launched, s.sims_failed, s.last_error, self.elapsed, starting=not self.services.trainer_up,
        ))

    # -- actions ----------------------------------------------------------
    def _spawn(self, kind: TaskKind, coro: Coroutine[Any, Any, TaskResult]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks[task] = kind
        self._counts[kind] += 1
        task.add_done_callback(self._on_done)

    def _on_done(self, task: asyncio.Task[TaskResult]) -> None:
        self._finished.append(task)
        self._finished_event.set()

    def _forget(self, task: asyncio.Task[TaskResult]) -> bool:
        kind = self._tasks.pop(task, None)
        if kind is None:
            return False
        self._counts[kind] -= 1
        return True

    # -- walltime ---------------------------------------------------------
    def _fits(self, role: str) -> bool:
        """A run of ``role`` is expected to end before the campaign must be out."""
        if self.walltime is None or self.walltime.fits(role):
            return True
        if not self._out_of_time:
            expected, left = self.walltime.durations.expected(role), self.walltime.remaining()
            log.info("sims.%s: expected %.1f s, %.1f s left before the allocation's exit time: not started",
                     role, expected or 0.0, left)
            self.store.log(WalltimeSkip(role, expected, round(left, 3)))
        self._out_of_time = True
        return False

    def _sim_ended(self, role: str, result: SimResult) -> None:
        if result.info.get("allocation_gone"):
            self._allocation_gone(f"srun says so ({result.request.run_id}: {result.message.splitlines()[0][-120:]})")
        if self.walltime is not None:
            self.walltime.durations.observe(role, result.wall_s)
            self.state.sim_durations = self.walltime.durations.to_json()

    def _walltime_over(self) -> bool:
        """Out of time: past the exit time, or nothing useful fits and nothing is in flight."""
        if self.walltime is None:
            return False
        return self.walltime.remaining() <= 0 or (self._out_of_time and not self._tasks)

    # -- actions ----------------------------------------------------------

    def draw_check_point(self, rng: np.random.Generator) -> list[float]:
        """A check point: fresh, independent, drawn from ``rng`` (the campaign's, or a step's) uniformly over
        the domain, the distribution the certified statement is about, or by the user's own
        ``target.check_points`` (the statement then speaks of that distribution)."""
        if self._check_draw is not None:
            return self._check_draw(rng)
        return [float(v) for v in rng.uniform(self.lo, self.hi)]

    def _next_query(self) -> tuple[list[float], list[float] | None, str | None]:
        """A failed point again first, then a point whose truth a precheck already knows."""
        if self.state.recheck:
            return self.state.recheck.pop(0), None, None
        if self._known:
            return self._known.pop(0)
        return self.draw_check_point(self.rng), None, None

    def _values(self, x: list[float]) -> dict[str, float | int]:
        return {spec.name: v for spec, v in zip(self.cfg.inputs, x, strict=True)}

    @staticmethod
    def _truth_of(sim: SimResult | None, x: list[float]) -> list[float] | None:
        return None if sim is None or sim.table is None else [float(v) for v in sim.table[0, len(x):]]

    async def _precheck(self, x: list[float]) -> PrecheckResult:
        """The check sim at a future query point: its truth does not depend on the model."""
        sim = await self.sims.run("check", self._values(x))
        return PrecheckResult(x, self._truth_of(sim, x), None if sim is None else sim.request.run_id)

    async def _check(self, x: list[float], version: int, members: list[bytes], known: list[float] | None,
                     known_id: str | None = None) -> CheckResult:
        await self.services.trainer_ready()
        pred_task = asyncio.ensure_future(self.trainer.evaluate_ensemble(members, [x]))
        try:
            sim = None if known is not None else await self.sims.run("check", self._values(x))
            means, spreads = await asyncio.shield(pred_task)
            predicted, spread = means[0], spreads[0]
        except asyncio.CancelledError:
            if x in self.state.failed_points:  # a re-check: keep it for the resumed run
                self.state.recheck.insert(0, x)
            raise
        finally:
            # Never cancelled (a check is cancelled when its version is decided): cancelling one awaiter of a
            # Dask result cancels the client's gather that other results share, a training's included. The
            # evaluation is short; its result is dropped.
            if not pred_task.done():
                pred_task.add_done_callback(_drop_result)
        return CheckResult(x, version, predicted, known if known is not None else self._truth_of(sim, x),
                           prechecked=known is not None, spread=spread if len(members) > 1 else None,
                           run_id=known_id if sim is None else sim.request.run_id)

    async def _generate(self, seed: int, lo: list[float], hi: list[float], points: np.ndarray | None = None
                        ) -> GenerateResult:
        values: dict[str, float | int] = {"seed": seed}
        for spec, a, b in zip(self.cfg.inputs, lo, hi, strict=True):
            values[f"{spec.name}_lo"], values[f"{spec.name}_hi"] = a, b
        if len(self.cfg.inputs) == 1:
            values["lo"], values["hi"] = lo[0], hi[0]
        sim = await self.sims.run("generate", values, points=points)
        if sim is None or sim.table is None:
            return GenerateResult(None)
        path = self.store.accept_data(sim.request.run_id, sim.table)
        return GenerateResult(str(path.relative_to(self.store.root)), int(sim.table.shape[0]))

    async def _generate_chosen(self, seed: int) -> GenerateResult:
        """A generate run whose points (or window) the sampling strategy chooses, once the
        current model's scores on the candidate pool are in."""
        if self._scoring is not None and not self._scoring.done():
            await asyncio.shield(self._scoring)
        x, y = self._data_xy()
        s = self.state
        if not self.cfg.chosen_points:
            wlo, whi = self.sampler.window(x, y, s.failed_points, s.model_version)
            return await self._generate(seed, [float(v) for v in wlo], [float(v) for v in whi])
        points = self.sampler.choose(self.cfg.points_per_generate, x, y, s.failed_points, s.model_version)
        key = f"{seed}-{id(points)}"
        self.sampler.pending[key] = points
        try:
            return await self._generate(seed, [float(v) for v in self.lo], [float(v) for v in self.hi], points)
        finally:
            self.sampler.pending.pop(key, None)

    # -- the public port: what `--steps` and continual mode use ---------------
    async def generate(self, seed: int, lo: list[float] | None = None, hi: list[float] | None = None
                       ) -> GenerateResult:
        """One generate sim (retries included), its rows accepted into ``data/`` (not yet counted in the
        state). Over the window [lo, hi] (default: the domain); a sim that takes chosen points gets
        ``policy.points_per_run`` points drawn uniformly from the window with ``seed``."""
        lo = [float(v) for v in self.lo] if lo is None else lo
        hi = [float(v) for v in self.hi] if hi is None else hi
        if not self.cfg.chosen_points:
            return await self._generate(seed, lo, hi)
        rng = np.random.default_rng(seed)
        points = rng.uniform(lo, hi, size=(self.cfg.points_per_generate, len(lo)))
        return await self._generate(seed, [float(v) for v in self.lo], [float(v) for v in self.hi], points)

    async def check_truth(self, x: list[float]) -> list[float] | None:
        """The check sim's truth at ``x`` (None when every attempt failed)."""
        return self._truth_of(await self.sims.run("check", self._values(x)), x)

    async def close(self) -> None:
        """End, outside :meth:`run` (``--steps``), what the campaign was given: its launchers, the Dask
        backend and the MLflow run."""
        for launcher in {id(x): x for x in self.launchers.values()}.values():
            await launcher.close()
        await self.backend.close()
        if self.sink.tracker is not None:
            await asyncio.to_thread(self.sink.tracker.finish, "FINISHED")

    def ports(self) -> TwinPorts:
        """The campaign as continual mode's driver sees it."""
        return CampaignPorts(self)

    def _data_xy(self) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and outputs of every accepted row (for the sampling strategy)."""
        data = self._rows.read(self.state.data_files)
        n_in = len(self.cfg.inputs)
        return data[:, :n_in], data[:, n_in:]

    async def _score(self, version: int, members: list[bytes]) -> ScoreResult:
        """The ensemble on a fresh candidate pool: what the strategy chooses from next."""
        candidates = self.sampler.draw_candidates()
        await self.services.trainer_ready()
        mean, spread = await self.trainer.evaluate_ensemble(members, candidates.tolist())
        scores = sampling.Scores(version, candidates, np.asarray(mean), np.asarray(spread))
        self.sampler.scores = scores
        stats = {"pool_spread_mean": float(scores.spread.mean()), "pool_spread_max": float(scores.spread.max())}
        self.store.log(Scores(version, int(candidates.shape[0]), **stats))
        self.sink.metrics({f"round_{k}": v for k, v in stats.items()}, version)
        return ScoreResult(version)

    def _start_scoring(self) -> None:
        if self.sampler.wants_scores and self.members:
            self._scoring = asyncio.ensure_future(self._score(self.state.model_version, list(self.members)))
            self._tasks[self._scoring] = TaskKind.SCORE

    async def _train(self, files: list[str], seed: int) -> TrainResult:
        await self.services.trainer_ready()
        paths = [str(self.store.root / f) for f in files]
        size = self.cfg.policy.ensemble_size
        self.store.log(TrainStart(self.state.model_version + 1, len(files), self.state.data_points,
                                  self.backend.describe().get("workers"), members=size))
        try:
            if size == 1:
                model, metrics = await self.trainer.train(self.model_state, paths, seed)
                return TrainResult([model], metrics)
            members: list[bytes | None] = list(self.members) if len(self.members) == size else [None] * size
            return TrainResult(*await self.trainer.train_ensemble(members, paths, seed))
        except TrainingDiverged as exc:
            return TrainResult([], {}, diverged=str(exc))

    def _apply(self, actions: list[pol.Action]) -> pol.StopReason | None:
        for action in actions:
            if isinstance(action, pol.Stop):
                return action.reason
            if isinstance(action, pol.StartTraining):
                files = list(self.state.data_files)
                self._training_files = set(files)
                self._untrained_in_training = len(self.state.untrained)
                self._spawn(TaskKind.TRAIN, self._train(files, int(self.rng.integers(2**31))))
            elif isinstance(action, pol.StartGenerates) and sampling.chooses(self.cfg):
                for _ in range(action.count):
                    self._spawn(TaskKind.GENERATE, self._generate_chosen(int(self.rng.integers(2**31))))
            elif isinstance(action, pol.StartGenerates):
                for _ in range(action.count if self._fits("generate") else 0):
                    wlo, whi = pol.sampling_window(self.lo, self.hi, self.state.failed_points,
                                                   self.cfg.policy.sampling, self.cfg.policy.near_failures_width,
                                                   self.rng)
                    seed = int(self.rng.integers(2**31))
                    self._spawn(TaskKind.GENERATE,
                                self._generate(seed, [float(v) for v in wlo], [float(v) for v in whi]))
            elif isinstance(action, pol.StartChecks):
                assert self.members
                for _ in range(action.count if self._fits("check") else 0):
                    x, known, known_id = self._next_query()
                    self._spawn(TaskKind.CHECK, self._check(x, self.state.model_version, list(self.members), known,
                                                            known_id))
            elif isinstance(action, pol.StartPrechecks):
                for _ in range(action.count if self._fits("check") else 0):
                    self._spawn(TaskKind.PRECHECK, self._precheck(self.draw_check_point(self.rng)))
        return None

    # -- results ----------------------------------------------------------
    def _on_check(self, r: CheckResult) -> None:
        s = self.state
        if r.truth is None or r.predicted is None:
            counted = self._count_check(r, False) if self.cfg.target.certified else False
            self.store.log(Check(r.x, r.version, outcome="no_truth", counted=counted or None))
            return
        error = max(abs(p - t) for p, t in zip(r.predicted, r.truth, strict=True))
        success = error < self.cfg.target.tolerance
        stale = r.version != s.model_version
        s.checks_done += 1
        s.last_error = error
        counted = self._count_check(r, success)
        data_file = self._keep_check_row(r)
        self.pictures.add_check(r.x, r.truth, success, version=r.version)
        spread = None if r.spread is None else max(r.spread)
        self.store.log(Check(r.x, r.version, predicted=r.predicted, truth=r.truth, error=error, success=success,
                             stale=stale, successes=s.successes, prechecked=r.prechecked, spread=spread,
                             counted=counted, version_passed=s.version_passed, version_failed=s.version_failed,
                             verdict=self._verdict().value if self.cfg.target.certified else None,
                             data_file=data_file))
        mark = "ok  " if success else "FAIL"
        shown = "" if spread is None else f" spread={spread:.4f}"
        self.progress.note(f"check {mark} x={_fmt(r.x)} surrogate={_fmt(r.predicted)} truth={_fmt(r.truth)} "
                           f"error={error:.4f}{shown} (model v{r.version}, successes {s.successes}/"
                           f"{self._successes_needed})")
        metrics = {"check_error": error, "successes": float(s.successes), "check_rows": float(s.check_rows)}
        if spread is not None:
            metrics["check_spread"] = spread
        self.sink.metrics(metrics, s.checks_done)

    def _verdict(self) -> Verdict:
        s = self.state
        return pol.check_verdict(s.version_passed, s.version_failed, self.cfg.target)

    def _count_check(self, r: CheckResult, success: bool) -> bool:
        """Count a check of the current version toward its verdict; False when it does not count
        (stale, or in flight when the version was decided)."""
        s = self.state
        if r.version != s.model_version:
            return False
        if self.cfg.target.certified:
            if self._verdict() is not Verdict.OPEN:
                return False
            if success:
                s.version_passed += 1
                s.successes = s.version_passed
            else:
                s.version_failed += 1
                s.failed_points.append(r.x)
            self._decided()
        elif success and not (self.cfg.target.per_version and s.failed_current):
            # a check still in flight when the target was met is logged, not counted: never "6/5"
            s.successes = min(s.successes + 1, self.cfg.target.successes)
            s.version_passed += 1
        elif success:
            return False
        else:
            s.failed_current = True
            s.version_failed += 1
            s.failed_points.append(r.x)
            # the strict test checks fresh points only, and a point in the training data is never re-checked
            if not (self.cfg.target.per_version or self.cfg.policy.train_on_checks):
                s.recheck.append(r.x)
        self._update_evidence()
        return True

    def _decided(self) -> None:
        """The certified rule: once the version's verdict is in, its checks in flight are cancelled; a
        rejected version goes back to training at once."""
        verdict = self._verdict()
        if verdict is Verdict.OPEN:
            return
        if verdict is Verdict.REJECTED:
            self.state.failed_current = True
            s = self.state
            self.progress.note(f"model v{s.model_version} rejected after {s.version_passed + s.version_failed} "
                               f"checks ({s.version_failed} failed): back to training")
        for task, kind in list(self._tasks.items()):
            if kind is TaskKind.CHECK and not task.done():
                task.cancel()
                self._forget(task)
                self._dropped.add(task)
                task.add_done_callback(self._dropped.discard)

    def _update_evidence(self) -> None:
        s = self.state
        s.evidence = pol.evidence(s.version_passed, s.version_failed, self.cfg.target).to_json()

    def _keep_check_row(self, r: CheckResult) -> str | None:
        """A check's truth joins the training data (``policy.train_on_checks``): data/check-N.npy."""
        if not self.cfg.policy.train_on_checks or r.truth is None or r.run_id is None:
            return None
        s = self.state
        row = np.asarray([[*r.x, *r.truth]], dtype=np.float64)
        rel = str(self.store.accept_data(r.run_id, row).relative_to(self.store.root))
        if rel in s.data_files:  # the same precheck's truth twice cannot happen; be safe
            return rel
        s.data_files.append(rel)
        s.check_rows += 1
        self.store.log(DataAccepted(rel, 1, s.data_points, role="check", check_rows=s.check_rows))
        return rel

    def _on_precheck(self, r: PrecheckResult) -> None:
        if r.truth is not None:
            self._known.append((r.x, r.truth, r.run_id))

    def _on_generate(self, r: GenerateResult) -> None:
        if r.path is None:
            return
        self.state.data_files.append(r.path)
        self.state.untrained.append(r.path)
        self.state.data_points += r.rows
        self.store.log(DataAccepted(r.path, r.rows, self.state.data_points))

    def _on_diverged(self, message: str) -> None:
        """A failed round: one line, the model as it was, its data still untrained (the next round
        draws a new seed and has more data); MAX_DIVERGED in a row stop the campaign."""
        s = self.state
        self._diverged += 1
        self._training_files = set()
        self._untrained_in_training = 0
        self.store.log(TrainFailed(s.model_version, message, self._diverged))
        self.progress.note(f"training round {s.model_version + 1} failed: {message}; model stays v{s.model_version}")
        if self._diverged >= MAX_DIVERGED:
            raise TrainingError(f"training diverged {self._diverged} rounds in a row; last: {message}")

    def _on_train(self, r: TrainResult) -> None:
        if r.diverged is not None:
            self._on_diverged(r.diverged)
            return
        self._diverged = 0
        s = self.state
        version = s.model_version + 1
        paths = [self.store.save_model(version, m, member=k) for k, m in enumerate(r.members)]
        self.model_state = r.members[0]
        self.members = list(r.members)
        s.model_version = version
        s.model_file = str(paths[0].relative_to(self.store.root))
        s.member_files = [str(p.relative_to(self.store.root)) for p in paths]
        s.failed_current = False
        s.version_passed = s.version_failed = 0
        if self.cfg.target.per_version or self.cfg.target.certified:
            s.successes = 0
        self._update_evidence()
        self._start_scoring()
        s.untrained = [f for f in s.untrained if f not in self._training_files]
        self.pictures.round(version, r.members[0], [f for f in s.data_files if f in self._training_files],
                            f"{self.cfg.name}: round {version}, {s.data_points} rows")
        self._training_files = set()
        self._untrained_in_training = 0
        metrics = {**r.metrics, "data_points": s.data_points, "check_rows": s.check_rows, "successes": s.successes,
                   "sims_launched": s.sims_launched, "sims_failed": s.sims_failed, "wall_s": round(self.elapsed, 3)}
        s.rounds.append({"round": version, **metrics})
        self.store.log(TrainEnd(version, extra=metrics))
        trained = int(metrics.get("n_samples", s.data_points))
        self.progress.note(f"training round {version} done: trained on {trained} rows ({s.data_points} generate + "
                           f"{s.check_rows} check rows accepted), "
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
        elif isinstance(result, TrainResult):
            self._on_train(result)
        self.checkpoint()

    # -- the loop ---------------------------------------------------------
    def _allocation_gone(self, why: str) -> None:
        """The Slurm job ended under the campaign: stop as after a signal (checkpoint, exit 75)."""
        if self._signal is None:
            job = None if self.job_watch is None else self.job_watch.job_id
            log.warning("the Slurm allocation (job %s) is gone: %s; checkpointing and exiting (resume in a new "
                        "allocation: python -m orchestrator run --resume %s)", job, why, self.store.root)
            self._signal = ALLOCATION_GONE
        self._interrupt.set()

    async def _watch_job(self) -> None:
        if self.job_watch is not None:
            self._allocation_gone(f"squeue says {await self.job_watch.gone()}")

    async def _gone_or(self, error: OrchestratorError) -> OrchestratorError:
        """An error that stopped the campaign, unless it came from the allocation's end (then 75)."""
        if self._signal != ALLOCATION_GONE and (self.job_watch is None or await self.job_watch.check() is None):
            return error
        self._allocation_gone(f"{type(error).__name__}: {error}")
        return Interrupted(f"the Slurm allocation ended under the campaign ({error}); resume in a new "
                           f"allocation: python -m orchestrator run --resume {self.store.root}")

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
                if self._signal is not None:  # ending on a signal, checkpointed: a second one has nothing
                    signal.signal(sig, signal.SIG_IGN)  # left to stop, and must not kill the exit with 143

        return remove

    async def _cancel_all(self) -> None:
        """Cancel what is in flight; data a generate already stored still counts (it is on disk)."""
        for task in self._tasks:
            task.cancel()
        if self._tasks or self._dropped:
            await asyncio.gather(*self._tasks, *self._dropped, return_exceptions=True)
        for task in self._tasks:
            if not task.cancelled() and task.exception() is None and isinstance(task.result(), GenerateResult):
                self._on_generate(task.result())  # type: ignore[arg-type]
        self._tasks.clear()
        self._counts.clear()
        self._finished.clear()

    def _time_left(self) -> float | None:
        """Seconds until the time budget is spent or the walltime exit is due; None without either."""
        budget = self.cfg.target.time_budget_s
        left = None if budget is None else max(0.0, budget - self.elapsed)
        if self.walltime is None:
            return left
        exit_in = max(0.0, self.walltime.remaining())
        return exit_in if left is None else min(left, exit_in)

    def _timeout(self) -> float | None:
        left = self._time_left()
        return None if left is None else left + 0.01

    async def loop(self) -> pol.StopReason | None:
        """Decide, start, wait for the next completion; until a Stop or a signal (None)."""
        interrupt = asyncio.ensure_future(self._interrupt.wait())
        try:
            while not self._interrupt.is_set():
                reason = self._apply(pol.decide(self.view(), self.cfg.target, self.cfg.policy))
                if not self.services.begun:  # once, after the first sims began their start
                    self.services.begin(flat_dict(self.cfg))
                self._show()
                if reason is not None:
                    return reason
                if self._walltime_over():
                    self._signal = "walltime"
                    log.info("the allocation ends soon: checkpointing and exiting with the resumable code")
                    return None
                if not self._tasks and self.services.trainer_up:
                    raise StoreError("the policy started nothing and nothing is in flight (a bug); state saved")
                if not self._finished and await self._wait(interrupt):
                    return None
                # Completions arrive through a done-callback queue: waiting costs the same with
                # 10 or 100,000 sims in flight (asyncio.wait over every task does not).
                while self._finished:
                    task = self._finished.popleft()
                    if self._forget(task):
                        self._collect(task)
            return None
        finally:
            interrupt.cancel()

    async def _wait(self, interrupt: asyncio.Future[Any]) -> bool:
        """Until a task ends, a service starts, the time is up or a signal comes (True)."""
        self._finished_event.clear()
        finished: asyncio.Future[Any] = asyncio.ensure_future(self._finished_event.wait())
        # Ready workers change what the policy may start; a failed start stops the campaign.
        starting = self.services.pending
        try:
            done, _ = await asyncio.wait([finished, interrupt, *starting], timeout=self._timeout(),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            finished.cancel()
        if interrupt in done:
            return True
        for service in [f for f in starting if f in done]:
            self.services.started(service)
        return False

    async def run(self) -> CampaignResult:
        """The whole campaign: start everything, loop, end cleanly whatever happens.

        The signal handlers stay until the very end, so a signal during the shutdown is noted
        (and shortens it) instead of killing the coordinator with 143. A met target is
        committed as ``registering`` first and as ``target_met`` only once the model is
        registered; a resume of a ``registering`` run goes straight to the registration.
        """
        remove_signals = self._install_signals()
        watching = asyncio.ensure_future(self._watch_job())
        status, reason, error, registered = Status.FAILED, None, None, None
        registering = self.state.status is Status.REGISTERING
        self.store.log(CampaignStart(self.resumed, str(self.store.root), self.cfg.seed, self.pool.free,
                                     None if self.walltime is None else self.walltime.end,
                                     None if self.walltime is None else self.walltime.exit_at))
        try:
            try:
                if registering:
                    self.services.begin(flat_dict(self.cfg))  # no sims come first: the model is registered
                if self.resumed:
                    self._start_scoring()  # scores are not saved: recompute the current model's
                reason = pol.StopReason.TARGET_MET if registering else await self.loop()
                if reason is pol.StopReason.TARGET_MET and self.cfg.continual.enabled and not registering:
                    reason = await self._keep_current()
                status = (Status.INTERRUPTED if reason is None
                          else Status.TARGET_MET if reason is pol.StopReason.TARGET_MET else Status.STOPPED)
                if status is Status.TARGET_MET:
                    self._final_picture()
                    status, registered = await self._register()
            except (OrchestratorError, OSError) as exc:
                error = await self._gone_or(self._stopped_by(exc))
                self.store.log(CampaignError(type(error).__name__, str(error)))
                if error.transient:  # a passing fault (a worker death, a locked database, a full disk)
                    status = Status.INTERRUPTED
                    if not isinstance(error, Interrupted):
                        error = Interrupted(f"{error} (the run is resumable: python -m orchestrator run --resume "
                                            f"{self.store.root})")
            finally:
                self._show()
                self.progress.phase("ending: stopping sims, Dask workers and MLflow")
                closing: asyncio.Future[None] | None = None
                if self._signal is None:
                    await self.pictures.drain()
                    await self._cancel_all()
                    await self.services.stop(CLOSE_PATIENCE_S)
                else:  # after a signal the exit is prompt: work in flight, services and Dask end at once
                    t_signal = time.monotonic()
                    closing = asyncio.ensure_future(self._end_services())
                    await self._cancel_all()
                    log.debug("shutdown: work in flight ended %.2f s after the signal", time.monotonic() - t_signal)
                if status in (Status.INTERRUPTED, Status.FAILED) and self.state.status is Status.REGISTERING:
                    status = Status.REGISTERING  # interrupted while registering: the resume finishes it
                self.state.stop_reason = reason.value if reason and status is not Status.REGISTERING else self._signal
                if status is not Status.TARGET_MET:
                    self.state.status = status
                error = self._unless_full(self.checkpoint, error)
                for launcher in {id(x): x for x in self.launchers.values()}.values():
                    await launcher.close()
                if closing is None:
                    await self.backend.close()
            if isinstance(error, DiskFull):  # the old state.json stands (resumable); no summary fits
                summary = build_summary(dataclasses.replace(self.state, status=status), self.elapsed,
                                        str(self.store.root), registered)
            else:
                summary = await self._finish(status, registered)
            if closing is not None:
                await closing
                log.debug("shutdown: done %.2f s after the signal", time.monotonic() - t_signal)
            self.progress.end(status.value if summary.get("stop_reason") is None or summary["target_met"]
                              else f"{status.value} ({summary['stop_reason']})", summary["wall_s"])
            if not isinstance(error, DiskFull):
                # The commit point: only now does state.json say target_met (a kill before it leaves
                # `registering`, which a resume finishes without a second model version).
                self.state.status = status
                self.checkpoint(summary["wall_s"])  # the wall time the summary says, in every view
        finally:
            watching.cancel()
            remove_signals()
            self.store.close()  # now another coordinator may have the run dir (a library caller, a test)
        if error is not None:
            raise error
        return CampaignResult(status, summary)

    def _stopped_by(self, exc: OrchestratorError | OSError) -> OrchestratorError:
        """What ended the loop, as the error the user sees: a full disk under the run dir is named
        as such (whatever it broke first: a write of ours, a sim, Dask, MLflow); another OSError
        propagates as it is."""
        if isinstance(exc, DiskFull):
            return exc
        if is_full_error(exc) or full(self.store.root):
            return disk_full_error(self.store.root, exc)
        if isinstance(exc, OSError):
            raise exc
        return exc

    def _unless_full(self, write: Callable[[], object], error: OrchestratorError | None) -> OrchestratorError | None:
        """Run a write of the shutdown; on a full disk keep going (the last good state.json stands)."""
        try:
            write()
        except DiskFull as exc:
            return error if isinstance(error, DiskFull) else exc
        except OSError as exc:
            if not is_full_error(exc):
                raise
            log.info("shutdown: %s%s", exc.strerror, f": {exc.filename}" if exc.filename else "")
            return error if isinstance(error, DiskFull) else disk_full_error(self.store.root, exc)
        return error

    async def _keep_current(self) -> pol.StopReason | None:
        """Continual mode (:mod:`orchestrator.loop.twin`) until its end (TARGET_MET) or a signal (None)."""
        twin = Twin(self.cfg, self.continual, self.ports(), self.rng, lambda: self.elapsed)
        if not self.continual.active:
            assert self.model_state is not None
            reg = await self.register_model(self.model_state, final_key(self.state.model_version))
            twin.begin(self.state.model_version, None if reg is None else reg["version"], self._data_so_far())
        task, _ = await self._unless_interrupted(twin.run())
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

    async def register_model(self, model: bytes, key: str | None = None) -> dict[str, str] | None:
        """Register ``model`` under ``tracking.register_as``, from a Dask worker (None without tracking).
        ``key`` names the registration: run again (a resume), it returns the version made before."""
        name = self.cfg.tracking.register_as
        if not self.sink.enabled or not name:
            return None
        await self.services.trainer_ready()
        self.store.log(Registering(name, key))
        return await self.sink.register(self.trainer, model, name, key)

    async def _end_services(self) -> None:
        """After a signal: stop the services' start-up and close the Dask backend, each within
        SIGNALLED_CLOSE_S (what is still closing then is ended by the process guardian once the
        coordinator exits)."""
        await self.services.stop(SIGNALLED_CLOSE_S)
        try:
            await asyncio.wait_for(self.backend.close(), SIGNALLED_CLOSE_S)
        except TimeoutError:
            log.warning("the Dask backend did not close within %.1f s of the signal; the process guardian "
                        "ends its processes", SIGNALLED_CLOSE_S)
        except Exception as exc:  # everything is checkpointed: a failed close must not lose exit 75
            log.warning("the Dask backend failed to close after the signal (%s); the process guardian "
                        "ends its processes", exc)

    def _final_picture(self) -> None:
        """``figures/final.png``: the model that met the target, its checks and what they certify."""
        s = self.state
        if self.model_state is not None:
            statement = pol.evidence(s.version_passed, s.version_failed, self.cfg.target).certified_statement
            self.pictures.final(s.model_version, self.model_state, list(s.data_files), statement)

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
        # keyed by the model's version: a resumed registration finds the version it made before
        key = final_key(self.state.model_version)
        self.store.log(Registering(name, key))
        self.progress.phase(f"registering the model as {name} in MLflow", note=True)
        model: bytes | list[bytes] = self.model_state if len(self.members) < 2 else list(self.members)
        task, interrupted = await self._unless_interrupted(self.sink.register(self.trainer, model, name, key))
        if interrupted:
            return Status.INTERRUPTED, None
        return Status.TARGET_MET, task.result()

    async def _unless_interrupted(self, work: Coroutine[Any, Any, _T]) -> tuple[asyncio.Future[_T], bool]:
        """``work`` until it ends or a signal comes first; then it is cancelled and waited for.
        Returns the ended task and whether the signal cut it short."""
        task = asyncio.ensure_future(work)
        interrupt = asyncio.ensure_future(self._interrupt.wait())
        try:
            await asyncio.wait([task, interrupt], return_when=asyncio.FIRST_COMPLETED)
        finally:
            interrupt.cancel()
            interrupted = not task.done()
            if interrupted:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        return task, interrupted

    async def _finish(self, status: Status, registered: dict[str, str] | None) -> dict[str, Any]:
        # The same wall time in state.json (`status`, `report`) as in the summary.
        wall = self.checkpoint()
        summary = build_summary(dataclasses.replace(self.state, status=status), wall, str(self.store.root), registered)
        path = self.store.write_summary(summary)
        self.store.log(CampaignEnd(extra={k: v for k, v in summary.items() if k != "run_dir"}))
        self.store.close(release=False)  # the lock is kept until the final state is committed
        artifacts = [self.store.root / LOOP, self.store.root / EVENTS, path]
        if self.sink.enabled and self._signal is None:  # after a signal the exit is prompt: no picture
            artifacts.append(await asyncio.to_thread(self._timeline))
        self.sink.metrics(evidence_metrics(summary), self.state.model_version)
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


def _drop_result(task: asyncio.Future[Any]) -> None:
    """Retrieve a result nobody waits for any more (so asyncio does not warn of it)."""
    if not task.cancelled():
        task.exception()


def final_key(version: int) -> str:
    """The registration key of the model that met the target (the final one, or continual mode's
    first champion: the same model, so one version)."""
    return f"final-model-v{version}"


class CampaignPorts:
    """:class:`~orchestrator.loop.twin.TwinPorts` on a :class:`Campaign`'s sims, workers, store and tracker."""

    def __init__(self, campaign: Campaign) -> None:
        self.c = campaign

    async def check_truth(self, x: list[float]) -> list[float] | None:
        return await self.c.check_truth(x)

    async def generate(self, seed: int, lo: list[float], hi: list[float]) -> tuple[str, int] | None:
        r = await self.c.generate(seed, lo, hi)
        if r.path is None:
            return None
        s = self.c.state
        s.data_files.append(r.path)
        s.data_points += r.rows
        self.c.store.log(DataAccepted(r.path, r.rows, s.data_points))
        return r.path, r.rows

    async def evaluate(self, model: bytes, xs: list[list[float]]) -> list[list[float]]:
        await self.c.services.trainer_ready()
        return await self.c.trainer.evaluate(model, xs)

    async def train(self, model: bytes | None, files: list[str], seed: int) -> tuple[bytes, dict[str, float]]:
        await self.c.services.trainer_ready()
        rows = sum(int(d["rows"]) for d in self.c.continual.data if d["path"] in files)
        self.c.store.log(TrainStart(self.c.state.model_version + 1, len(files), rows,
                                    self.c.backend.describe().get("workers")))
        return await self.c.trainer.train(model, [str(self.c.store.root / f) for f in files], seed)

    async def register(self, model: bytes, key: str) -> str | None:
        reg = await self.c.register_model(model, key)
        return None if reg is None else reg["version"]

    async def set_champion(self, registered: str) -> None:
        name = self.c.cfg.tracking.register_as
        if name:
            await self.c.sink.set_alias(name, self.c.cfg.continual.champion_alias, registered)

    def model_bytes(self, version: int) -> bytes:
        return (self.c.store.models_dir / f"model-{version:04d}.pt").read_bytes()

    def save_model(self, model: bytes, metrics: dict[str, float], files: list[str]) -> int:
        s = self.c.state
        version = s.model_version + 1
        self.c.store.save_model(version, model)
        s.model_version = version
        rows = sum(int(d["rows"]) for d in self.c.continual.data if d["path"] in files)
        metrics = {**metrics, "data_points": float(rows)}
        s.rounds.append({"round": version, **metrics})
        self.c.store.log(TrainEnd(version, extra={**metrics, "challenger": True}))
        self.c.sink.metrics({f"round_{k}": float(v) for k, v in metrics.items()}, version)
        self.c.pictures.scalars({f"round/{k}": float(v) for k, v in metrics.items()}, version)
        clock = self.c.continual.clock
        title = (f"{self.c.cfg.name}: challenger {version} at campaign time {clock}, "
                 f"{rows} recent rows; the champion's checks then")
        self.c.pictures.round(version, model, files, title, clock=clock)
        return version

    def log(self, event: Event) -> None:
        self.c.store.log(event)

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        self.c.sink.metrics(metrics, step)

    def note(self, text: str) -> None:
        self.c.progress.note(text)

    def checked(self, x: list[float], truth: list[float], ok: bool, clock: int) -> None:
        self.c.pictures.add_check(x, truth, ok, clock)

    def checkpoint(self) -> None:
        self.c.checkpoint()


def _fmt(v: list[float] | None) -> str:
    if v is None:
        return "-"
    return ",".join(f"{x:+.4f}" for x in v)
