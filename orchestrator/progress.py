"""Live progress on the terminal: a rich panel when stderr is a TTY, log lines otherwise.

The panel is drawn by rich's refresh thread (four times a second) from the last
:class:`Snapshot` and the clock, so it keeps moving while the event loop waits on
something long: its elapsed time ticks, and a phase (registering the model,
the ending) shows how long it has taken so far.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich is imported only for a live panel: a batch job's start does not pay for it
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    """What the progress view shows."""

    name: str
    round: int
    max_rounds: int
    successes: int
    target: int
    data_points: int
    sims_check: int
    sims_generate: int
    training: bool
    sims_launched: int
    sims_failed: int
    last_error: float | None
    elapsed_s: float
    starting: bool = False
    """The Dask workers are still starting (sims already run)."""


@dataclass(frozen=True)
class Phase:
    """A step of the campaign outside its sims and training, shown with its age."""

    text: str
    since: float
    """``time.monotonic()`` when it began."""


def may_be_terminal() -> bool:
    """Whether rich could take stderr for a terminal (a TTY, or one forced by rich's environment)."""
    return sys.stderr.isatty() or any(os.environ.get(k) for k in ("FORCE_COLOR", "TTY_INTERACTIVE"))


class Progress:
    """Shows a Snapshot; ``note`` prints one line above the live panel; ``phase`` names a long step."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.console: Console | None = None
        if enabled is None and not may_be_terminal():
            enabled = False
        if enabled is not False:
            from rich.console import Console

            self.console = Console(stderr=True)
        self.live_enabled = bool(self.console is not None and (self.console.is_terminal if enabled is None
                                                                else enabled))
        self._live: Live | None = None
        self._snapshot: Snapshot | None = None
        self._taken = time.monotonic()
        self._phase: Phase | None = None
        self._ended: str | None = None
        """Set by :meth:`end`: the panel stops ticking and says how the campaign ended."""

    def __enter__(self) -> Progress:
        if self.live_enabled:
            from rich.live import Live

            self._live = Live(console=self.console, refresh_per_second=4, transient=False,
                              get_renderable=self._current)
            self._live.__enter__()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._live is not None:
            self._live.__exit__(et, e, tb)
            self._live = None

    def note(self, message: str) -> None:
        if self._live is not None:
            self._live.console.print(message, highlight=False)
        else:
            print(message, file=sys.stderr, flush=True)

    def update(self, s: Snapshot) -> None:
        """The campaign's state now; the panel draws it at its next refresh."""
        self._snapshot, self._taken = s, time.monotonic()

    def phase(self, text: str | None, *, note: bool = False) -> None:
        """Begin a named step (None: back to sims and training); with ``note``, also one line
        (the only sign of it without the live panel)."""
        self._phase = None if text is None else Phase(text, time.monotonic())
        if note and text is not None:
            self.note(f"{text} …")
        if self._live is not None:
            self._live.refresh()  # the step shows at once, not at the next tick

    def end(self, outcome: str, elapsed_s: float) -> None:
        """The last frame: how the campaign ended, and the wall time its summary gives."""
        self._phase = None
        self._ended = outcome
        if self._snapshot is not None:
            self._snapshot.elapsed_s = elapsed_s
        self._taken = time.monotonic()
        if self._live is not None:
            self._live.refresh()

    def _current(self) -> Table:
        """What rich's refresh thread draws now."""
        from rich.table import Table

        if self._snapshot is None:
            return Table(show_header=False, box=None)
        return self._render(self._snapshot, time.monotonic())

    def phase_text(self, s: Snapshot, now: float) -> str:
        if self._ended is not None:
            return f"ended: {self._ended}"
        if self._phase is not None:
            return f"{self._phase.text} … {now - self._phase.since:.1f} s"
        return "starting the Dask workers (sims run meanwhile)" if s.starting else "sims and training"

    def _render(self, s: Snapshot, now: float) -> Table:
        from rich.table import Table

        t = Table(title=f"campaign {s.name}", show_header=False, box=None)
        err = "-" if s.last_error is None else f"{s.last_error:.4f}"
        elapsed = s.elapsed_s if self._ended is not None else s.elapsed_s + now - self._taken
        t.add_row("round", f"{s.round} / {s.max_rounds}")
        t.add_row("successes", f"{s.successes} / {s.target}")
        t.add_row("data points", str(s.data_points))
        t.add_row("in flight", f"{s.sims_check} check, {s.sims_generate} generate sims; "
                  + ("training" if s.training else "no training"))
        t.add_row("sims", f"{s.sims_launched} launched, {s.sims_failed} failed")
        t.add_row("last check error", err)
        t.add_row("now", self.phase_text(s, now))
        t.add_row("elapsed", f"{elapsed:.1f} s")
        return t
