"""The functions the coordinator submits to Dask, importable without torch.

Dask pickles a submitted function by reference, so the coordinator must import
the function's module. Submitting these thin trampolines instead of
:mod:`orchestrator.training.tasks` itself keeps torch (2 s to import, hundreds
of MB) out of the coordinator: only workers import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Diverged:
    """What a task returns instead of raising when its training diverged (a non-finite loss):
    a deterministic outcome of the data and the seed, not a worker's fault, so Dask neither
    retries it nor logs its traceback."""

    message: str


def warm_up(*args: Any) -> float:
    """:func:`orchestrator.training.tasks.warm_up` on the worker."""
    from orchestrator.training import tasks

    return tasks.warm_up(*args)


def train(*args: Any) -> tuple[bytes, dict[str, float]] | Diverged:
    """:func:`orchestrator.training.tasks.train` on the worker; a diverged training as :class:`Diverged`."""
    from orchestrator.training import tasks

    try:
        return tasks.train(*args)
    except FloatingPointError as exc:
        return Diverged(str(exc))


def evaluate(*args: Any) -> list[list[float]]:
    """:func:`orchestrator.training.tasks.evaluate` on the worker."""
    from orchestrator.training import tasks

    return tasks.evaluate(*args)


def evaluate_ensemble(*args: Any) -> tuple[list[list[float]], list[list[float]]]:
    """:func:`orchestrator.training.tasks.evaluate_ensemble` on the worker."""
    from orchestrator.training import tasks

    return tasks.evaluate_ensemble(*args)


def register_model(*args: Any) -> tuple[str, str] | Refused:
    """:func:`orchestrator.training.tasks.register_model` on the worker; an OrchestratorError it raises
    (a locked or unreachable store) comes back as :class:`Refused`."""
    from orchestrator.errors import OrchestratorError
    from orchestrator.training import tasks

    try:
        return tasks.register_model(*args)
    except OrchestratorError as exc:
        return Refused(exc)


FIGURE_NICE = 19
"""The CPU priority a round's picture is drawn at (the lowest): it yields to sims and training."""


def figure(*args: Any) -> bytes:
    """Run ``orchestrator.training.figures.round_figure(*args)`` on the worker, in a thread of its own at
    :data:`FIGURE_NICE`. A picture takes a core for most of a second (matplotlib), and it is drawn just as
    a new model's checks start their ranks: on the sine bench it put 40 ms on the time to target (issue 25).
    A thread that ends with the picture, because no unprivileged thread can take its priority back."""
    import contextlib
    import os
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from orchestrator.training import figures

    def draw() -> bytes:
        with contextlib.suppress(OSError):  # else drawn at the worker's priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), FIGURE_NICE)  # this thread only (Linux)
        return figures.round_figure(*args)

    with ThreadPoolExecutor(1, thread_name_prefix="orchestrator-figure") as pool:
        return pool.submit(draw).result()  # a failure is raised here, as the drawing raised it


def evaluate_registered(tracking_uri: str, name: str, version: str | None, xs: list[list[float]]) -> list[list[float]]:
    """A registered model's outputs at ``xs``, loaded from the MLflow registry on the worker."""
    import torch

    from orchestrator.training.serving import load_registered_model

    model = load_registered_model(tracking_uri, name, version)
    with torch.no_grad():
        out = model(torch.as_tensor(xs, dtype=torch.float32)).double()
    return [[float(v) for v in row] for row in out.reshape(len(xs), -1).tolist()]


def call_ddp(name: str, *args: Any) -> Any:
    """Run ``orchestrator.training.ddp_worker.<name>(*args)`` on the worker."""
    from orchestrator.training import ddp_worker

    return getattr(ddp_worker, name)(*args)


class Refused:
    """What :func:`register_model` returns in place of an OrchestratorError the task raised (a locked or
    unreachable MLflow store): the user's one line, as data, so the worker logs no "Compute Failed"
    traceback and Dask does not retry it; the coordinator raises it."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

