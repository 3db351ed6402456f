"""Dask cluster backends and the trainer that submits to them.

Training and evaluation are plain functions (:mod:`orchestrator.training.tasks`,
reached through the torch-free :mod:`orchestrator.training.remote`) submitted to
Dask with the model state as bytes and the data as paths in the run directory.
A worker that dies mid-task makes Dask rerun the task elsewhere (the nanny
restarts the worker); a task that raises is retried ``task_retries`` times, then
surfaces as :class:`TrainingError`.

Backends:
- ``local``: a ``LocalCluster`` of worker processes, scheduler on loopback, TLS, no HTTP server.
- ``allocation`` and ``jobqueue``: see :mod:`orchestrator.training.slurm`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from orchestrator.config import TrainingConfig
from orchestrator.errors import OrchestratorError, ResourceError, TrainingDiverged, TrainingError
from orchestrator.procs import guardian, kill_known, read_stat
from orchestrator.training import remote
from orchestrator.training.base import Backend

if TYPE_CHECKING:  # Dask is imported when a backend starts, beside the first sims (not before them)
    from distributed import Client, LocalCluster
    from distributed.security import Security

_T = TypeVar("_T")

log = logging.getLogger(__name__)

__all__ = ["QUIET_DASK", "Backend", "LocalBackend", "Trainer", "make_backend"]

# The scheduler and nannies live in the coordinator's event loop: their periodic
# housekeeping (a 20 ms loop-tick probe, 100-500 ms psutil polls) is most of an idle
# coordinator's CPU. Slower housekeeping keeps it near 1% without losing anything
# a campaign needs (dead workers are still noticed through their closed comms).
# The workers' statistical profiler (a stack sample of the task thread every 10 ms, for the
# dashboard's profile page, which no backend serves) takes the GIL from the training it samples:
# off, a first sine training on a local worker took 0.29-0.30 s instead of 0.31-0.37 s.
QUIET_DASK = {
    "distributed.admin.tick.interval": "500ms",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.worker.profile.enabled": False,
}


WORKER_CLOSE_GRACE_S = 0.5
"""How long a closing LocalCluster's worker processes may take to exit before they are killed."""


def worker_processes(cluster: LocalCluster) -> list[tuple[int, int]]:
    """(pid, start time) of the cluster's worker processes that are up now."""
    found = []
    for worker in cluster.workers.values():
        pid = getattr(getattr(worker, "process", None), "pid", None)
        info = read_stat(pid) if pid else None
        if info is not None:
            found.append((info.pid, info.start))
    return found


def dask_security() -> Security:
    """Dask imported and quietened, and TLS with a certificate made for this campaign: another user
    (or process) on the node cannot connect, even on loopback, and so cannot run code in the workers."""
    import dask
    from distributed.security import Security

    from orchestrator.training.nohttp import ROUTES_OFF

    dask.config.set({**QUIET_DASK, **ROUTES_OFF})
    security: Security = Security.temporary()
    return security


def _prepare_local() -> Security:
    """The workers' forkserver started (it imports Dask and torch on a core of its own), and Dask
    imported and its TLS certificate made here meanwhile."""
    from orchestrator.training import forks

    forks.prewarm()
    security = dask_security()
    forks.use_forkserver()
    return security


