"""What happened in a run, read from its run directory alone.

``status`` prints where a running or finished campaign stands; ``report`` adds
a timeline PNG (one lane per sim slot per node, one for training) and a text
summary of where the time went. Both only read ``state.json`` and
``events.jsonl``, so they work on a live run and on a copy of one.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.runlog import EventKind, LoggedEvent, Status, build_summary, evidence_summary, of_kind
from orchestrator.store import RunStore


@dataclass
class Interval:
    """A span on the timeline, in seconds since the first event."""

    kind: str  # check | generate | train
    start: float
    end: float
    outcome: str = "ok"
    node: str = ""
    slots: int = 1
    run_id: str = ""


@dataclass
class Timeline:
    sims: list[Interval] = field(default_factory=list)
    trainings: list[Interval] = field(default_factory=list)
    t0: float = 0.0
    end: float = 0.0
    target_at: float | None = None
    slots: dict[str, int] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    services: list[Interval] = field(default_factory=list)
    """Time nobody would otherwise see: the Dask workers' start, the model's registration."""


def build_timeline(events: list[LoggedEvent]) -> Timeline:
    """Pair start/end events into intervals (an unfinished one ends at the last event)."""
    tl = Timeline()
    if not events:
        return tl
    tl.t0 = events[0].t
    tl.end = events[-1].t - tl.t0
    open_sims: dict[str, dict[str, Any]] = {}
    train_start: float | None = None
    session_start = 0.0
    last_check = 0.0
    for e in events:
        t = e.t - tl.t0
        kind = e.kind
        if kind is EventKind.CAMPAIGN_START:
            tl.slots.update(e.get("sim_slots") or {})
            train_start = None  # a resumed run: an interrupted training is gone
            session_start = t
        elif kind is EventKind.TRAINING_BACKEND:
            tl.services.append(Interval("Dask start", session_start, t))
        elif kind is EventKind.MODEL_REGISTERED:
            tl.services.append(Interval("MLflow registration", last_check, t))
        elif kind is EventKind.SIM_START:
            open_sims[e["run_id"]] = {**e.fields, "t_rel": t}
        elif kind is EventKind.SIM_END and e["run_id"] in open_sims:
            s = open_sims.pop(e["run_id"])
            for node, n in (s.get("placement") or [["", s.get("ranks", 1)]]):
                tl.sims.append(Interval(s["role"], s["t_rel"], t, e.get("outcome", "ok"), node, n, e["run_id"]))
        elif kind is EventKind.TRAIN_START:
            train_start = t
        elif kind is EventKind.TRAIN_END and train_start is not None:
            tl.trainings.append(Interval("train", train_start, t))
            train_start = None
        elif kind is EventKind.CHECK:
            tl.checks.append({**e.fields, "t": e.t, "t_rel": t})
            last_check = t
    for s in open_sims.values():
        for node, n in (s.get("placement") or [["", s.get("ranks", 1)]]):
            tl.sims.append(Interval(s["role"], s["t_rel"], tl.end, "running", node, n, s["run_id"]))
    if train_start is not None:
        tl.trainings.append(Interval("train", train_start, tl.end, "running"))
    tl.target_at = _target_time(events, tl)
    return tl


def _target_time(events: list[LoggedEvent], tl: Timeline) -> float | None:
    """When the check that met the target came in (None if it was not met)."""
    ends = of_kind(events, EventKind.CAMPAIGN_END)
    if not ends or not ends[-1].get("target_met"):
        return None
    needed = ends[-1].get("successes")
    return next((c["t_rel"] for c in tl.checks if c.get("success") and c.get("successes") == needed), None)


def union_length(spans: list[tuple[float, float]]) -> float:
    """Total length covered by the union of spans."""
    total, cur_start, cur_end = 0.0, None, None
    for a, b in sorted(spans):
        if cur_end is None or a > cur_end:
            if cur_end is not None and cur_start is not None:
                total += cur_end - cur_start
            cur_start, cur_end = a, b
        else:
            cur_end = max(cur_end, b)
    if cur_end is not None and cur_start is not None:
        total += cur_end - cur_start
    return total


def overlap_fraction(tl: Timeline) -> float | None:
    """Share of training time during which at least one sim ran."""
    train_total = sum(t.end - t.start for t in tl.trainings)
    if train_total <= 0:
        return None
    sims = [(s.start, s.end) for s in tl.sims]
    covered = 0.0
    for t in tl.trainings:
        clipped = [(max(a, t.start), min(b, t.end)) for a, b in sims if b > t.start and a < t.end]
        covered += union_length(clipped)
    return covered / train_total


def summarize(run_dir: Path) -> dict[str, Any]:
    """Where the time went: the campaign's summary and the figures `report` adds to it."""
    store = RunStore.open(run_dir)
    events = store.read_events()
    state = store.read_campaign_state()
    tl = build_timeline(events)
    slot_total = sum(tl.slots.values()) or 1
    sim_busy = sum((s.end - s.start) * s.slots for s in tl.sims)
    train_busy = sum(t.end - t.start for t in tl.trainings)
    ends = [e for e in of_kind(events, EventKind.SIM_END) if "wall_s" in e]
    starts = {e["run_id"]: e for e in of_kind(events, EventKind.SIM_START)}
    overheads = [
        (e.mono - starts[e["run_id"]].mono) - e["wall_s"] for e in ends if e["run_id"] in starts
    ]
    walls = [e["wall_s"] for e in ends if e.get("outcome") == "ok"]
    overlap = overlap_fraction(tl)
    registered = next((e.fields for e in reversed(of_kind(events, EventKind.MODEL_REGISTERED))), None)
    return {
        # The counts and the wall time a campaign reports are its own (state.json), whatever
        # view shows them: `run`'s last lines, summary.json, `status`, this report.
        **build_summary(state, state.elapsed_s, str(run_dir),
                        None if registered is None else {k: str(registered[k]) for k in ("name", "version")}),
        "time_to_target_s": None if tl.target_at is None else round(tl.target_at, 3),
        "dask_start_s": _span(tl, "Dask start"),
        "registration_s": _span(tl, "MLflow registration"),
        "sims_cancelled": sum(1 for e in of_kind(events, EventKind.SIM_END) if e.get("outcome") == "cancelled"),
        "sim_slot_busy_fraction": round(sim_busy / (slot_total * tl.end), 4) if tl.end else None,
        "training_busy_fraction": round(train_busy / tl.end, 4) if tl.end else None,
        "overlap_fraction": None if overlap is None else round(overlap, 4),
        "median_sim_wall_s": round(statistics.median(walls), 4) if walls else None,
        "median_launch_overhead_s": round(statistics.median(overheads), 4) if overheads else None,
    }


