"""Dask inside Slurm: workers as an srun step of the allocation, or as SLURMCluster jobs.

``allocation``: the scheduler runs in the coordinator's event loop (a
``distributed.Scheduler`` started in-process); the workers are one
``srun --exact -n W -c T`` step of ``dask worker`` processes on the training
slots :func:`orchestrator.runner.plan_slots` kept. Closing the backend closes
the scheduler (which closes every worker and nanny), waits for the step to end,
and cancels it if it does not.

``jobqueue``: ``dask_jobqueue.SLURMCluster`` jobs, options passed through from
``training.jobqueue`` in loop.yml over defaults that fit the workers asked for.

Where the scheduler listens (:func:`plan_listen`): on loopback when every worker
runs on this host, otherwise on the interface facing the workers; always with TLS
(``Security.temporary()``; the certificate goes to the workers as files in the run
directory, readable by the owner only), so that another user on the node, even on
loopback, cannot connect and run code in the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from orchestrator import procs, slurm
from orchestrator.allocation import Allocation, Node, Placement
from orchestrator.config import TrainingConfig
from orchestrator.errors import OrchestratorError, ResourceError, SlurmError, TrainingError
from orchestrator.procs import KILL_GRACE_S, guardian, kill_group, tail
from orchestrator.slurm import (
    end_steps,
    parse_srun_log,
    srun_env,
    srun_errors,
    step_argv,
)
from orchestrator.training.base import Backend
from orchestrator.training.warmup import MODULE as WARM_PRELOAD

if TYPE_CHECKING:  # Dask is imported when the backend starts, beside the first sims (not before them)
    from distributed import Client, Scheduler
    from distributed.security import Security

log = logging.getLogger(__name__)



def _dask_and_security(tls: bool) -> Any:
    """Dask imported, and with ``tls`` a certificate made for this campaign (None without); run in a
    thread: both take a second on a busy box, and the event loop meanwhile serves the first sims."""
    import dask
    from distributed.security import Security

    from orchestrator.training.nohttp import ROUTES_OFF

    dask.config.set(ROUTES_OFF)  # no HTTP route answers in the moment before a server's HTTP is stopped
    security: Any = Security
    return security.temporary() if tls else None


def _client_class() -> Any:
    """distributed's Client (untyped for mypy --strict: called through Any)."""
    from distributed import Client

    return Client

WORKER_START_TIMEOUT_S = 180.0
"""Workers of the allocation backend must connect within this (srun + Python + imports)."""
JOBQUEUE_START_TIMEOUT_S = 600.0
"""SLURMCluster jobs must start and connect within this (they may queue)."""
WORKER_EXIT_TIMEOUT_S = 15.0
"""After the scheduler closed, the worker step has this long to end by itself."""
WORKER_DEATH_TIMEOUT_S = 60
"""A worker whose scheduler vanished (coordinator killed) exits after this."""
HTTP_ADDRESS = "127.0.0.1:0"
"""The scheduler's HTTP server binds loopback, any free port, and is stopped once up (:mod:`.nohttp`)."""


# --------------------------------------------------------------------------
# Where the scheduler listens


@dataclass(frozen=True)
class ListenPlan:
    """The scheduler's bind address and whether its connections use TLS."""

    host: str
    tls: bool

    @property
    def protocol(self) -> str:
        return "tls" if self.tls else "tcp"


LOOPBACK = ListenPlan("127.0.0.1", tls=True)  # loopback is shared by every user of the node


