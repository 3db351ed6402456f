"""The run log's schema: event kinds and their fields, the campaign state, the summary.

``events.jsonl`` is the contract users' own tools read: one JSON object per line,
``{"t": wall, "mono": monotonic, "event": <kind>, ...fields}``. Each kind is an
:class:`EventKind` with a dataclass naming its fields; the campaign writes
dataclasses (:meth:`orchestrator.store.RunStore.log`) and every reader (``report``,
``status``, tests) reads :class:`LoggedEvent` back through :func:`parse_events`.
``state.json`` is :class:`State`; ``summary.json`` is :func:`build_summary`'s result,
the one summary that ``run`` prints, ``campaign_end`` logs and ``report`` extends.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from orchestrator.errors import ExitCode

log = logging.getLogger(__name__)


class EventKind(enum.StrEnum):
    """Every kind of line in events.jsonl."""

    CAMPAIGN_START = "campaign_start"
    CAMPAIGN_ERROR = "campaign_error"
    CAMPAIGN_END = "campaign_end"
    SIM_START = "sim_start"
    SIM_END = "sim_end"
    CHECK = "check"
    DATA_ACCEPTED = "data_accepted"
    TRAIN_START = "train_start"
    TRAIN_END = "train_end"
    TRAIN_FAILED = "train_failed"
    TRAINING_BACKEND = "training_backend"
    REGISTERING = "registering"
    MODEL_REGISTERED = "model_registered"
    WALLTIME_SKIP = "walltime_skip"
    CHAMPION = "champion"
    MONITOR_CHECK = "monitor_check"
    DRIFT = "drift"
    RETRAIN = "retrain"
    CHALLENGER = "challenger"
    STEPS_START = "steps_start"
    STEPS_END = "steps_end"
    EVALUATE = "evaluate"
    SCORES = "scores"


class Status(enum.StrEnum):
    """A campaign's state (RUNNING until it ends). INTERRUPTED is not failure."""

    RUNNING = "running"
    REGISTERING = "registering"  # target met, the model not yet registered; a resume finishes it
    TARGET_MET = "target_met"
    STOPPED = "stopped"  # max_rounds, time or data budget
    INTERRUPTED = "interrupted"  # signalled; resumable
    FAILED = "failed"

    @property
    def resumable(self) -> bool:
        return self in (Status.RUNNING, Status.REGISTERING, Status.INTERRUPTED)

    @property
    def exit_code(self) -> ExitCode:
        """What the CLI returns for a campaign that ended in this state."""
        return {Status.TARGET_MET: ExitCode.OK, Status.STOPPED: ExitCode.STOPPED,
                Status.INTERRUPTED: ExitCode.INTERRUPTED,
                Status.REGISTERING: ExitCode.INTERRUPTED}.get(self, ExitCode.ERROR)


# -- events written ---------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """Base of every event; ``extra`` holds launcher-specific facts, written flat."""

    KIND: ClassVar[EventKind]

    def record(self) -> dict[str, Any]:
        """The fields as written after ``t``, ``mono`` and ``event``."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out.update(getattr(self, "extra", {}))
        return out


@dataclass(frozen=True)
class CampaignStart(Event):
    KIND = EventKind.CAMPAIGN_START
    resumed: bool
    run_dir: str
    seed: int
    sim_slots: dict[str, int]
    allocation_end: float | None = None
    """When the Slurm allocation ends (epoch s), if Slurm told."""
    exit_at: float | None = None
    """When the campaign must be out: the end less the warning signal's lead and a margin."""


@dataclass(frozen=True)
class WalltimeSkip(Event):
    """A sim was not started: it was expected to run past the allocation's exit time."""

    KIND = EventKind.WALLTIME_SKIP
    role: str
    expected_s: float | None
    left_s: float


@dataclass(frozen=True)
class CampaignError(Event):
    KIND = EventKind.CAMPAIGN_ERROR
    error: str
    message: str


@dataclass(frozen=True)
class SimStart(Event):
    KIND = EventKind.SIM_START
    run_id: str
    role: str
    attempt: int
    ranks: int
    launcher: str
    placement: tuple[tuple[str, int], ...]
    argv: list[str]
    """What really runs: the launcher's argv (for spawn, the agent's request)."""


