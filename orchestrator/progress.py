"""Live progress on the terminal: a rich panel when stdout is a TTY, log lines otherwise."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from types import TracebackType

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


class Progress:
    """Shows a Snapshot; ``note`` prints one line above the live panel."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.console = Console(stderr=True)
        self.live_enabled = self.console.is_terminal if enabled is None else enabled
        self._live: Live | None = None

    def __enter__(self) -> Progress:
        if self.live_enabled:
            self._live = Live(console=self.console, refresh_per_second=4, transient=False)
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
        if self._live is not None:
            self._live.update(self._render(s))

    def _render(self, s: Snapshot) -> Table:
        t = Table(title=f"campaign {s.name}", show_header=False, box=None)
        err = "-" if s.last_error is None else f"{s.last_error:.4f}"
        t.add_row("round", f"{s.round} / {s.max_rounds}")
        t.add_row("successes", f"{s.successes} / {s.target}")
        t.add_row("data points", str(s.data_points))
        t.add_row("in flight", f"{s.sims_check} check, {s.sims_generate} generate sims; "
                  + ("training" if s.training else "no training"))
        t.add_row("sims", f"{s.sims_launched} launched, {s.sims_failed} failed")
        t.add_row("last check error", err)
        t.add_row("elapsed", f"{s.elapsed_s:.1f} s")
        return t
