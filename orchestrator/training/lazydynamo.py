"""torch's optimizers without importing ``torch._dynamo`` while nothing is compiled.

torch wraps the optimizers' methods (``Optimizer.__init__``'s ``add_param_group``,
``zero_grad``, ``state_dict``, ``load_state_dict``, each algorithm's functional step)
in ``torch._disable_dynamo``: at the first call the wrapper imports ``torch._dynamo``
(1.2-1.7 s on this 2-core box, more than torch itself) only to wrap the method in
``torch._dynamo.disable``, which keeps a *compiling* frame from tracing into it. Measured
for issue 25: that import was the longest part of a fresh worker's start, and the
campaign's first training waited for it. Each algorithm's ``step`` does the same through
``_use_grad``, which imports ``torch._dynamo`` to call ``torch._dynamo.graph_break()``.

:func:`install` gives each such method a first-call hook that keeps the wrapper's
meaning and drops the import: while ``torch._dynamo`` is not imported no frame can be
compiling (only dynamo sets the frame hook), so ``disable(fn)`` is ``fn`` and the hook
calls ``fn``; once anything imports dynamo (a model using ``torch.compile``), the hook
hands over to the very ``torch._dynamo.disable(fn, recursive)`` torch would have made. Each
``step`` likewise runs the algorithm in torch's grad mode without the two ``graph_break()``
calls (nothing to break), and torch's own ``_use_grad`` once dynamo is imported.
Installed explicitly by the workers' runtime (never on import); where torch's wrapper
changes shape, nothing is installed and torch behaves as before (``tests/test_lazydynamo.py``
fails then, so the next torch is checked).
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

_HOOK = "__dynamo_disable"
"""The attribute torch's wrapper caches its ``disable(fn)`` in, on the wrapped function."""

_lock = threading.Lock()
_installed = False


def _wrapper_code() -> Any:
    """The code object of torch's ``_disable_dynamo`` wrapper (one per torch)."""
    from torch._compile import _disable_dynamo

    def probe() -> None:
        """Wrapped once, only to find the wrapper's code."""

    return _disable_dynamo(probe).__code__


def _lazy(fn: Callable[..., Any], recursive: bool) -> Callable[..., Any]:
    """``fn`` while dynamo is not imported; torch's own ``disable(fn)`` once it is."""
    disabled: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if disabled:
            return disabled[0](*args, **kwargs)
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        import torch._dynamo

        disabled.append(torch._dynamo.disable(fn, recursive, wrapping=False))
        return disabled[0](*args, **kwargs)

    return call


def _cells(fn: Any) -> dict[str, Any]:
    """A function's closure, by the names of its free variables."""
    return dict(zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True))


def _wrapped(obj: Any, code: Any) -> tuple[Callable[..., Any], bool] | None:
    """``(fn, recursive)`` when ``obj`` is torch's ``_disable_dynamo`` wrapper around ``fn``."""
    if getattr(obj, "__code__", None) is not code:
        return None
    cells = _cells(obj)
    if "fn" not in cells or "recursive" not in cells:
        return None
    return cells["fn"].cell_contents, bool(cells["recursive"].cell_contents)


def _closed_over(value: Any) -> Iterator[Any]:
    """``value`` and what its closure holds (the functional steps keep the wrapper there)."""
    yield value
    for cell in getattr(value, "__closure__", None) or ():
        try:
            yield cell.cell_contents
        except ValueError:  # an empty cell
            continue


def _own_classes(module: ModuleType) -> list[type]:
    """The classes ``module`` defines (not those it imports)."""
    return [v for v in vars(module).values() if isinstance(v, type) and v.__module__ == module.__name__]


def _candidates(module: ModuleType) -> Iterator[Any]:
    """A module's functions and its classes' methods (one level, as torch.optim defines them)."""
    for value in vars(module).values():
        yield from _closed_over(value)
    for cls in _own_classes(module):
        for member in vars(cls).values():
            yield from _closed_over(member)


_USE_GRAD_NAMES = frozenset({"torch._dynamo", "_dynamo", "cast", "Optimizer", "is_grad_enabled", "set_grad_enabled",
                             "defaults", "graph_break"})
"""The names torch's ``_use_grad`` step wrapper uses (torch 2.13; tests/test_lazydynamo.py checks):
:func:`_lazy_step` is installed only over a wrapper that uses exactly these, whose meaning it repeats."""


def _use_grad_func(step: Any) -> Callable[..., Any] | None:
    """The algorithm's own step when ``step`` is torch's ``_use_grad`` wrapper around it, as known here."""
    code = getattr(step, "__code__", None)
    if code is None or code.co_name != "_use_grad" or frozenset(code.co_names) != _USE_GRAD_NAMES:
        return None
    cells = _cells(step)
    return cells["func"].cell_contents if "func" in cells else None


def _lazy_step(torch_step: Callable[..., Any], func: Callable[..., Any]) -> Callable[..., Any]:
    """torch's ``_use_grad`` without its two ``torch._dynamo.graph_break()`` calls (no-ops unless a frame
    is being compiled) while dynamo is not imported; torch's own wrapper once it is."""
    import torch

    @functools.wraps(torch_step)
    def step(*args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" in sys.modules:
            return torch_step(*args, **kwargs)
        prev_grad = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(args[0].defaults["differentiable"])
            return func(*args, **kwargs)
        finally:
            torch.set_grad_enabled(prev_grad)

    return step


def _hook_steps(module: ModuleType) -> int:
    """Each optimizer class's ``step`` in ``module`` given :func:`_lazy_step`; how many."""
    hooked = 0
    for cls in _own_classes(module):
        step = vars(cls).get("step")
        if step is None:
            continue
        func = _use_grad_func(step)
        if func is not None:
            cls.step = _lazy_step(step, func)  # type: ignore[attr-defined]
            hooked += 1
    return hooked


def _optim_modules() -> list[ModuleType]:
    import torch.optim

    prefix = torch.optim.__name__ + "."
    return [m for name, m in list(sys.modules.items()) if name == torch.optim.__name__ or name.startswith(prefix)
            if isinstance(m, ModuleType)]


def install() -> int:
    """Hook torch's optimizers: their ``_disable_dynamo`` wrappers and ``_use_grad`` steps; how many
    were hooked. Once per process: a second call (a forked worker's preload, then its warm-import
    thread) returns 0 without scanning again. Nothing is done when ``torch._dynamo`` is already
    imported (torch's wrappers then cost nothing)."""
    global _installed
    with _lock:
        if _installed or "torch._dynamo" in sys.modules:
            return 0
        _installed = True
        return _install()


def _install() -> int:
    code = _wrapper_code()
    hooked = 0
    for module in _optim_modules():
        for value in _candidates(module):
            found = _wrapped(value, code)
            if found is None:
                continue
            fn, recursive = found
            if getattr(fn, _HOOK, None) is None:
                setattr(fn, _HOOK, _lazy(fn, recursive))
                hooked += 1
        hooked += _hook_steps(module)
    log.debug("lazydynamo: %d optimizer method(s) no longer import torch._dynamo while nothing compiles", hooked)
    return hooked