@dataclass(frozen=True)
class SimEnd(Event):
    KIND = EventKind.SIM_END
    run_id: str
    role: str
    outcome: str
    attempt: int | None = None
    returncode: int | None = None
    wall_s: float | None = None
    message: str | None = None
    rows: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """A cancelled run has only its id, role and outcome (as the reports expect)."""
        return {k: v for k, v in super().record().items()
                if v is not None or k not in ("attempt", "wall_s", "message")}


@dataclass(frozen=True)
class Check(Event):
    KIND = EventKind.CHECK
    x: list[float]
    version: int
    outcome: str | None = None
    predicted: list[float] | None = None
    truth: list[float] | None = None
    error: float | None = None
    success: bool | None = None
    stale: bool | None = None
    successes: int | None = None
    prechecked: bool | None = None
    spread: float | None = None
    """The ensemble members' largest spread (standard deviation) over the outputs at x."""
    counted: bool | None = None
    """The check counted toward its version's verdict (False: stale, or in flight when it was decided)."""
    version_passed: int | None = None
    """Checks of the current version passed so far (counted ones)."""
    version_failed: int | None = None
    verdict: str | None = None
    """The certified rule: the version's verdict after this check (open, certified, rejected)."""
    data_file: str | None = None
    """Where the check's row joined the training data (data/check-N.npy); None: it did not."""

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in super().record().items() if v is not None}


@dataclass(frozen=True)
class DataAccepted(Event):
    KIND = EventKind.DATA_ACCEPTED
    path: str
    rows: int
    data_points: int
    """Generate rows accepted so far (check rows are counted in ``check_rows``)."""
    role: str = "generate"
    """The sim role the rows come from: generate, or check (a check's truth joining the training data)."""
    check_rows: int = 0
    """Check rows in the training data so far."""


@dataclass(frozen=True)
class TrainStart(Event):
    KIND = EventKind.TRAIN_START
    version: int
    files: int
    rows: int
    workers: Any
    members: int = 1
    """Ensemble members trained in this round, side by side."""


@dataclass(frozen=True)
class TrainEnd(Event):
    KIND = EventKind.TRAIN_END
    version: int
    extra: dict[str, float] = field(default_factory=dict)
    """The training's metrics (train_loss, train_rmse, ...), data_points and successes."""


@dataclass(frozen=True)
class TrainFailed(Event):
    """A training round diverged (non-finite loss): the model stays at ``version``, the campaign goes on."""

    KIND = EventKind.TRAIN_FAILED
    version: int
    message: str
    in_a_row: int


@dataclass(frozen=True)
class Scores(Event):
    """The ensemble evaluated on a fresh candidate pool, for the sampling strategy."""

    KIND = EventKind.SCORES
    version: int
    candidates: int
    pool_spread_mean: float
    pool_spread_max: float


@dataclass(frozen=True)
class TrainingBackend(Event):
    KIND = EventKind.TRAINING_BACKEND
    warm_up_s: float
    extra: dict[str, Any] = field(default_factory=dict)
    """The backend's own description (scheduler, workers, ...)."""


@dataclass(frozen=True)
class Registering(Event):
    """The target is met and state.json says ``registering``: the model goes to the registry next."""

    KIND = EventKind.REGISTERING
    name: str
    key: str | None = None
    """The registration's key (``final-model-v3``, ``challenger-c2``): a resumed registration under the
    same key finds the version made before instead of making a second one."""


@dataclass(frozen=True)
class ModelRegistered(Event):
    KIND = EventKind.MODEL_REGISTERED
    name: str
    version: str


@dataclass(frozen=True)
class CampaignEnd(Event):
    KIND = EventKind.CAMPAIGN_END
    extra: dict[str, Any] = field(default_factory=dict)
    """The summary (:func:`build_summary`) without run_dir."""


@dataclass(frozen=True)
class Champion(Event):
    """Continual mode: the model in service (the registry alias) is now this one."""

    KIND = EventKind.CHAMPION
    model: int
    registered: str | None
    clock: int
    reason: str
    """target_met (the phase began) or promoted."""


@dataclass(frozen=True)
class MonitorCheck(Event):
    """Continual mode: one monitoring check of the champion (and of a pending challenger, same point)."""

    KIND = EventKind.MONITOR_CHECK
    clock: int
    x: list[float]
    truth: list[float]
    champion: int | None
    error: float
    success: bool
    challenger: int | None = None
    challenger_error: float | None = None