def _resolve(addr: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return sorted({str(info[4][0]) for info in infos})


def is_local_address(addr: str) -> bool:
    """True when ``addr`` (a name or IP) is this host: loopback, or an address we can bind."""
    for ip in _resolve(addr):
        if ipaddress.ip_address(ip).is_loopback:
            return True
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((ip, 0))
            return True
        except OSError:
            continue
    return False


def outward_address(remote: str) -> str:
    """This host's address on the route to ``remote`` (no packet is sent)."""
    ips = _resolve(remote)
    if not ips:
        raise TrainingError(f"cannot resolve worker node address {remote!r}; is it reachable from here?")
    family = socket.AF_INET6 if ":" in ips[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((ips[0], 9))
        return str(s.getsockname()[0])


def plan_listen(
    worker_addrs: Sequence[str] | None,
    *,
    is_local: Callable[[str], bool] = is_local_address,
    outward: Callable[[str], str] = outward_address,
) -> ListenPlan:
    """Loopback when every worker address is this host, else the interface towards the
    workers; TLS either way. ``None``: the workers' nodes are not known (listen on the host)."""
    if worker_addrs is not None:
        remote = [a for a in worker_addrs if not is_local(a)]
        if not remote:
            return LOOPBACK
        return ListenPlan(outward(remote[0]), tls=True)
    return ListenPlan(socket.getfqdn(), tls=True)


def parse_node_addrs(text: str) -> dict[str, str]:
    """``sinfo -h -N -o '%N %o'`` output as {node name: NodeAddr} (:func:`orchestrator.slurm.parse_node_addrs`)."""
    try:
        return slurm.parse_node_addrs(text)
    except SlurmError as exc:
        raise TrainingError(str(exc)) from exc


def node_addresses(nodes: Sequence[str] | None = None, partition: str | None = None) -> dict[str, str]:
    """NodeAddr of the given nodes (or of a partition's nodes, or of all) from ``sinfo``."""
    try:
        return slurm.node_addresses(nodes, partition)
    except SlurmError as exc:
        raise TrainingError(str(exc)) from exc


def write_worker_tls(security: Security, directory: Path) -> list[str]:
    """Write the worker's TLS files (mode 0600) and return the ``dask worker`` flags for them."""
    directory.mkdir(parents=True, exist_ok=True)
    config: dict[str, str] = cast(Any, security).get_tls_config_for_role("worker")
    flags = {"ca_file": "--tls-ca-file", "cert": "--tls-cert", "key": "--tls-key"}
    argv: list[str] = []
    for key, flag in flags.items():
        value = config.get(key)
        if not value:
            continue
        path = directory / f"worker-{key.replace('_file', '')}.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value)
        argv += [flag, str(path)]
    return argv


# --------------------------------------------------------------------------
# allocation: srun'd dask workers


def worker_placement(nodes: Sequence[Node], workers: int, threads: int) -> Placement:
    """Place ``workers`` workers of ``threads`` cores each on the training slots, filling nodes in order."""
    per_node: list[tuple[str, int]] = []
    left = workers
    for node in nodes:
        fit = min(left, node.cpus // threads)
        if fit > 0:
            per_node.append((node.name, fit))
            left -= fit
    if left > 0:
        slots = ", ".join(f"{n.name}:{n.cpus}" for n in nodes) or "none"
        raise ResourceError(
            f"training asks for {workers} worker(s) x {threads} thread(s) but its slots ({slots}) hold only "
            f"{workers - left}; raise resources.training_cores / training_nodes or lower training.workers"
        )
    return Placement(tuple(per_node))


def worker_argv(
    address: str, cfg: TrainingConfig, local_dir: Path, tls_flags: Sequence[str] = ()
) -> list[str]:
    """The ``dask worker`` command each task of the step runs."""
    return [
        sys.executable, "-m", "distributed.cli.dask_worker", address,
        "--nthreads", str(cfg.threads_per_worker), "--memory-limit", cfg.memory_limit,
        "--no-dashboard", "--local-directory", str(local_dir),
        "--death-timeout", str(WORKER_DEATH_TIMEOUT_S), "--resources", resources_arg(cfg),
        "--preload", WARM_PRELOAD, *tls_flags,  # torch imported as the worker starts, not in its first task
    ]


def resources_arg(cfg: TrainingConfig) -> str:
    """``dask worker --resources`` value: ``train=1``, plus ``GPU=N`` for GPU workers."""
    return ",".join(f"{k}={v}" for k, v in cfg.worker_resources.items())  # no space: safe in job scripts


def gpu_step_options(cfg: TrainingConfig) -> list[str]:
    """srun options that give each worker task its own GPU(s); Slurm sets CUDA_VISIBLE_DEVICES per task."""
    return [f"--gpus-per-task={cfg.gpus}"] if cfg.gpus else []


class AllocationBackend(Backend):
    """A scheduler in the coordinator and ``dask worker``s as one srun step on the training slots."""

    def __init__(
        self, cfg: TrainingConfig, *, allocation: Allocation, nodes: list[Node], run_dir: Path
    ) -> None:
        self.cfg = cfg
        self.allocation = allocation
        self.nodes = list(nodes)
        self.run_dir = run_dir.absolute()
        self.dask_dir = self.run_dir / "dask"
        self.step_name = f"{run_dir.name}-dask"
        self.scheduler: Scheduler | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.listen: ListenPlan | None = None

    @property
    def log_path(self) -> Path:
        return self.dask_dir / "workers.log"

    async def start(self) -> Client:
        if not self.allocation.in_slurm or self.allocation.job_id is None:
            raise TrainingError("training.backend: allocation needs a Slurm allocation (run inside salloc or "
                                "sbatch), or use backend: local")
        placement = worker_placement(self.nodes, self.cfg.workers, self.cfg.threads_per_worker)
        addrs = await asyncio.to_thread(node_addresses, list(placement.nodes))
        self.listen = plan_listen([addrs.get(n, n) for n in placement.nodes])
        security = await asyncio.to_thread(_dask_and_security, self.listen.tls)
        from distributed import Scheduler

        from orchestrator.training.nohttp import WORKER_ENV, NoHTTP, stop_http

        self.dask_dir.mkdir(parents=True, exist_ok=True)
        tls_flags = write_worker_tls(security, self.dask_dir / "tls") if security is not None else []
        self.scheduler = await Scheduler(host=self.listen.host, port=0, protocol=self.listen.protocol,
                                         security=security, dashboard=False, dashboard_address=HTTP_ADDRESS)
        stop_http(self.scheduler)
        log.info("dask scheduler at %s (tls %s)", self.scheduler.address, self.listen.tls)
        argv = [
            *step_argv(self.cfg.workers, cpus_per_task=self.cfg.threads_per_worker, placement=placement,
                       job_name=self.step_name, mpi="none",
                       extra=["-v", "--kill-on-bad-exit=0", *gpu_step_options(self.cfg)]),
            *worker_argv(self.scheduler.address, self.cfg, self.dask_dir, tls_flags),
        ]
        with self.log_path.open("wb") as out:
            self.proc = await procs.start(argv, env=srun_env({**os.environ, "PYTHONUNBUFFERED": "1", **WORKER_ENV}),
                                          stdout=out, stderr=subprocess.STDOUT)
        self.client = await _client_class()(self.scheduler.address, security=security, asynchronous=True)
        await self._wait_for_workers(self.client, self.proc)
        from orchestrator.training.fastexit import FastExit

        await cast(Any, self.client).register_plugin(NoHTTP())
        await cast(Any, self.client).register_plugin(FastExit())  # the step ends soon after the close
        return self.client

    async def _wait_for_workers(self, client: Client, proc: asyncio.subprocess.Process) -> None:
        ready = asyncio.ensure_future(cast(Any, client).wait_for_workers(self.cfg.workers))
        exited = asyncio.ensure_future(proc.wait())
        try:
            done, _ = await asyncio.wait({ready, exited}, timeout=WORKER_START_TIMEOUT_S,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (ready, exited):
                fut.cancel()
        if ready in done and ready.exception() is None:
            return
        what = (f"the worker step exited with {proc.returncode}" if exited in done
                else f"not all {self.cfg.workers} workers connected within {WORKER_START_TIMEOUT_S:g} s")
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        shown = srun_errors(text) or [tail(self.log_path, 8) or "(empty)"]
        raise TrainingError(f"dask workers did not start: {what}; {self.log_path}: {' | '.join(shown)}")

    async def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await cast(Any, self.client).close()
            self.client = None
        if self.scheduler is not None:
            try:
                await cast(Any, self.scheduler).close(reason="campaign ended")  # closes every worker and nanny
            except Exception as exc:  # distributed's close can race its own connection pool
                # ("Cannot change state of expiring Timeout" when a signal lands while workers connect);
                # the worker step is ended below all the same.
                log.warning("the Dask scheduler did not close cleanly (%s); ending the worker step", exc)
            finally:
                self.scheduler = None
        if self.proc is not None:
            await self._end_step(self.proc)
            guardian.unwatch_group(self.proc.pid)
            self.proc = None

    async def _end_step(self, proc: asyncio.subprocess.Process) -> None:
        """Let the worker step end by itself; else SIGTERM srun, SIGKILL it, and scancel the step."""
        try:
            await asyncio.wait_for(proc.wait(), WORKER_EXIT_TIMEOUT_S)
        except TimeoutError:
            log.warning("dask worker step did not end after the scheduler closed: terminating it")
            kill_group(proc.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), KILL_GRACE_S)
        kill_group(proc.pid, signal.SIGKILL)
        await proc.wait()
        assert self.allocation.job_id is not None
        await end_steps(self.allocation.job_id, self.step_name)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(backend="allocation", tls=self.listen.tls if self.listen else None)
        if self.scheduler is not None:  # in-process: fresher than the client's cached identity
            info.update(scheduler=self.scheduler.address, workers=sorted(self.scheduler.workers))
        with contextlib.suppress(OSError):
            step = parse_srun_log(self.log_path.read_text(errors="replace"))
            info.update(step_id=step.step_id, nodes=sorted({h for h, _ in step.per_host}))
        return info


# --------------------------------------------------------------------------
# jobqueue: SLURMCluster jobs


def jobqueue_options(
    cfg: TrainingConfig, run_dir: Path, listen: ListenPlan | None, security: Security | None
) -> dict[str, Any]:
    """SLURMCluster keyword arguments: defaults for the workers asked for, then ``training.jobqueue``.

    ``scheduler_options`` merge key by key; ``listen`` is None when the user set
    the scheduler's host or interface.
    """
    user = dict(cfg.jobqueue)
    scheduler: dict[str, Any] = {"dashboard": False, "dashboard_address": HTTP_ADDRESS}
    if listen is not None:
        scheduler["host"] = listen.host
    scheduler.update(user.pop("scheduler_options", None) or {})
    opts: dict[str, Any] = {
        "cores": cfg.threads_per_worker,
        "memory": cfg.memory_limit,
        "processes": 1,
        "walltime": "00:30:00",
        "job_name": f"{run_dir.name}-dask"[:64],
        "log_directory": str(run_dir / "dask-jobs"),
        "python": sys.executable,
        "worker_extra_args": ["--death-timeout", str(WORKER_DEATH_TIMEOUT_S),
                              "--preload", WARM_PRELOAD,  # torch imported as the worker starts
                              "--resources", resources_arg(cfg)],
    }
    if cfg.gpus:
        gres = f"--gres=gpu:{cfg.gpus}"
        user_directives = list(user.pop("job_extra_directives", None) or [])
        opts["job_extra_directives"] = user_directives + ([] if any("gres" in d or "gpus" in d
                                                                      for d in user_directives) else [gres])
    if security is not None:
        opts.update(security=security, shared_temp_directory=str(run_dir / "dask" / "tls"))
    from orchestrator.training.nohttp import WORKER_ENV

    prologue = list(user.pop("job_script_prologue", None) or [])
    opts["job_script_prologue"] = [*prologue, *(f"export {k}={shlex.quote(v)}" for k, v in WORKER_ENV.items())]
    opts.update(user)
    opts["scheduler_options"] = scheduler
    return opts


def _listen_for_jobqueue(jobqueue: Mapping[str, Any]) -> ListenPlan | None:
    """Where a SLURMCluster scheduler should listen, from the nodes its jobs may land on."""
    sched = jobqueue.get("scheduler_options") or {}
    if "host" in sched or "interface" in sched or "interface" in jobqueue:
        return None
    try:
        addrs = node_addresses(partition=jobqueue.get("queue"))
    except OrchestratorError as exc:  # sinfo missing, refused or unparsable: assume the network
        log.warning("cannot list the partition's nodes (%s): the scheduler listens on the network, with TLS",
                    exc)
        return plan_listen(None)
    return plan_listen(sorted(set(addrs.values())))


class JobqueueBackend(Backend):
    """Dask workers as Slurm jobs of their own (``dask_jobqueue.SLURMCluster``)."""

    def __init__(
        self, cfg: TrainingConfig, *, allocation: Allocation, nodes: list[Node], run_dir: Path
    ) -> None:
        self.cfg = cfg
        self.allocation = allocation
        self.nodes = list(nodes)
        self.run_dir = run_dir.absolute()
        self.cluster: Any = None
        self.listen: ListenPlan | None = None

    async def start(self) -> Client:
        from dask_jobqueue.slurm import SLURMCluster

        from orchestrator.training.nohttp import NoHTTP, stop_http

        self.listen = await asyncio.to_thread(_listen_for_jobqueue, self.cfg.jobqueue)
        security = await asyncio.to_thread(_dask_and_security, self.listen is not None and self.listen.tls)
        if security is not None:
            (self.run_dir / "dask" / "tls").mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.run_dir / "dask-jobs").mkdir(parents=True, exist_ok=True)
        opts = jobqueue_options(self.cfg, self.run_dir, self.listen, security)
        try:
            self.cluster = await SLURMCluster(asynchronous=True, **opts)
        except (TypeError, ValueError) as exc:
            raise TrainingError(f"training.jobqueue: SLURMCluster refused the options: {exc}") from exc
        stop_http(self.cluster.scheduler)
        log.info("SLURMCluster scheduler at %s; job script:\n%s", self.cluster.scheduler_address,
                 self.cluster.job_script())
        self.cluster.scale(self.cfg.workers)
        self.client = await _client_class()(self.cluster, asynchronous=True)
        await cast(Any, self.client).register_plugin(NoHTTP())
        try:
            await cast(Any, self.client).wait_for_workers(self.cfg.workers, timeout=JOBQUEUE_START_TIMEOUT_S)
        except TimeoutError as exc:
            raise TrainingError(
                f"{self.cfg.workers} SLURMCluster worker job(s) did not connect within "
                f"{JOBQUEUE_START_TIMEOUT_S:g} s; see {self.run_dir / 'dask-jobs'} and `squeue --me`"
            ) from exc
        return self.client

    async def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await cast(Any, self.client).close()
            self.client = None
        if self.cluster is not None:
            await self.cluster.close()  # scancels the worker jobs
            self.cluster = None

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(backend="jobqueue", tls=self.listen.tls if self.listen else None)
        scheduler = getattr(self.cluster, "scheduler", None)
        if scheduler is not None and hasattr(scheduler, "workers"):
            info["workers"] = sorted(scheduler.workers)
        if self.cluster is not None:
            info["jobs"] = sorted(str(job.job_id) for job in self.cluster.workers.values()
                                  if getattr(job, "job_id", None))
        return info
