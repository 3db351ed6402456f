"""Start-up of the campaign's services (Dask, MLflow) against the campaign's time: real LocalClusters."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from orchestrator.config import HparamsConfig, TrainingConfig
from orchestrator.loop.services import BACKEND_HEAD_START_S, Services
from orchestrator.loop.tracksink import TrackingSink
from orchestrator.runlog import State
from orchestrator.store import RunStore
from orchestrator.training.backends import LocalBackend, Trainer, worker_processes
from tests.conftest import dask_worker_processes, fast_loop, write_loop

pytestmark = pytest.mark.integration


def dask_processes() -> set[int]:
    """This process's Dask worker processes."""
    return set(dask_worker_processes(os.getpid()))


def services(tmp_path: Path) -> tuple[Services, LocalBackend]:
    store = RunStore.create(tmp_path / "runs", "svc", write_loop(tmp_path, fast_loop()))
    backend = LocalBackend(TrainingConfig())
    sink = TrackingSink(None, store, State(), lambda: None)
    return Services(backend, Trainer(backend, TrainingConfig(), 1, 1), store, sink), backend


@pytest.mark.parametrize("cut", ["time", "signal"])
def test_start_up_ends_with_the_campaigns_time_and_leaves_no_worker(tmp_path: Path, cut: str) -> None:
    """Issue 12: the head start (up to 2 s for the Dask workers) is cut by the time left (the budget,
    the walltime exit) or a signal; a cluster still starting is then closed whole, without a worker
    process left behind."""
    svc, backend = services(tmp_path)
    before = dask_processes()

    async def run() -> tuple[float, float]:
        signal: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if cut == "signal":
            signal.set_result(None)
        t0 = time.monotonic()
        await svc.start({}, within=0.2 if cut == "time" else None, until=signal)
        started = time.monotonic() - t0
        assert not svc.trainer_up  # the workers were not up and warm by then
        t1 = time.monotonic()
        await svc.stop()
        await backend.close()
        return started, time.monotonic() - t1

    started, closed = asyncio.run(run())
    assert started < (0.2 + 0.5 if cut == "time" else 0.5) < BACKEND_HEAD_START_S, started
    assert dask_processes() - before == set(), "a Dask worker process outlived the close"
    print(f"head start cut after {started:.2f} s; start-up ended and closed in {closed:.2f} s")


def _warm_import_state() -> tuple[bool, bool, bool]:
    """On a worker: (its preload started the background imports, torch is imported by now,
    torch._dynamo is imported)."""
    import sys

    warmup = sys.modules.get("orchestrator.training.warmup")
    return warmup is not None and warmup._started.is_set(), "torch" in sys.modules, "torch._dynamo" in sys.modules


def test_workers_import_torch_as_they_start_and_a_training_right_after_start_works(tmp_path: Path) -> None:
    """Issue 25: each worker's preload imports torch in a thread as the worker starts; a training
    submitted the moment the cluster is up (no warm-up) shares that import (the import lock) and
    completes without importing torch._dynamo (lazydynamo), and the worker processes are the guardian's."""
    import numpy as np

    from orchestrator.procs import guardian

    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 3, size=64)
    np.save(tmp_path / "d.npy", np.column_stack([x, np.sin(x)]))
    cfg = TrainingConfig(workers=1, hparams=HparamsConfig(epochs=2, lbfgs_iters=0))
    backend = LocalBackend(cfg)

    async def run() -> tuple[bytes, dict[str, tuple[bool, bool, bool]], set[int]]:
        client = await backend.start()
        try:
            state, _ = await Trainer(backend, cfg, 1, 1).train(None, [str(tmp_path / "d.npy")], 0)
            seen = await client.run(_warm_import_state)
            assert backend.cluster is not None
            pids = {pid for pid, _ in worker_processes(backend.cluster)}
            assert pids and pids <= set(guardian._pids), (pids, guardian._pids)  # a SIGKILLed coordinator's are ended
            return state, seen, pids
        finally:
            await backend.close()

    state, seen, pids = asyncio.run(run())
    assert state and isinstance(state, bytes)
    assert list(seen.values()) == [(True, True, False)], seen
    assert not any(psutil.pid_exists(p) for p in pids), "a worker process outlived the close"


