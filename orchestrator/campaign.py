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
import enum
import logging
import signal
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator import policy as pol
from orchestrator.allocation import SlotPool
from orchestrator.config import LoopConfig, SimConfig, flat_dict, render_args
from orchestrator.errors import Interrupted, OrchestratorError, ResourceError, SimKindFailed, StoreError
from orchestrator.launchers.base import Launcher, LaunchRequest, Outcome, SimResult
from orchestrator.progress import Progress, Snapshot
from orchestrator.store import LOOP, RunStore
from orchestrator.training.backends import Backend, Trainer
from orchestrator.walltime import Durations, WalltimeGuard

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
BACKEND_HEAD_START_S = 2.0
"""The longest the first sims wait for the Dask workers' processes to be up (not warm)."""


class Status(enum.Enum):
    """A campaign's terminal state (RUNNING until it ends). INTERRUPTED is not failure."""

    RUNNING = "running"
    TARGET_MET = "target_met"
    STOPPED = "stopped"  # max_rounds, time or data budget
    INTERRUPTED = "interrupted"  # signalled; resumable
    FAILED = "failed"

    @property
    def exit_code(self) -> int:
        return {Status.TARGET_MET: 0, Status.STOPPED: 3, Status.INTERRUPTED: Interrupted.exit_code}.get(self, 1)


