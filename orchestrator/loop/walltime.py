"""Walltime-aware placement: when the allocation ends, and how long each sim kind takes.

Slurm tells when the allocation ends (:func:`allocation_end`: ``SLURM_JOB_END_TIME``
where Slurm sets it, else ``squeue -h -j JOB -o %e``, else ``scontrol show job``'s
``EndTime``). :class:`Durations` keeps a running estimate of each sim kind's wall
time. :class:`WalltimeGuard` combines the two: a sim starts only if it is expected to
end before the campaign must be out (``exit_at``: the allocation's end less the lead
of Slurm's warning signal and a safety margin); at ``exit_at`` the campaign
checkpoints and exits with the resumable code, before the signal comes.

Pure parsers, thin process calls, and nothing queried at import time.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from orchestrator.errors import CommandError
from orchestrator.procs import run_checked

log = logging.getLogger(__name__)

_END_TIME = re.compile(r"\bEndTime=(\S+)")
_UNKNOWN = {"", "N/A", "NONE", "UNKNOWN", "UNLIMITED", "INVALID"}


def parse_slurm_time(text: str) -> float | None:
    """Epoch seconds of a Slurm timestamp (``2026-12-01T23:15:04``, local time), or None.

    >>> parse_slurm_time("N/A") is None
    True
    """
    text = text.strip()
    if text.upper() in _UNKNOWN:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def parse_scontrol_end(text: str) -> float | None:
    """``EndTime`` out of ``scontrol show job`` output."""
    match = _END_TIME.search(text)
    return parse_slurm_time(match.group(1)) if match else None


def allocation_end(env: Mapping[str, str] | None = None) -> float | None:
    """When the Slurm job this process runs in ends (epoch seconds); None outside Slurm or unknown."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    if env.get("SLURM_JOB_END_TIME", "").isdigit():
        return float(env["SLURM_JOB_END_TIME"])
    for argv, parse in ((["squeue", "-h", "-j", job, "-o", "%e"], parse_slurm_time),
                        (["scontrol", "show", "job", job], parse_scontrol_end)):
        try:
            end = parse(run_checked(argv, timeout=30))
        except CommandError as exc:
            log.debug("job %s: %s", job, exc)
            continue
        if end is not None:
            return end
    log.warning("job %s: cannot tell when the allocation ends (squeue, scontrol); walltime guard off", job)
    return None


@dataclass
class Durations:
    """Running estimate of each sim kind's wall time: the larger of the recent mean and the
    last run, so a kind that slows down is noticed at once (exponential mean, weight ``alpha``)."""

    alpha: float = 0.3
    mean: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)

    def observe(self, kind: str, seconds: float) -> None:
        old = self.mean.get(kind)
        self.mean[kind] = seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds
        self.last[kind] = seconds

    def expected(self, kind: str) -> float | None:
        """Expected wall time of the next run of ``kind``; None before the first one ends."""
        if kind not in self.mean:
            return None
        return max(self.mean[kind], self.last[kind])

    def to_json(self) -> dict[str, dict[str, float]]:
        return {"mean": dict(self.mean), "last": dict(self.last)}

    @classmethod
    def from_json(cls, data: Mapping[str, Mapping[str, float]] | None) -> Durations:
        data = data or {}
        return cls(mean=dict(data.get("mean", {})), last=dict(data.get("last", {})))


@dataclass
class WalltimeGuard:
    """Whether a sim still fits before the campaign must be out, and when that is."""

    end: float
    """The allocation's end, epoch seconds."""
    signal_lead_s: float
    """Slurm's warning signal comes this long before the end (``--signal=B:USR1@120``)."""
    safety_s: float
    """Extra time kept for the checkpoint and the exit."""
    durations: Durations = field(default_factory=Durations)

    @property
    def exit_at(self) -> float:
        """Epoch seconds by which the campaign has checkpointed and exited."""
        return self.end - self.signal_lead_s - self.safety_s

    def remaining(self, now: float | None = None) -> float:
        return self.exit_at - (time.time() if now is None else now)

    def fits(self, kind: str, now: float | None = None) -> bool:
        """A run of ``kind`` started now is expected to end before ``exit_at`` (unknown kinds fit
        while any time is left: their first run is how the estimate starts)."""
        left = self.remaining(now)
        expected = self.durations.expected(kind)
        return left > 0 and (expected is None or expected <= left)