def _span(tl: Timeline, kind: str) -> float | None:
    spans = [s.end - s.start for s in tl.services if s.kind == kind]
    return round(sum(spans), 3) if spans else None


def _lanes(intervals: list[Interval]) -> list[tuple[Interval, int]]:
    """Greedy lane assignment: each interval takes the first lane free at its start."""
    lanes_end: list[float] = []
    placed = []
    for iv in sorted(intervals, key=lambda i: i.start):
        for lane, end in enumerate(lanes_end):
            if end <= iv.start:
                lanes_end[lane] = iv.end
                placed.append((iv, lane))
                break
        else:
            lanes_end.append(iv.end)
            placed.append((iv, len(lanes_end) - 1))
    return placed


COLORS = {"check": "#4c72b0", "generate": "#55a868", "train": "#c44e52"}


def plot_timeline(run_dir: Path, out: Path) -> Path:
    """Timeline PNG: per node a band of lanes for sims, one lane for training; failures hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    store = RunStore.open(run_dir)
    tl = build_timeline(store.read_events())
    nodes = sorted({s.node for s in tl.sims})
    rows: list[tuple[str, list[tuple[Interval, int]]]] = [(n, _lanes([s for s in tl.sims if s.node == n]))
                                                          for n in nodes]
    height = sum(max((lane for _, lane in r), default=0) + 1 for _, r in rows) + 1
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.32 * height))
    y = 0
    ticks, labels = [], []
    for node, placed in rows:
        nlanes = max((lane for _, lane in placed), default=0) + 1
        for iv, lane in placed:
            failed = iv.outcome not in ("ok", "running", "cancelled")
            ax.broken_barh([(iv.start, max(iv.end - iv.start, 1e-3))], (y + lane + 0.1, 0.8),
                           facecolors=COLORS.get(iv.kind, "grey"), edgecolor="black" if failed else "none",
                           hatch="xx" if failed else None, alpha=0.5 if iv.outcome == "cancelled" else 1.0)
        ticks.append(y + nlanes / 2)
        labels.append(f"{node or 'sims'} ({nlanes} lanes)")
        y += nlanes
    for t in tl.trainings:
        ax.broken_barh([(t.start, t.end - t.start)], (y + 0.1, 0.8), facecolors=COLORS["train"])
    ticks.append(y + 0.5)
    labels.append("training")
    for c in tl.checks:
        ax.plot(c["t_rel"], y + 0.5, marker="o" if c.get("success") else "x",
                color="black" if c.get("success") else "red", markersize=4)
    y += 1
    for s in tl.services:  # labelled, so the start-up and registration time is not a silent gap
        ax.broken_barh([(s.start, max(s.end - s.start, 1e-3))], (y + 0.1, 0.8), facecolors="lightgrey",
                       edgecolor="grey")
        ax.text(s.start + 0.01, y + 0.5, f"{s.kind} {s.end - s.start:.1f} s", va="center", fontsize=7)
    if tl.services:
        ticks.append(y + 0.5)
        labels.append("services")
    if tl.target_at is not None:
        ax.axvline(tl.target_at, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("seconds since campaign start")
    ax.set_title(f"{run_dir.name}: sims by kind, trainings, checks (o success, x failure)")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLORS.items()]
              + [Patch(facecolor="white", edgecolor="black", hatch="xx", label="failed")],
              loc="upper right", fontsize=8)
    ax.set_xlim(0, max(tl.end, 1e-3))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def format_summary(s: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    def sec(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f} s"

    return "\n".join([
        f"run            {s['run_dir']} ({s['status']})",
        f"wall time      {sec(s['wall_s'])}; time to target {sec(s['time_to_target_s'])}",
        f"progress       {s['rounds']} training round(s), {s['successes']} successes, {s['data_points']} data points"
        f" + {s.get('check_rows') or 0} check rows",
        evidence_line(s, "evidence       "),
        f"sims           {s['sims_launched']} launched, {s['sims_failed']} failed, {s['sims_cancelled']} cancelled; "
        f"median wall {sec(s['median_sim_wall_s'])}, "
        f"median launch overhead {sec(s['median_launch_overhead_s'])}",
        f"busy           sim slots {pct(s['sim_slot_busy_fraction'])}, training {pct(s['training_busy_fraction'])}",
        f"overlap        {pct(s['overlap_fraction'])} of training time had a sim running",
        f"services       Dask start {sec(s['dask_start_s'])}, MLflow registration {sec(s['registration_s'])}",
    ])


def evidence_line(s: Mapping[str, Any], label: str = "evidence   ") -> str:
    """What the checks certify: the rule's numbers and the sentence (every rule)."""
    if s.get("certified_statement") is None:
        return f"{label}- (a run of a version that did not record it)"
    return (f"{label}{s['certified_statement']} [{s['rule']} rule: certified_coverage "
            f"{s['certified_coverage']:.4f}, confidence {s['confidence']:g}, checks_used {s['checks_used']}, "
            f"checks_failed {s['checks_failed']}]")