@dataclass(frozen=True)
class Drift(Event):
    KIND = EventKind.DRIFT
    clock: int
    failure_rate: float
    window: int
    champion: int | None


@dataclass(frozen=True)
class Retrain(Event):
    """Continual mode: a challenger trained on the recent-data window (``files``) and registered."""

    KIND = EventKind.RETRAIN
    clock: int
    model: int
    registered: str | None
    files: list[str]
    rows: int
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Challenger(Event):
    """Continual mode: a challenger judged against the champion on the same fresh checks."""

    KIND = EventKind.CHALLENGER
    verdict: str
    clock: int
    challenger: int
    registered: str | None
    champion: int | None
    champion_error: float
    challenger_error: float
    checks: int


@dataclass(frozen=True)
class StepsStart(Event):
    KIND = EventKind.STEPS_START
    steps: list[str]


@dataclass(frozen=True)
class Evaluate(Event):
    """``--steps evaluate``: a model's error against fresh check sims."""

    KIND = EventKind.EVALUATE
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StepsEnd(Event):
    KIND = EventKind.STEPS_END
    extra: dict[str, Any] = field(default_factory=dict)


# -- events read ------------------------------------------------------------


@dataclass(frozen=True)
class LoggedEvent:
    """One line of events.jsonl as read back."""

    kind: EventKind | str
    """An :class:`EventKind`; a kind this version does not know stays a string."""
    t: float
    mono: float
    fields: Mapping[str, Any]

    @classmethod
    def parse(cls, record: Mapping[str, Any]) -> LoggedEvent:
        raw = str(record.get("event", ""))
        kind: EventKind | str = EventKind(raw) if raw in EventKind._value2member_map_ else raw
        rest = {k: v for k, v in record.items() if k not in ("t", "mono", "event")}
        return cls(kind, float(record.get("t", 0.0)), float(record.get("mono", record.get("t", 0.0))), rest)

    def __getitem__(self, key: str) -> Any:
        if key == "t":
            return self.t
        if key == "mono":
            return self.mono
        if key == "event":
            return str(self.kind)
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: str) -> bool:
        return key in ("t", "mono", "event") or key in self.fields

    def is_(self, kind: EventKind) -> bool:
        return self.kind is kind


