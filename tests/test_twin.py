"""Continual mode end to end: the drifting example on real sims, real Dask, real MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration


def events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_drifting_twin_retrains_on_recent_rows_and_promotes_only_a_winner(tmp_path: Path) -> None:
    work = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(REPO / "examples/drift/loop.yml"),
                           "--workdir", str(work), "--no-live", "--set", "tracking.tensorboard_dir=tb"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [d for d in work.iterdir() if d.name.startswith("drift-")]
    ev = events(run_dir)
    initial_data = {e["path"] for e in ev if e["event"] == "data_accepted"
                    and e["t"] < next(x["t"] for x in ev if x["event"] == "champion")}

    # drift detected at the glitch (time 2) and after the shift (time 4), never before
    drifts = [e for e in ev if e["event"] == "drift"]
    assert [d["clock"] for d in drifts] == [2, 4]
    ok_before = [e for e in ev if e["event"] == "monitor_check" and e["clock"] == 1]
    assert ok_before and all(e["success"] for e in ok_before)

    # each retrain used only the rows generated after its drift, none of the initial data
    retrains = [e for e in ev if e["event"] == "retrain"]
    assert len(retrains) == 2
    for r in retrains:
        assert r["rows"] <= 128 and not set(r["files"]) & initial_data

    # the glitch's challenger lost on the next round's checks; the shift's won and is the champion
    verdicts = [(e["clock"], e["verdict"]) for e in ev if e["event"] == "challenger"]
    assert verdicts == [(3, "kept"), (5, "promoted")]
    lost, won = (e for e in ev if e["event"] == "challenger")
    assert lost["challenger_error"] > lost["champion_error"] and won["challenger_error"] < won["champion_error"]
    after = [e for e in ev if e["event"] == "monitor_check" and e["clock"] == 6]
    assert after and all(e["success"] for e in after), "the promoted champion tracks the shifted truth"

    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["retrains"], summary["promotions"], summary["drift_events"]) == (2, 1, 2)
    assert summary["champion_version"] == won["registered"] == "3"

    from orchestrator.tracking import model_alias
    from orchestrator.training.serving import load_registered_model

    uri = f"sqlite:///{work}/mlflow.db"
    assert model_alias(uri, "drift-surrogate", "champion") == "3"
    assert lost["registered"] == "2"  # registered as a version, never promoted
    load_registered_model(uri, "drift-surrogate", "2")

    # a picture of every training round: in the run dir, in MLflow, in TensorBoard
    trainings = [e["version"] for e in ev if e["event"] == "train_end"]
    pngs = sorted(p.name for p in (run_dir / "figures").glob("round-*.png"))
    assert pngs == [f"round-{v:04d}.png" for v in trainings]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    logged = {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "figures")}
    assert (run_dir / "figures" / "final.png").is_file()  # and the met target's verdict (issue 22)
    assert logged == {f"figures/{p}" for p in [*pngs, "final.png"]}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tb_file,) = (run_dir / "tb").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(tb_file), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [i.step for i in acc.Images("round")] == trainings
    assert all(i.encoded_image_string.startswith(b"\x89PNG") for i in acc.Images("round"))
    assert [s.step for s in acc.Scalars("round/train_rmse")] == trainings

    status = subprocess.run([sys.executable, "-m", "orchestrator", "status", str(run_dir)], capture_output=True,
                            text=True, timeout=60)
    assert "champion   model 3 (drift-surrogate v3)" in status.stdout, status.stdout
    assert "drift      none" in status.stdout


def test_continual_mode_resumes_after_a_signal(tmp_path: Path) -> None:
    import signal
    import time

    work = tmp_path / "runs"
    cmd = [sys.executable, "-m", "orchestrator", "run", str(REPO / "examples/drift/loop.yml"), "--workdir", str(work),
           "--no-live", "--set", "tracking.figures=false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    run_dir = None
    while time.monotonic() < deadline and proc.poll() is None:  # watch the run log for the first retrain
        dirs = [d for d in work.glob("drift-*") if (d / "events.jsonl").exists()]
        if dirs and any(e["event"] == "retrain" for e in events(dirs[0])):
            run_dir = dirs[0]
            break
        time.sleep(0.1)
    assert run_dir is not None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "interrupted" and state["continual"]["active"]

    again = subprocess.run([sys.executable, "-m", "orchestrator", "run", "--resume", str(run_dir), "--no-live"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    ev = events(run_dir)
    assert [(e["clock"], e["verdict"]) for e in ev if e["event"] == "challenger"] == [(3, "kept"), (5, "promoted")]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["promotions"] == 1 and summary["retrains"] == 2 and summary["status"] == "target_met"