@dataclass
class State:
    """Everything a resume needs; state.json is this, rewritten after every step."""

    model_version: int = 0
    model_file: str | None = None
    successes: int = 0
    checks_done: int = 0
    failed_current: bool = False
    data_files: list[str] = field(default_factory=list)
    """Accepted generate results, relative to the run dir, in acceptance order."""
    untrained: list[str] = field(default_factory=list)
    data_points: int = 0
    sims_launched: int = 0
    sims_failed: int = 0
    launch_counter: int = 0
    failed_points: list[list[float]] = field(default_factory=list)
    recheck: list[list[float]] = field(default_factory=list)
    """Query points whose check failed: checked again against the next model."""
    rng: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    """Wall time of earlier sessions of this campaign (resume adds to it)."""
    mlflow_run_id: str | None = None
    status: str = Status.RUNNING.value
    stop_reason: str | None = None
    last_error: float | None = None
    rounds: list[dict[str, float]] = field(default_factory=list)
    """Metrics of each finished training."""
    sim_durations: dict[str, dict[str, float]] = field(default_factory=dict)
    """Running wall-time estimates per sim role (:class:`orchestrator.walltime.Durations`)."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> State:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class CheckResult:
    x: list[float]
    version: int
    predicted: list[float] | None
    truth: list[float] | None
    prechecked: bool = False
    """The truth came from a check sim run ahead, while the model trained."""


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
        tracker: Any | None = None,
        progress: Progress | None = None,
        state: State | None = None,
        walltime: WalltimeGuard | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.binaries = binaries
        self.launchers = launchers
        self.pool = pool
        self.backend = backend
        self.trainer = Trainer(backend, cfg.training, len(cfg.inputs), len(cfg.outputs))
        self.tracker = tracker
        self.progress = progress or Progress(enabled=False)
        self.resumed = state is not None
        self.state = state or State()
        self.rng = np.random.default_rng(cfg.seed)
        if self.state.rng:
            self.rng.bit_generator.state = self.state.rng
        self.model_state: bytes | None = None
        if self.state.model_file:
            self.model_state = (store.root / self.state.model_file).read_bytes()
        self.lo = np.array([i.lo for i in cfg.inputs])
        self.hi = np.array([i.hi for i in cfg.inputs])
        self._tasks: dict[asyncio.Task[Any], str] = {}
        self._counts: Counter[str] = Counter()
        """Tasks in flight per kind (kept with ``_tasks``, so the view costs the same at any scale)."""
        self._finished: deque[asyncio.Task[Any]] = deque()
        """Tasks done and not yet collected, in completion order."""
        self._finished_event = asyncio.Event()
        self._untrained_in_training = 0
        """How many of ``state.untrained`` the in-flight training uses."""
        self._training_files: set[str] = set()
        self._known: list[tuple[list[float], list[float] | None]] = []
        """Query points whose check sim already ran (prechecks), with their truth."""
        """Data files the in-flight training uses; they leave ``untrained`` only when it ends."""
        self._consecutive_failures = {"check": 0, "generate": 0}
        self._interrupt = asyncio.Event()
        self._signal: str | None = None
        self._t0 = time.monotonic()
        self._backend_ready: asyncio.Future[None] | None = None
        self._tracking_ready: asyncio.Future[None] | None = None
        self._pending_metrics: list[tuple[dict[str, float], int]] = []
        self.walltime = walltime
        if walltime is not None:
            walltime.durations = Durations.from_json(self.state.sim_durations)
        self._out_of_time = False
        """A sim was not started because it would overrun the allocation."""

    # -- bookkeeping ------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return self.state.elapsed_s + time.monotonic() - self._t0

    def _inflight(self, kind: str) -> int:
        return self._counts[kind]

    def view(self) -> pol.View:
        s = self.state
        return pol.View(
            model_version=s.model_version, training=self._inflight("train") > 0,
            checks_inflight=self._inflight("check"), failed_current=s.failed_current,
            checks_known=len(self._known), prechecks_inflight=self._inflight("precheck"),
            generates_inflight=self._inflight("generate"),
            untrained_runs=len(s.untrained) - self._untrained_in_training,
            successes=s.successes, data_points=s.data_points, elapsed_s=self.elapsed,
            trainer_ready=self._backend_ready is not None and self._backend_ready.done(),
        )

    def checkpoint(self) -> None:
        """Rewrite state.json (atomically) with the RNG and elapsed time."""
        self.state.rng = dict(self.rng.bit_generator.state)
        # Shallow: json.dumps copies nothing, and asdict's deep copy was most of an event's cost.
        snapshot = {f.name: getattr(self.state, f.name) for f in fields(self.state)}
        snapshot["elapsed_s"] = self.elapsed
        snapshot["config"] = flat_dict(self.cfg)
        self.store.write_state(snapshot)

    def _show(self) -> None:
        s = self.state
        self.progress.update(Snapshot(
            self.cfg.name, s.model_version, self.cfg.target.max_rounds, s.successes, self.cfg.target.successes,
            s.data_points, self._inflight("check") + self._inflight("precheck"), self._inflight("generate"),
            self._inflight("train") > 0,
            s.sims_launched, s.sims_failed, s.last_error, self.elapsed,
        ))

    # -- sims -------------------------------------------------------------
    async def run_sim(self, role: str, values: Mapping[str, float | int]) -> SimResult | None:
        """Run one sim with retries; None when every attempt failed."""
        sim: SimConfig = getattr(self.cfg.sims, role)
        nrows = 1 if role == "check" else None
        last: SimResult | None = None
        for attempt in range(sim.retries + 1):
            if attempt:
                await asyncio.sleep(sim.backoff_s * 2 ** (attempt - 1))
            if not self._fits(role):
                return None
            last = await self._attempt(role, sim, values, attempt, nrows)
            if last.ok:
                self._consecutive_failures[role] = 0
                return last
            self._consecutive_failures[role] += 1
            if self._consecutive_failures[role] >= sim.max_consecutive_failures:
                raise SimKindFailed(
                    f"sim kind {role!r} ({sim.binary}) failed {self._consecutive_failures[role]} times in a row; "
                    f"last failure ({last.request.run_id}): {last.message}"
                )
        return None

    async def _attempt(
        self, role: str, sim: SimConfig, values: Mapping[str, float | int], attempt: int, nrows: int | None
    ) -> SimResult:
        self.state.launch_counter += 1
        run_id = f"{role}-{self.state.launch_counter:06d}"
        fields = {**values, "run_id": self.state.launch_counter, "attempt": attempt, "ranks": sim.ranks}
        try:
            placement = await self.pool.acquire(sim.ranks, per_node=sim.ranks_per_node)
        except ValueError as exc:
            raise ResourceError(f"sims.{role}: {exc}") from exc
        try:
            req = LaunchRequest(
                run_id=run_id, role=role, binary=self.binaries[role], args=render_args(sim.args, fields),
                ranks=sim.ranks, workdir=self.store.sim_dir(run_id), timeout_s=sim.timeout_s,
                ncols=self.cfg.n_columns, nrows=nrows, placement=placement, ranks_per_node=sim.ranks_per_node,
                env=sim.env,
            )
            launcher = self.launchers[role]
            self.state.sims_launched += 1
            self.store.event("sim_start", run_id=run_id, role=role, attempt=attempt, ranks=sim.ranks,
                             launcher=launcher.name, placement=placement.per_node, argv=launcher.command(req))
            self._show()
            try:
                result = await launcher.run(req)
            except asyncio.CancelledError:
                self.store.event("sim_end", run_id=run_id, role=role, outcome=Outcome.CANCELLED.value)
                raise
        finally:
            self.pool.release(placement)
        if self.walltime is not None:
            self.walltime.durations.observe(role, result.wall_s)
            self.state.sim_durations = self.walltime.durations.to_json()
        if not result.ok:
            self.state.sims_failed += 1
            log.warning("sim %s: %s: %s", run_id, result.outcome.value, result.message)
            self.progress.note(f"sim {run_id} {result.outcome.value}: {result.message.splitlines()[0][:160]}")
        self.store.event("sim_end", run_id=run_id, role=role, attempt=attempt, outcome=result.outcome.value,
                         returncode=result.returncode, wall_s=round(result.wall_s, 4), message=result.message,
                         rows=None if result.table is None else int(result.table.shape[0]), **result.info)
        return result

    # -- walltime ---------------------------------------------------------
    def _fits(self, role: str) -> bool:
        """A run of ``role`` is expected to end before the campaign must be out."""
        if self.walltime is None or self.walltime.fits(role):
            return True
        if not self._out_of_time:
            log.info("sims.%s: expected %.1f s, %.1f s left before the allocation's exit time: not started",
                     role, self.walltime.durations.expected(role) or 0.0, self.walltime.remaining())
            self.store.event("walltime_skip", role=role, expected_s=self.walltime.durations.expected(role),
                             left_s=round(self.walltime.remaining(), 3))
        self._out_of_time = True
        return False

    def _walltime_timeout(self, timeout: float | None) -> float | None:
        if self.walltime is None:
            return timeout
        left = max(0.0, self.walltime.remaining()) + 0.01
        return left if timeout is None else min(timeout, left)

    def _walltime_over(self) -> bool:
        """Out of time: past the exit time, or nothing useful fits and nothing is in flight."""
        if self.walltime is None:
            return False
        return self.walltime.remaining() <= 0 or (self._out_of_time and not self._tasks)

    # -- actions ----------------------------------------------------------
    def _spawn(self, kind: str, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks[task] = kind
        self._counts[kind] += 1
        task.add_done_callback(self._on_done)

    def _on_done(self, task: asyncio.Task[Any]) -> None:
        self._finished.append(task)
        self._finished_event.set()

    def _forget(self, task: asyncio.Task[Any]) -> str | None:
        kind = self._tasks.pop(task, None)
        if kind is not None:
            self._counts[kind] -= 1
        return kind

    def _random_point(self) -> list[float]:
        return [float(v) for v in self.rng.uniform(self.lo, self.hi)]

    def _next_query(self) -> tuple[list[float], list[float] | None]:
        """A failed point again first, then a point whose truth a precheck already knows."""
        if self.state.recheck:
            return self.state.recheck.pop(0), None
        if self._known:
            return self._known.pop(0)
        return self._random_point(), None

    @staticmethod
    def _truth_of(sim: SimResult | None, x: list[float]) -> list[float] | None:
        return None if sim is None or sim.table is None else [float(v) for v in sim.table[0, len(x):]]

    async def _precheck(self, x: list[float]) -> tuple[list[float], list[float] | None]:
        """The check sim at a future query point: its truth does not depend on the model."""
        values = {spec.name: v for spec, v in zip(self.cfg.inputs, x, strict=True)}
        return x, self._truth_of(await self.run_sim("check", values), x)

    async def _check(self, x: list[float], version: int, model: bytes, known: list[float] | None) -> CheckResult:
        values = {spec.name: v for spec, v in zip(self.cfg.inputs, x, strict=True)}
        await self.trainer_ready()
        pred_task = asyncio.ensure_future(self.trainer.evaluate(model, [x]))
        try:
            sim = None if known is not None else await self.run_sim("check", values)
            predicted = (await pred_task)[0]
        except asyncio.CancelledError:
            if x in self.state.failed_points:  # a re-check: keep it for the resumed run
                self.state.recheck.insert(0, x)
            raise
        finally:
            pred_task.cancel()
        return CheckResult(x, version, predicted, known if known is not None else self._truth_of(sim, x),
                           prechecked=known is not None)

    async def _generate(self, seed: int, lo: list[float], hi: list[float]) -> tuple[str, int] | None:
        values: dict[str, float | int] = {"seed": seed}
        for spec, a, b in zip(self.cfg.inputs, lo, hi, strict=True):
            values[f"{spec.name}_lo"], values[f"{spec.name}_hi"] = a, b
        if len(self.cfg.inputs) == 1:
            values["lo"], values["hi"] = lo[0], hi[0]
        sim = await self.run_sim("generate", values)
        if sim is None or sim.table is None:
            return None
        path = self.store.accept_data(sim.request.run_id, sim.table)
        return str(path.relative_to(self.store.root)), int(sim.table.shape[0])

    async def _train(self, files: list[str], seed: int) -> tuple[bytes, dict[str, float]]:
        await self.trainer_ready()
        paths = [str(self.store.root / f) for f in files]
        self.store.event("train_start", version=self.state.model_version + 1, files=len(files),
                         rows=self.state.data_points, workers=self.backend.describe().get("workers"))
        return await self.trainer.train(self.model_state, paths, seed)

    def _apply(self, actions: list[pol.Action]) -> pol.StopReason | None:
        for action in actions:
            if isinstance(action, pol.Stop):
                return action.reason
            if isinstance(action, pol.StartTraining):
                files = list(self.state.data_files)
                self._training_files = set(files)
                self._untrained_in_training = len(self.state.untrained)
                self._spawn("train", self._train(files, int(self.rng.integers(2**31))))
            elif isinstance(action, pol.StartGenerates):
                for _ in range(action.count if self._fits("generate") else 0):
                    wlo, whi = pol.sampling_window(self.lo, self.hi, self.state.failed_points,
                                                   self.cfg.policy.sampling, self.cfg.policy.near_failures_width,
                                                   self.rng)
                    seed = int(self.rng.integers(2**31))
                    self._spawn("generate", self._generate(seed, [float(v) for v in wlo], [float(v) for v in whi]))
            elif isinstance(action, pol.StartChecks):
                assert self.model_state is not None
                for _ in range(action.count if self._fits("check") else 0):
                    x, known = self._next_query()
                    self._spawn("check", self._check(x, self.state.model_version, self.model_state, known))
            elif isinstance(action, pol.StartPrechecks):
                for _ in range(action.count if self._fits("check") else 0):
                    self._spawn("precheck", self._precheck(self._random_point()))
        return None

    # -- results ----------------------------------------------------------
    def _on_check(self, r: CheckResult) -> None:
        s = self.state
        if r.truth is None or r.predicted is None:
            self.store.event("check", x=r.x, version=r.version, outcome="no_truth")
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
        self.store.event("check", x=r.x, version=r.version, predicted=r.predicted, truth=r.truth, error=error,
                         success=success, stale=stale, successes=s.successes, prechecked=r.prechecked)
        mark = "ok  " if success else "FAIL"
        self.progress.note(f"check {mark} x={_fmt(r.x)} surrogate={_fmt(r.predicted)} truth={_fmt(r.truth)} "
                           f"error={error:.4f} (model v{r.version}, successes {s.successes}/"
                           f"{self.cfg.target.successes})")
        self._track({"check_error": error, "successes": s.successes}, s.checks_done)

    def _on_generate(self, accepted: tuple[str, int] | None) -> None:
        if accepted is None:
            return
        path, rows = accepted
        self.state.data_files.append(path)
        self.state.untrained.append(path)
        self.state.data_points += rows
        self.store.event("data_accepted", path=path, rows=rows, data_points=self.state.data_points)

    def _on_train(self, model: bytes, metrics: dict[str, float]) -> None:
        s = self.state
        version = s.model_version + 1
        path = self.store.save_model(version, model)
        self.model_state = model
        s.model_version = version
        s.model_file = str(path.relative_to(self.store.root))
        s.failed_current = False
        s.untrained = [f for f in s.untrained if f not in self._training_files]
        self._training_files = set()
        self._untrained_in_training = 0
        metrics = {**metrics, "data_points": s.data_points, "successes": s.successes}
        s.rounds.append({"round": version, **metrics})
        self.store.event("train_end", version=version, **metrics)
        self.progress.note(f"training round {version} done: {s.data_points} rows, "
                           f"rmse {metrics.get('train_rmse', float('nan')):.4g}, "
                           f"{metrics.get('train_seconds', 0):.1f} s")
        self._track({f"round_{k}": float(v) for k, v in metrics.items()}, version)

    def _track(self, metrics: Mapping[str, float], step: int) -> None:
        """Log to MLflow, or keep the metrics until its (concurrent) start is done."""
        if self.tracker is None:
            return
        self._pending_metrics.append((dict(metrics), step))
        if self._tracking_ready is not None and self._tracking_ready.done():
            self._flush_metrics()

    def _flush_metrics(self) -> None:
        if self.tracker is None:
            self._pending_metrics.clear()
            return
        for metrics, step in self._pending_metrics:
            self.tracker.log_metrics(metrics, step=step)
        self._pending_metrics.clear()

    def _collect(self, task: asyncio.Task[Any], kind: str) -> None:
        result = task.result()  # a SimKindFailed or TrainingError propagates: the campaign stops
        if kind == "check":
            self._on_check(result)
        elif kind == "precheck":
            if result[1] is not None:
                self._known.append(result)
        elif kind == "generate":
            self._on_generate(result)
        elif kind == "train":
            self._on_train(*result)
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
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self._counts.clear()
        self._finished.clear()

    async def loop(self) -> pol.StopReason | None:
        """Decide, start, wait for the next completion; until a Stop or a signal."""
        interrupt = asyncio.ensure_future(self._interrupt.wait())
        try:
            while not self._interrupt.is_set():
                reason = self._apply(pol.decide(self.view(), self.cfg.target, self.cfg.policy))
                self._show()
                if reason is not None:
                    return reason
                if self._walltime_over():
                    self._signal = "walltime"
                    log.info("allocation ends soon: checkpointing and exiting with the resumable code")
                    return None
                if not self._tasks and self._backend_ready is not None and self._backend_ready.done():
                    raise StoreError("the policy started nothing and nothing is in flight (a bug); state saved")
                budget = self.cfg.target.time_budget_s
                timeout = self._walltime_timeout(None if budget is None else max(0.0, budget - self.elapsed) + 0.01)
                # Completions arrive through a done-callback queue: waiting costs the same with
                # 10 or 100,000 sims in flight (asyncio.wait over every task does not).
                services = [f for f in (self._backend_ready, self._tracking_ready) if f is not None and not f.done()]
                if not self._finished:
                    self._finished_event.clear()
                    finished: asyncio.Future[Any] = asyncio.ensure_future(self._finished_event.wait())
                    # Ready workers change what the policy may start; a failed start stops the campaign.
                    waiting: list[asyncio.Future[Any]] = [finished, interrupt, *services]
                    done, _ = await asyncio.wait(waiting, timeout=timeout,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    finished.cancel()
                    if interrupt in done:
                        return None
                    for service in done.intersection(services):
                        service.result()
                        if service is self._tracking_ready:
                            self._flush_metrics()
                while self._finished:
                    task = self._finished.popleft()
                    kind = self._forget(task)
                    if kind is not None:
                        self._collect(task, kind)
            return None
        finally:
            interrupt.cancel()

    async def run(self) -> CampaignResult:
        """The whole campaign: start everything, loop, end cleanly whatever happens."""
        remove_signals = self._install_signals()
        status, reason, error = Status.FAILED, None, None
        self.store.event("campaign_start", resumed=self.resumed, run_dir=str(self.store.root), seed=self.cfg.seed,
                         sim_slots=self.pool.free, allocation_end=self.walltime and self.walltime.end,
                         exit_at=self.walltime and self.walltime.exit_at)
        try:
            # Dask and MLflow start while the first sims already run. The Dask workers get a
            # short head start: on a small box, starting many MPI ranks at the same moment
            # slows the worker processes' start far more than the head start delays the sims.
            backend_up = asyncio.Event()
            self._backend_ready = asyncio.ensure_future(self._start_backend(backend_up))
            self._tracking_ready = asyncio.ensure_future(self._start_tracking())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(backend_up.wait(), BACKEND_HEAD_START_S)
            reason = await self.loop()
            status = (Status.INTERRUPTED if reason is None
                      else Status.TARGET_MET if reason is pol.StopReason.TARGET_MET else Status.STOPPED)
        except OrchestratorError as exc:
            error = exc
            self.store.event("campaign_error", error=type(exc).__name__, message=str(exc))
        finally:
            remove_signals()
            await self._cancel_all()
            await self._stop_services()
            self.state.status = status.value
            self.state.stop_reason = reason.value if reason else self._signal
            self.checkpoint()
            for launcher in {id(x): x for x in self.launchers.values()}.values():
                await launcher.close()
            await self.backend.close()
        summary = await self._finish(status, reason)
        if error is not None:
            raise error
        return CampaignResult(status, summary)

    async def _start_backend(self, up: asyncio.Event) -> None:
        try:
            await self.backend.start()
        finally:
            up.set()
        seconds = await self.trainer.warm_up()
        self.store.event("training_backend", warm_up_s=round(seconds, 3), **self.backend.describe())

    async def trainer_ready(self) -> None:
        """Wait until the Dask workers are up and warm; raises what their start raised."""
        assert self._backend_ready is not None
        await asyncio.shield(self._backend_ready)

    async def _stop_services(self) -> None:
        """Stop a Dask start still under way; let MLflow's finish (it is needed to close the run)."""
        if self._backend_ready is not None and not self._backend_ready.done():
            self._backend_ready.cancel()
            with contextlib.suppress(BaseException):
                await self._backend_ready
        if self._tracking_ready is not None:
            try:
                await self._tracking_ready
                self._flush_metrics()
            except Exception as exc:  # already raised in the loop, or the campaign failed first
                log.warning("MLflow tracking unavailable for this run: %s", exc)
                self.tracker = None

    async def _start_tracking(self) -> None:
        if self.tracker is None:
            return
        # MLflow's start is mostly imports, which hold the GIL: let the Dask start go first
        # (metrics are kept until the tracker is up).
        if self._backend_ready is not None:
            await asyncio.wait([self._backend_ready])
        params = flat_dict(self.cfg)
        run_id = await asyncio.to_thread(self.tracker.start, params, self.state.mlflow_run_id)
        self.state.mlflow_run_id = run_id
        self.checkpoint()

    async def _finish(self, status: Status, reason: pol.StopReason | None) -> dict[str, Any]:
        registered = None
        if status is Status.TARGET_MET and self.tracker is not None and self.cfg.tracking.register_as:
            registered = await asyncio.to_thread(self._register)
        s = self.state
        summary = {
            "target_met": status is Status.TARGET_MET,
            "status": status.value,
            "stop_reason": s.stop_reason,
            "rounds": s.model_version,
            "successes": s.successes,
            "checks": s.checks_done,
            "data_points": s.data_points,
            "sims_launched": s.sims_launched,
            "sims_failed": s.sims_failed,
            "wall_s": round(self.elapsed, 3),
            "registered_model": registered,
            "mlflow_run_id": s.mlflow_run_id,
            "run_dir": str(self.store.root),
        }
        path = self.store.write_summary(summary)
        self.store.event("campaign_end", **{k: v for k, v in summary.items() if k != "run_dir"})
        self.store.close()
        if self.tracker is not None:
            await asyncio.to_thread(self._close_tracking, status, path)
        return summary

    def _register(self) -> dict[str, str] | None:
        from orchestrator.training import tasks

        assert self.model_state is not None and self.tracker is not None
        module = tasks.load_model(self.model_state, self.cfg.training.model, dict(self.cfg.training.model_kwargs))
        name = self.cfg.tracking.register_as
        assert name is not None
        reg = self.tracker.register_model(module, name)
        self.store.event("model_registered", name=reg.name, version=reg.version)
        return {"name": reg.name, "version": str(reg.version)}

    def _close_tracking(self, status: Status, summary: Path) -> None:
        assert self.tracker is not None
        for artifact in (self.store.root / LOOP, self.store.root / "events.jsonl", summary):
            if artifact.exists():
                self.tracker.log_artifact(artifact)
        mlflow_status = {Status.TARGET_MET: "FINISHED", Status.STOPPED: "FINISHED",
                         Status.INTERRUPTED: "KILLED"}.get(status, "FAILED")
        with contextlib.suppress(Exception):
            self.tracker.finish(mlflow_status)


def _fmt(v: list[float] | None) -> str:
    if v is None:
        return "-"
    return ",".join(f"{x:+.4f}" for x in v)