def _needed(target: Mapping[str, Any]) -> Any:
    """Successes the target needs: the certified rule's passes, else target.successes."""
    if target.get("coverage") is None and target.get("confidence") is None:
        return target.get("successes", "?")
    from orchestrator.config import TargetConfig
    from orchestrator.policy import plan

    p = plan(TargetConfig.model_validate(target))
    return "?" if p is None else p.passes_needed


def status_text(run_dir: Path) -> str:
    """Where a running or finished campaign stands."""
    store = RunStore.open(run_dir)
    cfg = store.read_state().get("config", {})
    state = store.read_campaign_state()
    running = _running_sims(store.read_events()) if state.status is Status.RUNNING else []
    target = cfg.get("target", {})
    lines = [
        f"campaign   {cfg.get('name', '?')} in {run_dir}",
        f"status     {state.status.value}" + (f" ({state.stop_reason})" if state.stop_reason else ""),
        f"rounds     {state.model_version} / {target.get('max_rounds', '?')}",
        f"successes  {state.successes} / {_needed(target)}",
        evidence_line(evidence_summary(state.evidence)),
        f"data       {state.data_points} generate rows + {state.check_rows} check rows "
        f"in {len(state.data_files)} files",
        f"sims       {state.sims_launched} launched, {state.sims_failed} failed, "
        f"{len(running)} running" + (f": {', '.join(running)}" if running else ""),
        f"elapsed    {state.elapsed_s:.1f} s",
    ]
    lines += continual_lines(state.continual, cfg)
    if state.status.resumable:
        lines.append(f"resume     python -m orchestrator run --resume {run_dir}")
    return "\n".join(lines)


def _running_sims(events: list[LoggedEvent]) -> list[str]:
    """Run ids started in the latest session and not ended."""
    last_start = max((i for i, e in enumerate(events) if e.kind is EventKind.CAMPAIGN_START), default=0)
    running: dict[str, None] = {}
    for e in events[last_start:]:
        if e.kind is EventKind.SIM_START:
            running[e["run_id"]] = None
        elif e.kind is EventKind.SIM_END:
            running.pop(e["run_id"], None)
    return sorted(running)


def continual_lines(c: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """Continual mode in ``status``: the champion, the drift state, the last retrain."""
    if not c.get("active"):
        return []
    name = (cfg.get("tracking") or {}).get("register_as")
    reg = c.get("champion_registered")
    champion = f"model {c.get('champion_model')}" + (f" ({name} v{reg})" if reg and name else "")
    drift = "drifting (a challenger is being trained or judged)" if c.get("drifting") else "none"
    if c.get("challenger_model") is not None:
        drift += f"; challenger model {c['challenger_model']} waits for the next round's checks"
    last = c.get("last_retrain")
    lines = [
        f"champion   {champion}",
        f"drift      {drift} (campaign time {c.get('clock', 0)}, {c.get('drift_events', 0)} drift(s), "
        f"{c.get('retrains', 0)} retrain(s), {c.get('promotions', 0)} promotion(s))",
    ]
    if last:
        lines.append(f"retrained  model {last.get('model')} at campaign time {last.get('clock')} on "
                     f"{last.get('rows')} recent rows ({len(last.get('files', []))} file(s))")
    return lines