def parse_events(lines: Iterable[str], source: str = "events.jsonl") -> list[LoggedEvent]:
    """Parse events.jsonl lines; a torn (half-written) line is skipped with a warning."""
    events = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an event")
            events.append(LoggedEvent.parse(record))
        except (ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
            log.warning("%s:%d: skipping an unreadable line (%s)", source, n, str(exc)[:80])
    return events


def of_kind(events: Iterable[LoggedEvent], kind: EventKind) -> list[LoggedEvent]:
    return [e for e in events if e.kind is kind]


# -- state and summary ------------------------------------------------------


@dataclass
class State:
    """Everything a resume needs; state.json is this, rewritten after every step."""

    model_version: int = 0
    model_file: str | None = None
    successes: int = 0
    checks_done: int = 0
    failed_current: bool = False
    data_files: list[str] = field(default_factory=list)
    """Accepted data files, relative to the run dir, in acceptance order: generate results and the
    rows of checks (``data/check-N.npy``, see :func:`data_role`)."""
    untrained: list[str] = field(default_factory=list)
    """Generate results no training has used yet (check rows join the next training without being waited for)."""
    data_points: int = 0
    """Generate rows accepted."""
    check_rows: int = 0
    """Check rows in the training data."""
    version_passed: int = 0
    """Checks of the current model version that passed (and counted toward its verdict)."""
    version_failed: int = 0
    evidence: dict[str, Any] = field(default_factory=dict)
    """What the current version's checks certify (:class:`orchestrator.policy.Evidence`)."""
    sims_launched: int = 0
    sims_failed: int = 0
    launch_counter: int = 0
    failed_points: list[list[float]] = field(default_factory=list)
    recheck: list[list[float]] = field(default_factory=list)
    """Query points whose check failed: checked again against the next model."""
    rng: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    """Wall time of earlier sessions of this campaign (resume adds to it)."""
    mlflow_run_id: str | None = None
    status: Status = Status.RUNNING
    stop_reason: str | None = None
    last_error: float | None = None
    rounds: list[dict[str, float]] = field(default_factory=list)
    """Metrics of each finished training."""
    sim_durations: dict[str, dict[str, float]] = field(default_factory=dict)
    """Running wall-time estimates per sim role (:class:`orchestrator.loop.walltime.Durations`)."""
    continual: dict[str, Any] = field(default_factory=dict)
    """Continual mode's state (:class:`orchestrator.loop.continual.ContinualState`)."""
    member_files: list[str] = field(default_factory=list)
    """Checkpoints of the current model's ensemble members (the first is ``model_file``)."""
    sampling_rng: dict[str, Any] = field(default_factory=dict)
    """The sampling strategy's RNG state."""
    loop_dir: str | None = None
    """The folder of the loop.yml the run started from (a user's strategy module is there)."""
    unsent_metrics: list[list[Any]] = field(default_factory=list)
    """[metrics, step] pairs MLflow had not taken when the last session ended; the resume sends them."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> State:
        """The state in state.json's content; a field of the wrong kind is a ValueError naming it and its value."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        hints = _state_hints()
        for name, value in known.items():
            if not _fits(value, hints[name]):
                shown = repr(value)
                raise ValueError(f"{name}: got {shown[:57] + '...' if len(shown) > 60 else shown}, expected "
                                 f"{_type_name(hints[name])}")
        if "status" in known:
            known["status"] = Status(known["status"])
        return cls(**known)

    def to_json(self) -> dict[str, Any]:
        # Shallow: json.dumps copies nothing, and asdict's deep copy of the growing lists
        # was most of a coordinator event's cost.
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["status"] = self.status.value
        return out


@functools.cache
def _state_hints() -> dict[str, Any]:
    return typing.get_type_hints(State)


def _fits(value: Any, hint: Any) -> bool:
    """Whether JSON ``value`` is of type ``hint``: scalars, unions with None, Status by value, lists
    element by element; a dict's contents are the code's own (not checked)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is Status:
        return isinstance(value, str) and value in Status._value2member_map_
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return True  # Any, and types this check does not know


def _type_name(hint: Any) -> str:
    if hint is Status:
        return f"one of {', '.join(Status._value2member_map_)}"
    if hint is int:
        return "a count (an integer >= 0)"
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def status_of(state: Mapping[str, Any]) -> Status | None:
    """The status of a state.json's content (None if it has none this version knows)."""
    raw = state.get("status")
    return Status(raw) if isinstance(raw, str) and raw in Status._value2member_map_ else None


def build_summary(
    state: State, wall_s: float, run_dir: str, registered: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The campaign's summary: summary.json, the ``campaign_end`` event, ``run``'s last lines."""
    return {
        "target_met": state.status is Status.TARGET_MET,
        "status": state.status.value,
        "stop_reason": state.stop_reason,
        "rounds": state.model_version,
        "successes": state.successes,
        "checks": state.checks_done,
        "data_points": state.data_points,
        "check_rows": state.check_rows,
        **evidence_summary(state.evidence),
        "sims_launched": state.sims_launched,
        "sims_failed": state.sims_failed,
        "wall_s": round(wall_s, 3),
        "registered_model": dict(registered) if registered else None,
        "mlflow_run_id": state.mlflow_run_id,
        **continual_summary(state.continual),
        "run_dir": run_dir,
    }


EVIDENCE_FIELDS = ("rule", "certified_coverage", "confidence", "checks_used", "checks_failed", "checks_needed",
                   "certified_statement")
"""What the checks certify, in every summary (see :class:`orchestrator.policy.Evidence`)."""


def evidence_summary(e: Mapping[str, Any]) -> dict[str, Any]:
    """The evidence's part of the summary (None where a run of an older version recorded none)."""
    return {k: e.get(k) for k in EVIDENCE_FIELDS}


def data_role(rel: str) -> str:
    """The sim role a data file's rows come from, by its name: ``check`` or ``generate``."""
    return "check" if rel.rsplit("/", 1)[-1].startswith("check-") else "generate"


def continual_summary(c: Mapping[str, Any]) -> dict[str, Any]:
    """Continual mode's part of the summary (zeros and None for a campaign without it)."""
    champion = c.get("champion_registered")
    return {
        "retrains": int(c.get("retrains", 0)),
        "promotions": int(c.get("promotions", 0)),
        "champion_version": champion if champion is not None else c.get("champion_model"),
        "drift_events": int(c.get("drift_events", 0)),
    }
