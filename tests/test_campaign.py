"""Whole campaigns on the embedded default: real sims (mpiexec), real Dask, real MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.runlog import EventKind, LoggedEvent
from orchestrator.store import read_events
from tests.conftest import fast_loop, pids_of, write_loop

pytestmark = pytest.mark.integration


def orchestrate(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          timeout=timeout)


def only_run_dir(workdir: Path) -> Path:
    dirs = [d for d in workdir.iterdir() if d.is_dir() and d.name.startswith("sine-")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def events(run_dir: Path) -> list[LoggedEvent]:
    return read_events(run_dir)


def test_reference_campaign_meets_target_and_registers_model(tmp_path: Path) -> None:
    cfg = fast_loop()
    cfg["tracking"] = {"experiment": "test-sine", "register_as": "sine-test"}
    loop = write_loop(tmp_path, cfg)
    work = tmp_path / "runs"
    proc = orchestrate("run", str(loop), "--workdir", str(work), "--no-live")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    run_dir = only_run_dir(work)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["target_met"] is True
    assert summary["successes"] == 5
    assert 1 <= summary["rounds"] <= 6
    assert summary["registered_model"] == {"name": "sine-test", "version": "1"}
    assert summary["sims_failed"] == 0
    assert (run_dir.stat().st_mode & 0o777) == 0o700

    # every accepted row is on disk, and only those
    ev = events(run_dir)
    accepted = [e for e in ev if e.kind is EventKind.DATA_ACCEPTED]
    files = sorted((run_dir / "data").glob("*.npy"))
    assert len(files) == len(accepted)
    gen_files = [f for f in files if f.name.startswith("generate-")]
    gen_accepted = [e for e in accepted if e["role"] == "generate"]
    assert sum(np.load(f).shape[0] for f in gen_files) == summary["data_points"] == sum(e["rows"] for e in gen_accepted)
    # check rows are data too, counted apart: one row per check with a truth, its role named
    check_files = [f for f in files if f.name.startswith("check-")]
    check_accepted = [e for e in accepted if e["role"] == "check"]
    assert len(check_files) + len(gen_files) == len(files) and len(check_accepted) == len(check_files)
    assert summary["check_rows"] == len(check_files) == sum(1 for e in ev if e.kind is EventKind.CHECK
                                                             and "truth" in e) >= 5
    # what the count rule's evidence certifies, stated
    # (of the final model's own checks: successes of earlier versions say nothing of it)
    used = summary["checks_used"]
    last = [e for e in ev if e.kind is EventKind.CHECK and e.get("counted") and e["version"] == summary["rounds"]]
    assert 1 <= used == len(last) <= 5
    assert (summary["rule"], summary["confidence"], summary["checks_failed"]) == ("count", 0.95, 0)
    assert summary["certified_coverage"] == pytest.approx(0.05 ** (1 / used))
    assert summary["certified_statement"].startswith(f"{used}/{used} successes: at 95% confidence, at least ")
    assert f"evidence: {summary['certified_statement']}" in proc.stdout
    checks = [e for e in ev if e.kind is EventKind.CHECK and e.get("success")]
    assert len(checks) == 5 and all(e["error"] < 0.05 for e in checks)
    assert all(abs(e["truth"][0] - np.sin(e["x"][0])) < 1e-12 for e in checks)
    starts = [e for e in ev if e.kind is EventKind.SIM_START]
    assert len(starts) == summary["sims_launched"]
    from orchestrator.launchers.mpiexec import ISOLATE

    # the launcher is mpiexec (run inside a private network namespace where the box allows it)
    launched = [e["argv"][len(ISOLATE):] if e["argv"][: len(ISOLATE)] == ISOLATE else e["argv"] for e in starts]
    assert {argv[0].rsplit("/", 1)[-1] for argv in launched} == {"mpiexec"}

    # the state is final and consistent with the summary
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "target_met" and state["data_points"] == summary["data_points"]
    assert pids_of(str(run_dir)) == [], "sims or workers left running"

    # MLflow: the run with per-round metrics, artifacts, and the registered model
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["target.tolerance"] == "0.05"
    assert "round_train_loss" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loop.yml", "events.jsonl", "summary.json"} <= artifacts
    # the final figure: the model that met the target, its checks, what they certify
    assert (run_dir / "figures/final.png").is_file()
    assert "figures/final.png" in {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    # one story: the MLflow run says what summary.json says
    uploaded = json.loads(Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))).read_text())
    assert uploaded == summary
    assert run.info.status == "FINISHED" and run.data.tags["campaign.run_dir"] == summary["run_dir"]
    assert run.data.tags["campaign.certified_statement"] == summary["certified_statement"]
    assert run.data.metrics["certified_coverage"] == pytest.approx(summary["certified_coverage"])
    assert (run.data.metrics["checks_used"], run.data.metrics["checks_failed"], run.data.metrics["confidence"],
            run.data.metrics["check_rows"]) == (used, 0, 0.95, summary["check_rows"])
    assert run.data.tags["mlflow.note.content"].startswith(
        f"target_met: {summary['rounds']} training round(s), successes {summary['successes']}, "
        f"{summary['data_points']} rows, {summary['sims_launched']} sims ({summary['sims_failed']} failed), "
        f"{summary['wall_s']:.1f} s; registered as sine-test version 1")
    version = client.get_model_version("sine-test", "1")
    assert version.run_id == run.info.run_id
    assert version.tags["campaign_run"] == run.info.run_name and run.info.run_name in version.description

    import torch

    from orchestrator.training.serving import load_registered_model

    model = load_registered_model(f"sqlite:///{work}/mlflow.db", "sine-test")
    xs = torch.linspace(-3.1, 3.1, 50, dtype=torch.float32).reshape(-1, 1)
    with torch.no_grad():
        err = (model(xs).squeeze(1).double() - torch.sin(xs.squeeze(1).double())).abs().max().item()
    assert err < 0.05


def test_stopped_by_max_rounds_exits_3(tmp_path: Path) -> None:
    cfg = fast_loop()
    cfg["target"] = {"tolerance": 1e-9, "successes": 5, "max_rounds": 1}
    loop = write_loop(tmp_path, cfg)
    proc = orchestrate("run", str(loop), "--workdir", str(tmp_path / "runs"), "--no-live")
    assert proc.returncode == 3, proc.stderr[-3000:]
    summary = json.loads((only_run_dir(tmp_path / "runs") / "summary.json").read_text())
    assert summary["target_met"] is False
    assert summary["stop_reason"] == "max_rounds"
    assert summary["rounds"] == 1


def test_seed_makes_a_campaign_reproducible(tmp_path: Path) -> None:
    loop = write_loop(tmp_path, fast_loop(**{"policy.pipeline": False}))
    queries = []
    for i, seed in enumerate([7, 7, 8]):
        work = tmp_path / f"w{i}"
        proc = orchestrate("run", str(loop), "--workdir", str(work), "--set", f"seed={seed}", "--no-live")
        assert proc.returncode == 0, proc.stderr[-2000:]
        run_dir = only_run_dir(work)
        first = sorted((run_dir / "data").glob("*.npy"))[0]
        queries.append(([e["x"] for e in events(run_dir) if e.kind is EventKind.CHECK], np.load(first)))
    assert queries[0][0] == queries[1][0] and np.array_equal(queries[0][1], queries[1][1])
    assert queries[0][0] != queries[2][0]


def test_prechecks_have_truths_ready_when_the_model_arrives(tmp_path: Path) -> None:
    cfg = fast_loop(**{"policy.precheck": True, "policy.checks_per_round": 3})
    cfg["sims"]["generate"]["args"] += ["--work-ms", "800"]
    loop = write_loop(tmp_path, cfg)
    work = tmp_path / "runs"
    proc = orchestrate("run", str(loop), "--workdir", str(work), "--no-live")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = events(only_run_dir(work))
    checks = [e for e in ev if e.kind is EventKind.CHECK]
    prechecked = [e for e in checks if e.get("prechecked")]
    assert prechecked, "no check used a truth computed while the model trained"
    assert all(abs(e["truth"][0] - np.sin(e["x"][0])) < 1e-12 for e in prechecked)
    first_model = next(e["t"] for e in ev if e.kind is EventKind.TRAIN_END)
    check_sims = {e["run_id"]: e["t"] for e in ev if e.kind is EventKind.SIM_START and e["role"] == "check"}
    assert any(t < first_model for t in check_sims.values()), "check sims should start before the model exists"
    # A check whose truth is known is evaluated the moment its model exists, not after the round's picture
    # (a picture holds the worker's one thread for most of a second).
    first_check = min(e["t"] for e in prechecked if e["version"] == 1)
    assert first_check < (only_run_dir(work) / "figures" / "round-0001.png").stat().st_mtime


NO_TORCH = """
import sys
from pathlib import Path
from orchestrator.runner import run_sync
result = run_sync(Path(sys.argv[1]), workdir=Path(sys.argv[2]))
print(result.status.value, result.summary["registered_model"], "torch" in sys.modules)
"""


def test_the_coordinator_never_imports_torch(tmp_path: Path) -> None:
    """A whole campaign, model registration included: torch is imported on the Dask workers only."""
    cfg = fast_loop(**{"target.successes": 2})
    cfg["tracking"] = {"experiment": "no-torch", "register_as": "no-torch"}
    loop = write_loop(tmp_path, cfg)
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(loop), str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "False", f"the coordinator imported torch: {proc.stdout}"
    assert "target_met {'name': 'no-torch', 'version': '1'}" in proc.stdout
