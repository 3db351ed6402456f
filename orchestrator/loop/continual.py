"""Continual mode's decisions, as pure functions of its state: drift, the recent-data window, promotion.

After a campaign meets its target, a continual campaign keeps its model current
(a digital twin of a system that drifts): every monitoring round checks the
champion at fresh points; when the drift rule fires (a failure rate over the
champion's last N checks), fresh data is generated and a challenger is trained
on the most recent data only; the challenger becomes the champion (an MLflow
registry alias) only when it beats the champion on the same fresh checks, the
next round's. Nothing here touches processes, Dask, files or MLflow: the driver
(:mod:`orchestrator.loop.twin`) applies these decisions and records them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator.config import ContinualConfig


class Verdict(enum.StrEnum):
    """How a challenger fared against the champion on the same checks."""

    PROMOTED = "promoted"
    KEPT = "kept"
    """The challenger lost (or tied): the champion stays."""


@dataclass(frozen=True)
class DataFile:
    """An accepted data file as the window sees it."""

    path: str
    rows: int
    t: float
    """Wall time it was accepted."""


@dataclass
class ContinualState:
    """The continual phase's part of state.json (``state.continual``)."""

    active: bool = False
    """The target was met and the phase began."""
    clock: int = 0
    """``{campaign_time}``: monitoring rounds started."""
    rounds_done: int = 0
    started_elapsed_s: float | None = None
    """Campaign elapsed time when the phase began (its time budget counts from here)."""
    champion_model: int | None = None
    """Run-dir model version (models/model-NNNN.pt) of the champion."""
    champion_registered: str | None = None
    """Its registry version under ``tracking.register_as`` (None without tracking)."""
    challenger_model: int | None = None
    challenger_registered: str | None = None
    recent_failures: list[bool] = field(default_factory=list)
    """Outcomes of the champion's monitoring checks since the last decision (True: failed)."""
    drifting: bool = False
    """The drift rule fired and no decision has been made since."""
    drift_events: int = 0
    retrains: int = 0
    promotions: int = 0
    last_retrain: dict[str, Any] | None = None
    """{clock, model, registered, rows, files} of the latest retraining."""
    data: list[dict[str, Any]] = field(default_factory=list)
    """Every accepted data file, {path, rows, t (wall time accepted)}, in acceptance order."""

    def data_files(self) -> list[DataFile]:
        return [DataFile(str(d["path"]), int(d["rows"]), float(d["t"])) for d in self.data]

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> ContinualState:
        if not data:
            return cls()
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def drift_detected(recent_failures: Sequence[bool], cfg: ContinualConfig) -> bool:
    """The drift rule: at least ``drift_failure_rate`` of the last ``drift_window`` checks failed."""
    window = list(recent_failures)[-cfg.drift_window:]
    if len(window) < cfg.drift_window:
        return False
    return sum(window) / len(window) >= cfg.drift_failure_rate


def recent_window(files: Sequence[DataFile], cfg: ContinualConfig, now: float) -> list[DataFile]:
    """The data a retraining uses: the newest whole files within ``window_rows`` and ``window_s``.

    Files are taken newest first while the total stays within ``window_rows`` (the
    newest file is always taken, however large); an age window drops files accepted
    before ``now - window_s``. Returned in acceptance order.
    """
    chosen: list[DataFile] = []
    rows = 0
    for f in reversed(files):
        if cfg.window_s is not None and f.t < now - cfg.window_s:
            break
        if cfg.window_rows is not None and chosen and rows + f.rows > cfg.window_rows:
            break
        chosen.append(f)
        rows += f.rows
    return list(reversed(chosen))


def mean_error(errors: Sequence[float]) -> float:
    return sum(errors) / len(errors) if errors else float("inf")


def verdict(champion_errors: Sequence[float], challenger_errors: Sequence[float], cfg: ContinualConfig) -> Verdict:
    """Promote only a challenger that beats the champion on the same checks (by the margin)."""
    if not challenger_errors or len(champion_errors) != len(challenger_errors):
        return Verdict.KEPT
    if mean_error(challenger_errors) < (1.0 - cfg.promote_margin) * mean_error(champion_errors):
        return Verdict.PROMOTED
    return Verdict.KEPT


def phase_over(s: ContinualState, cfg: ContinualConfig, elapsed_s: float) -> bool:
    """The continual phase's end: its round limit or its time budget."""
    if cfg.max_rounds is not None and s.rounds_done >= cfg.max_rounds and s.challenger_model is None:
        return True
    started = s.started_elapsed_s if s.started_elapsed_s is not None else elapsed_s
    return cfg.time_budget_s is not None and elapsed_s - started >= cfg.time_budget_s
