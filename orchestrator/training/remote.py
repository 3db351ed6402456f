"""The functions the coordinator submits to Dask, importable without torch.

Dask pickles a submitted function by reference, so the coordinator must import
the function's module. Submitting these thin trampolines instead of
:mod:`orchestrator.training.tasks` itself keeps torch (2 s to import, hundreds
of MB) out of the coordinator: only workers import it.
"""

from __future__ import annotations

from typing import Any


def call(name: str, *args: Any) -> Any:
    """Run ``orchestrator.training.tasks.<name>(*args)`` on the worker."""
    from orchestrator.training import tasks

    return getattr(tasks, name)(*args)


def figure(*args: Any) -> bytes:
    """Run ``orchestrator.training.figures.round_figure(*args)`` on the worker."""
    from orchestrator.training import figures

    return figures.round_figure(*args)