class LocalBackend(Backend):
    """A Dask LocalCluster of worker processes on this machine."""

    def __init__(self, cfg: TrainingConfig) -> None:
        self.cfg = cfg
        self.cluster: LocalCluster | None = None
        self._starting: asyncio.Future[Client] | None = None
        self._preparing = False
        """Dask's imports and the certificate, or the wait for the workers' forkserver, are under way in a
        thread: no worker is starting yet (a close cancels the start)."""

    async def start(self) -> Client:
        """Up and connected; a start cut short (the time budget, a signal) goes on in the background
        to its end, for :meth:`close`: a LocalCluster still starting cannot be closed (its close skips
        a cluster that is not running, and its workers' starts are tasks of their own)."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        return await asyncio.shield(self._starting)

    async def _start(self) -> Client:
        # Dask's imports and the certificate take a second on a busy box: off the event loop, which
        # meanwhile serves the first sims.
        self._preparing = True
        try:
            security = await asyncio.to_thread(_prepare_local)
        finally:
            self._preparing = False
        from distributed import Client, LocalCluster

        from orchestrator.training.fastexit import FastExit, OneLineDaskFaults
        from orchestrator.training.nohttp import NoHTTP, stop_http
        from orchestrator.training.warmup import MODULE as WARM_PRELOAD

        self.cluster = await cast(Awaitable[LocalCluster], LocalCluster(
            n_workers=0,  # the scheduler and client now, the workers once their forkserver is ready (below)
            threads_per_worker=self.cfg.threads_per_worker,
            memory_limit=self.cfg.memory_limit,
            processes=True,
            resources=self.cfg.worker_resources,
            host="127.0.0.1",
            protocol="tls://",
            security=security,
            dashboard_address=None,  # no dashboard; the HTTP servers on loopback, stopped once up (nohttp)
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
            preload=[WARM_PRELOAD],  # torch imported as each worker starts, not in its first task
            asynchronous=True,
        ))
        stop_http(self.cluster.scheduler)
        self.client = await cast(Awaitable[Client], Client(self.cluster, security=security, asynchronous=True))
        await cast(Awaitable[Any], self.client.register_plugin(NoHTTP()))
        await cast(Awaitable[Any], self.client.register_plugin(FastExit()))  # a prompt exit at close
        # The forkserver's imports (Dask, torch) end about now; waited for in a thread, so that a close
        # meanwhile is immediate (a cluster whose workers are starting cannot be closed).
        from orchestrator.training import forks

        self._preparing = True
        try:
            await asyncio.to_thread(forks.wait_ready)
        finally:
            self._preparing = False
        self.cluster.scale(self.cfg.workers)
        await cast(Awaitable[LocalCluster], self.cluster)  # the workers started (a failed start raises here)
        await cast(Awaitable[None], self.client.wait_for_workers(self.cfg.workers))
        for pid, _ in worker_processes(self.cluster):  # a SIGKILLed coordinator leaves no worker process behind
            guardian.watch_pid(pid)
        await cast(Awaitable[Any], self.client.register_plugin(OneLineDaskFaults()))
        return self.client

    async def close(self) -> None:
        """Close the client and the cluster (once a start cut short has ended); worker processes
        still there after :data:`WORKER_CLOSE_GRACE_S` (busy in a task the campaign no longer
        waits for, or in torch's slow teardown) are killed: a worker holds nothing the campaign
        has not collected."""
        if self._starting is not None:
            if self._preparing:  # no worker is starting: cancel (a thread under way ends alone)
                self._starting.cancel()
            starting, self._starting = self._starting, None
            await asyncio.wait([starting])
            if not starting.cancelled():
                starting.exception()  # a failed start was reported where it was awaited
        if self.client is not None:
            await cast(Awaitable[None], self.client.close())
            self.client = None
        if self.cluster is None:
            return
        workers = worker_processes(self.cluster)
        closing = asyncio.ensure_future(cast(Awaitable[None], self.cluster.close()))
        done, _ = await asyncio.wait([closing], timeout=WORKER_CLOSE_GRACE_S)
        if not done:
            killed = kill_known(workers)
            log.info("dask: worker process(es) %s still closing after %.1f s: killed", killed, WORKER_CLOSE_GRACE_S)
        await closing
        self.cluster = None


def local_gpus(dev: Path = Path("/dev")) -> int:
    """NVIDIA GPUs this host shows (``/dev/nvidia0``, ...), without importing torch."""
    return sum(1 for p in dev.glob("nvidia*") if p.name[len("nvidia"):].isdigit())


def check_local_device(cfg: TrainingConfig, gpus: int | None = None) -> None:
    """Refuse ``training.device: cuda`` at start when the local workers could have no GPU."""
    gpus = local_gpus() if gpus is None else gpus
    if cfg.device == "cuda" and gpus == 0:
        raise ResourceError("training.device is cuda but this machine has no NVIDIA GPU (no /dev/nvidia0); "
                            "set training.device: auto or cpu, or run where a GPU is")
    if cfg.device == "cuda" and gpus < cfg.workers and cfg.strategy == "ddp":
        log.warning("%d local workers share %d GPU(s)", cfg.workers, gpus)


def make_backend(cfg: TrainingConfig, **kwargs: Any) -> Backend:
    """The backend named in the config."""
    if cfg.backend == "local":
        check_local_device(cfg)
        return LocalBackend(cfg)
    from orchestrator.training import slurm

    if cfg.backend == "allocation":
        return slurm.AllocationBackend(cfg, **kwargs)
    return slurm.JobqueueBackend(cfg, **kwargs)


class Trainer:
    """Submits training and evaluation to the backend's workers."""

    def __init__(
        self, backend: Backend, cfg: TrainingConfig, n_inputs: int, n_outputs: int,
        columns: tuple[list[str], list[str]] | None = None,
    ) -> None:
        self.backend = backend
        self.columns = columns
        """The campaign's input and output names, recorded with a registered model (for ``predict``)."""
        self.cfg = cfg
        self.model_kwargs = dict(cfg.model_kwargs)
        self.n_inputs = n_inputs
        self.n_outputs = n_outputs
        self.hparams = {"num_threads": cfg.threads_per_worker, **cfg.hparams.model_dump(exclude_unset=True)}
        self._busy = 0
        """Trainings and evaluations in flight (a picture waits for none: :meth:`figure`)."""
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._evaluations: _Evaluations | None = None
        """The evaluations asked for in this turn of the event loop, not yet submitted (:meth:`evaluate_ensemble`)."""
        self._submitted: set[asyncio.Future[None]] = set()

    @property
    def train_options(self) -> dict[str, Any]:
        """Dask submit options of a training task: it needs a training worker (and its GPU)."""
        need = {"train": 1, **({"GPU": self.cfg.gpus} if self.cfg.gpus else {})}
        return {"resources": need, "pure": False, "retries": self.cfg.task_retries}

    @property
    def client(self) -> Client:
        if self.backend.client is None:
            raise RuntimeError("the training backend is not started")
        return self.backend.client

    def _busy_until(self, task: asyncio.Future[Any]) -> None:
        """Count ``task`` (a training or evaluation) as in flight from now until it ends, however it ends."""
        self._busy += 1
        self._quiet.clear()

        def ended(_: asyncio.Future[Any]) -> None:
            self._busy -= 1
            if self._busy == 0:
                self._quiet.set()
            if not task.cancelled():
                task.exception()  # seen: a failure no one awaits any more (the campaign ended) is not logged

        task.add_done_callback(ended)

    async def _run(self, futures: list[Any], fail: Callable[[Exception], OrchestratorError], *,
                   busy: bool = True) -> list[Any]:
        """The results of the submitted ``futures``; on a failure the others are cancelled and
        ``fail(exc)`` is raised (an OrchestratorError a task raised itself passes through when
        ``fail`` returns it). ``busy``: the campaign waits for these (all but pictures)."""
        if not busy:
            return await self._gather(futures, fail)
        task = asyncio.ensure_future(self._gather(futures, fail))
        self._busy_until(task)
        return await task

    @staticmethod
    async def _gather(futures: list[Any], fail: Callable[[Exception], OrchestratorError]) -> list[Any]:
        try:
            return list(await asyncio.gather(*futures))
        except Exception as exc:
            await _cancel(futures)
            err = fail(exc)
            if err is exc:
                raise
            raise err from exc

    @staticmethod
    def _failed(what: str, where: str = "the Dask workers") -> Callable[[Exception], OrchestratorError]:
        return lambda exc: TrainingError(f"{what} failed on {where}: {type(exc).__name__}: {exc}")

    async def warm_up(self) -> float:
        """Import torch and take one optimizer step on a worker before the first training."""
        futures = [
            self.client.submit(remote.warm_up, self.cfg.model, self.model_kwargs, self.n_inputs,
                               self.n_outputs, self.cfg.device, pure=False, workers=[addr])
            for addr in await self._training_workers()
        ]

        def fail(exc: Exception) -> OrchestratorError:
            if type(exc).__name__ == "NoGpuError":  # raised by orchestrator.training.devices on the worker
                return ResourceError(str(exc))
            return TrainingError(f"the model {self.cfg.model} cannot be built on a worker: {exc}")

        seconds: list[float] = await self._run(futures, fail)
        return max(seconds)

    async def _training_workers(self) -> list[str]:
        """Addresses of the connected workers that advertise the ``train`` resource (all of ours)."""
        workers: dict[str, Any] = (await cast(Any, self.client).scheduler.identity(n_workers=-1))["workers"]
        able = sorted(a for a, w in workers.items() if w.get("resources", {}).get("train", 0) >= 1)
        return able or sorted(workers)

    async def train(self, state: bytes | None, data_paths: list[str], seed: int) -> tuple[bytes, dict[str, float]]:
        """One training round (warm start from ``state``) on every path given."""
        args = (state, data_paths, self.cfg.model, self.model_kwargs, self.hparams, self.n_inputs, seed)
        if self.cfg.strategy == "ddp":
            from orchestrator.training import ddp

            return await ddp.train(self.client, self.cfg.workers, args, self.cfg.device, self.cfg.task_retries)
        future = self.client.submit(remote.train, *args, self.cfg.device, **self.train_options)
        (result,) = await self._run([future], lambda exc: training_error(exc, self.cfg.memory_limit))
        return converged(cast(tuple[bytes, dict[str, float]] | remote.Diverged, result))

    async def evaluate(self, state: bytes, xs: list[list[float]]) -> list[list[float]]:
        """The surrogate's outputs at each input row."""
        future = self.client.submit(remote.evaluate, state, self.cfg.model, self.model_kwargs, xs, pure=False,
                                    retries=self.cfg.task_retries)
        (result,) = await self._run([future], self._failed("evaluation"))
        return cast(list[list[float]], result)

    async def register(
        self, state: bytes | list[bytes], tracking_uri: str, run_id: str, name: str, key: str | None = None,
    ) -> tuple[str, str]:
        """Register the model in ``state`` (or the ensemble of these member states) under ``name``
        in MLflow run ``run_id``, from a worker.

        Loading the model needs torch, which only workers import; the worker logs and
        registers through :mod:`orchestrator.tracking` with the campaign's URI and run.
        """
        future = self.client.submit(remote.register_model, state, self.cfg.model, self.model_kwargs, tracking_uri,
                                    run_id, name, self.columns, key, pure=False)
        failed = self._failed(f"registering the model as {name!r}", "a Dask worker")
        (result,) = await self._run([future], lambda exc: exc if isinstance(exc, OrchestratorError) else failed(exc))
        if isinstance(result, remote.Refused):  # a locked or unreachable store: its one line
            raise result.error
        return cast(tuple[str, str], result)

    async def evaluate_registered(self, tracking_uri: str, name: str, version: str | None, xs: list[list[float]]
                                  ) -> list[list[float]]:
        """A registered model's outputs at ``xs``, loaded from the MLflow registry on a worker."""
        future = self.client.submit(remote.evaluate_registered, tracking_uri, name, version, xs, pure=False)
        (result,) = await self._run([future], self._failed(f"evaluating the registered model {name!r}"))
        return cast(list[list[float]], result)

    async def figure(self, state: bytes, data_paths: list[str], checks: list[tuple[list[float], list[float], bool]],
                     lo: list[float], hi: list[float], names: tuple[list[str], list[str]], title: str) -> bytes:
        """A round's picture (PNG bytes), drawn on a worker (:mod:`orchestrator.training.figures`)."""
        # A picture never delays a check: submitted once no training or evaluation is in flight (those
        # asked for in this turn of the event loop included: a new model's checks whose truth is already
        # known start as it is saved, after its picture), and below them in the workers' queues. Once
        # running, a picture holds a worker's thread for most of a second.
        await asyncio.sleep(0)
        await self._quiet.wait()
        future = self.client.submit(remote.figure, state, self.cfg.model, self.model_kwargs, data_paths, checks,
                                    lo, hi, names, title, pure=False, priority=-10)
        (png,) = await self._run([future], self._failed("drawing the round's figure", "a Dask worker"), busy=False)
        return cast(bytes, png)

    async def train_ensemble(
        self, states: list[bytes | None], data_paths: list[str], seed: int
    ) -> tuple[list[bytes], dict[str, float]]:
        """One round for every ensemble member, as concurrent Dask tasks (spread over the
        workers), each warm-started from its own state with its own seed. The metrics are
        the members' mean, plus the worst member's ``train_rmse_max``."""
        from orchestrator.training.ensemble import member_seed, merge_metrics

        futures = [
            self.client.submit(
                remote.train, state, data_paths, self.cfg.model, self.model_kwargs, self.hparams,
                self.n_inputs, member_seed(seed, k), self.cfg.device, **self.train_options,
            )
            for k, state in enumerate(states)
        ]
        results = [converged(r) for r in await self._run(futures, self._failed("training of the ensemble"))]
        return [r[0] for r in results], merge_metrics([r[1] for r in results])

    def evaluate_ensemble(
        self, states: list[bytes], xs: list[list[float]]
    ) -> asyncio.Future[tuple[list[list[float]], list[list[float]]]]:
        """The members' mean and spread at each input row (spread 0 for one member), counted in flight
        from the call (a picture asked for in the same turn waits for it: :meth:`figure`).

        The calls of one turn of the event loop with the same member states share one Dask task,
        submitted at the end of the turn: a new model's checks start together, and each used to ship
        the member states (110 KB for the sine model) to the scheduler and on to a worker, in the
        coordinator's own process, just as their sims were starting (issue 25)."""
        batch = self._evaluations
        if batch is None or not batch.same(states):
            batch = self._evaluations = _Evaluations(states)
            asyncio.get_running_loop().call_soon(self._submit_evaluations, batch)
        share = batch.add(xs)
        self._busy_until(share)
        return share

    def _submit_evaluations(self, batch: _Evaluations) -> None:
        if self._evaluations is batch:
            self._evaluations = None
        try:
            future = self.client.submit(remote.evaluate_ensemble, batch.states, self.cfg.model, self.model_kwargs,
                                        batch.xs, pure=False, retries=self.cfg.task_retries)
        except Exception as exc:  # a closed client: each caller sees it, as when it submitted its own
            batch.fail(exc)
            return

        async def result() -> None:
            try:
                (value,) = await self._gather([future], self._failed("evaluation"))
            except BaseException as exc:
                batch.fail(exc)
                if not isinstance(exc, Exception):
                    raise
                return
            batch.deliver(*cast(tuple[list[list[float]], list[list[float]]], value))

        task = asyncio.ensure_future(result())
        self._submitted.add(task)  # held until it ends (the event loop keeps only a weak reference)
        task.add_done_callback(self._submitted.discard)


class _Evaluations:
    """Evaluations of the same member states asked for in one turn of the event loop: their rows, one
    task for them all, and each caller's share of its result."""

    def __init__(self, states: list[bytes]) -> None:
        self.states = list(states)
        self.xs: list[list[float]] = []
        self.shares: list[tuple[asyncio.Future[tuple[list[list[float]], list[list[float]]]], int, int]] = []

    def same(self, states: list[bytes]) -> bool:
        """Whether ``states`` are these very member states (a caller's own copy of the list counts)."""
        return len(states) == len(self.states) and all(a is b for a, b in zip(states, self.states, strict=True))

    def add(self, xs: list[list[float]]) -> asyncio.Future[tuple[list[list[float]], list[list[float]]]]:
        share: asyncio.Future[tuple[list[list[float]], list[list[float]]]] = (
            asyncio.get_running_loop().create_future())
        self.shares.append((share, len(self.xs), len(xs)))
        self.xs.extend(xs)
        return share

    def deliver(self, mean: list[list[float]], spread: list[list[float]]) -> None:
        for share, start, n in self.shares:
            if not share.done():
                share.set_result((mean[start:start + n], spread[start:start + n]))

    def fail(self, exc: BaseException) -> None:
        for share, _, _ in self.shares:
            if share.done():
                continue
            if isinstance(exc, asyncio.CancelledError):
                share.cancel()
            else:
                share.set_exception(exc)


CANCEL_WAIT_S = 2.0
"""How long a failed task's siblings' cancel may take before the failure is reported anyway."""


async def _cancel(futures: list[Any]) -> None:
    """Cancel Dask futures. An asynchronous client's cancel is a coroutine that sends nothing until it is
    awaited; it is awaited briefly, and a client that is closing is left alone (its futures go with it)."""
    client = futures[0].client if futures else None
    if client is None or client.status != "running":
        return
    try:
        sent = client.cancel(futures)
        if inspect.isawaitable(sent):
            await asyncio.wait_for(sent, CANCEL_WAIT_S)
    except Exception as exc:  # the failure being reported matters more than its siblings' cancel
        log.debug("cancelling %d Dask futures: %s", len(futures), exc)


PASSING = ("KilledWorker", "FileNotFoundError", "CommClosedError", "TimeoutError")
"""Training failures a resume can get past (a worker death, a data file restored, a slow scheduler)."""


def converged(result: _T | remote.Diverged) -> _T:
    """A training task's result, or TrainingDiverged (one line) where its loss went non-finite."""
    if isinstance(result, remote.Diverged):
        raise TrainingDiverged(f"{result.message} (lower training.hparams.lr, or refuse wild rows with "
                               "acceptance.ranges / acceptance.outlier_k)")
    return result


def training_error(exc: BaseException, memory_limit: str) -> TrainingError:
    """A TrainingError for a failed training task; passing faults are transient (the run stays resumable)."""
    kind = type(exc).__name__
    hint = ""
    if kind == "KilledWorker":
        hint = (f"; workers died running it (often the memory limit, training.memory_limit={memory_limit}: "
                "resume with --set training.memory_limit=<more>)")
    err = TrainingError(f"training failed on the Dask workers: {kind}: {exc}{hint}")
    err.transient = kind in PASSING
    return err