def _worker_facts() -> tuple[int, str | None, bool]:
    """On a worker: (its parent's pid, OMP_NUM_THREADS, torch._dynamo imported)."""
    import sys

    return os.getppid(), os.environ.get("OMP_NUM_THREADS"), "torch._dynamo" in sys.modules


def test_local_workers_fork_from_a_warm_server_and_leave_the_sims_environment_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 25: the local workers are forked from a server that imported Dask and torch (not
    torch._dynamo: see lazydynamo) beside the first sims, and get Dask's worker environment there; the
    coordinator's own environment, which every later sim inherits, no longer gets OMP_NUM_THREADS=1
    from Dask's nanny (a threaded sim started after the workers ran on one thread)."""
    from multiprocessing import forkserver

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    backend = LocalBackend(TrainingConfig(workers=1))

    async def run() -> dict[str, tuple[int, str | None, bool]]:
        client = await backend.start()
        try:
            facts: dict[str, tuple[int, str | None, bool]] = await client.run(_worker_facts)
            return facts
        finally:
            await backend.close()

    facts = asyncio.run(run())
    server = forkserver._forkserver._forkserver_pid
    assert server is not None and psutil.Process(server).ppid() == psutil.Process().pid
    assert list(facts.values()) == [(server, "1", False)], facts
    assert "OMP_NUM_THREADS" not in os.environ


def _profiling(dask_worker: Any) -> tuple[bool, bool]:
    """On a worker: (Dask's statistical profiler is set up, distributed.worker.profile.enabled)."""
    import dask

    return "profile" in dask_worker.periodic_callbacks, bool(dask.config.get("distributed.worker.profile.enabled"))


def test_one_turns_evaluations_of_the_same_model_share_one_task_and_each_caller_gets_its_rows(tmp_path: Path) -> None:
    """Issue 25: a new model's checks ask for their predictions together; the calls of one event-loop turn
    with the same member states go to the workers as one task (the states shipped once, not once per
    check), and each caller gets exactly the rows it asked for, as a call of its own gives them. Other
    states get a task of their own; a failed evaluation reaches every caller. The workers run without
    Dask's statistical profiler (it took the GIL from training every 10 ms)."""
    import numpy as np

    from orchestrator.errors import TrainingError

    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 3, size=64)
    np.save(tmp_path / "d.npy", np.column_stack([x, np.sin(x)]))
    cfg = TrainingConfig(workers=1, hparams=HparamsConfig(epochs=2, lbfgs_iters=0))
    backend = LocalBackend(cfg)
    points = [[[-1.0]], [[0.5], [2.0]], [[1.5]]]

    async def run() -> None:
        client = await backend.start()
        try:
            trainer = Trainer(backend, cfg, 1, 1)
            state, _ = await trainer.train(None, [str(tmp_path / "d.npy")], 0)
            other, _ = await trainer.train(None, [str(tmp_path / "d.npy")], 1)
            alone = [await trainer.evaluate_ensemble([state], xs) for xs in points]  # a turn each
            submitted: list[int] = []
            submit = client.submit

            def counting(fn: object, *args: object, **kwargs: object) -> object:
                submitted.append(len(args[3]))  # type: ignore[arg-type]  # the rows of the task
                return submit(fn, *args, **kwargs)

            client.submit = counting  # type: ignore[method-assign]
            shares = [trainer.evaluate_ensemble(list([state]), xs) for xs in points]  # one turn
            apart = trainer.evaluate_ensemble([other], [[0.5]])
            together = await asyncio.gather(*shares)
            assert sorted(submitted) == [1, 4], submitted
            for got, want in zip(together, alone, strict=True):
                np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-7)
                assert got[1] == [[0.0]] * len(want[1])
            assert (await apart)[0] != together[1][0][:1]  # the other model's own prediction
            broken = [trainer.evaluate_ensemble([b"not a model"], xs) for xs in points]
            outcomes = await asyncio.gather(*broken, return_exceptions=True)
            assert all(isinstance(o, TrainingError) for o in outcomes), outcomes
            assert trainer._quiet.is_set()  # nothing counted in flight any more
            assert list((await client.run(_profiling)).values()) == [(False, False)]
        finally:
            await backend.close()

    asyncio.run(run())
