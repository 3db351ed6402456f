"""report and status: pure timeline arithmetic, and the commands on a real finished run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.report import build_timeline, overlap_fraction, union_length
from orchestrator.runlog import EventKind, LoggedEvent
from orchestrator.store import read_events
from tests.conftest import fast_loop, write_loop


def ev(t: float, event: str, **kw: Any) -> LoggedEvent:
    return LoggedEvent(EventKind(event), t, t, kw)


def test_union_length() -> None:
    assert union_length([]) == 0
    assert union_length([(0, 1), (0.5, 2), (3, 4)]) == 3
    assert union_length([(0, 10), (1, 2)]) == 10


def test_overlap_fraction_counts_union_of_sims_within_trainings() -> None:
    events = [
        ev(0, "campaign_start", sim_slots={"n1": 8}),
        ev(1, "train_start"),
        ev(1.5, "sim_start", run_id="g1", role="generate", placement=[["n1", 4]]),
        ev(2.0, "sim_start", run_id="g2", role="generate", placement=[["n1", 4]]),
        ev(2.5, "sim_end", run_id="g1", outcome="ok"),
        ev(3.0, "sim_end", run_id="g2", outcome="ok"),
        ev(5, "train_end"),
    ]
    tl = build_timeline(events)
    assert len(tl.trainings) == 1 and len(tl.sims) == 2
    assert overlap_fraction(tl) == pytest.approx(1.5 / 4)


def test_unfinished_sims_and_trainings_end_at_the_last_event() -> None:
    events = [ev(0, "campaign_start"), ev(1, "train_start"),
              ev(2, "sim_start", run_id="c1", role="check", placement=[["n1", 2]]), ev(4, "check")]
    tl = build_timeline(events)
    assert tl.sims[0].end == 4 and tl.sims[0].outcome == "running"
    assert tl.trainings[0].end == 4


def test_dask_start_and_registration_are_labelled_spans() -> None:
    events = [ev(0, "campaign_start"), ev(2.5, "training_backend"), ev(4, "check", success=True),
              ev(6, "check", success=True), ev(10.5, "model_registered", name="m", version="1"),
              ev(11, "campaign_end")]
    tl = build_timeline(events)
    assert [(s.kind, s.start, s.end) for s in tl.services] == [("Dask start", 0, 2.5),
                                                               ("MLflow registration", 6, 10.5)]


def test_no_training_means_no_overlap_figure() -> None:
    assert overlap_fraction(build_timeline([ev(0, "campaign_start")])) is None


@pytest.mark.integration
def test_report_and_status_of_a_pipelined_campaign(tmp_path: Path) -> None:
    cfg = fast_loop()
    cfg["sims"]["generate"]["args"] += ["--work-ms", "1500"]
    cfg["policy"]["generates_per_round"] = 2
    loop = write_loop(tmp_path, cfg)
    work = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(loop), "--workdir", str(work),
                           "--no-live"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = next(work.glob("sine-*"))

    # the pipelined policy really ran a generate sim while the surrogate trained
    events = read_events(run_dir)
    t_train = next(e["t"] for e in events if e.kind is EventKind.TRAIN_START)
    t_trained = next(e["t"] for e in events if e.kind is EventKind.TRAIN_END)
    start = {e["run_id"]: e["t"] for e in events if e.kind is EventKind.SIM_START and e["role"] == "generate"}
    during = [e for e in events if e.kind is EventKind.SIM_END and e["run_id"] in start
              and start[e["run_id"]] < t_trained and e["t"] > t_train]
    assert during, "no generate sim ran while the first training ran"

    rep = subprocess.run([sys.executable, "-m", "orchestrator", "report", str(run_dir), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    summary = json.loads(rep.stdout)
    assert summary["status"] == "target_met"
    assert summary["overlap_fraction"] > 0
    assert 0 < summary["time_to_target_s"] <= summary["wall_s"]
    assert 0 < summary["sim_slot_busy_fraction"] <= 1
    assert summary["dask_start_s"] > 0 and summary["registration_s"] is None  # tracking is off here
    png = Path(summary["timeline_png"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    st = subprocess.run([sys.executable, "-m", "orchestrator", "status", str(run_dir)],
                        capture_output=True, text=True, timeout=60)
    assert st.returncode == 0
    assert "status     target_met" in st.stdout and "successes  5 / 5" in st.stdout

    # every view tells the same story: the run's last line, summary.json, report, status
    written = json.loads((run_dir / "summary.json").read_text())
    shared = ("status", "rounds", "successes", "checks", "data_points", "sims_launched", "sims_failed", "wall_s",
              "registered_model", "mlflow_run_id")
    assert {k: summary[k] for k in shared} == {k: written[k] for k in shared}
    last = (f"target_met: {written['rounds']} training round(s), successes {written['successes']}, "
            f"{written['data_points']} data points, {written['sims_launched']} sims ({written['sims_failed']} "
            f"failed), {written['wall_s']:.1f} s")
    assert last in proc.stdout
    assert f"sims       {written['sims_launched']} launched, {written['sims_failed']} failed" in st.stdout
    assert f"elapsed    {written['wall_s']:.1f} s" in st.stdout
    trained = [e for e in events if e.kind is EventKind.TRAIN_END]
    for e in trained:  # the progress line says how many rows the model trained on, not what had arrived since
        assert f"training round {e['version']} done: trained on {int(e['n_samples'])} rows" in proc.stdout + proc.stderr


def test_status_of_a_non_run_dir_is_a_clear_error(tmp_path: Path) -> None:
    st = subprocess.run([sys.executable, "-m", "orchestrator", "status", str(tmp_path)],
                        capture_output=True, text=True, timeout=60)
    assert st.returncode == 1
    assert "is not a run directory" in st.stderr and "Traceback" not in st.stderr
