"""Tests for orchestrator.tracking against a real MLflow sqlite store (no mocks).

One sqlite database is shared by the whole module: creating the MLflow schema takes
a few seconds, every later operation milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from orchestrator.tracking import (
    MAX_PARAM_KEY_LENGTH,
    MAX_PARAM_VALUE_LENGTH,
    RegisteredModel,
    Tracker,
    TrackingError,
    default_tracking_uri,
    flatten_params,
)
from orchestrator.training.serving import load_registered_model, register_model
from tests.conftest import REPO

CONFIG = {
    "campaign": {"name": "heat", "rounds": 3, "seed": 7},
    "sim": {"grid": [64, 64], "solver": {"tol": 1e-6, "method": "cg"}, "extra": {}},
    "train": {"lr": 0.001, "early_stop": True, "note": None},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A tracking URI on a fresh sqlite database, schema created once for the module."""
    root = tmp_path_factory.mktemp("run_root")
    uri = default_tracking_uri(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("warmup_cwd"))
        tracker = Tracker(uri, "warmup", "warmup")
        tracker.start({})
        tracker.finish("FINISHED")
    yield uri


@pytest.fixture
def client(store: str) -> MlflowClient:
    return MlflowClient(tracking_uri=store, registry_uri=store)


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run every test in an empty directory and check MLflow left nothing there.

    MLflow falls back to ./mlflow.db and ./mlruns whenever it uses its global state.
    """
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    yield
    assert sorted(p.name for p in work.iterdir()) == []


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def test_default_tracking_uri(tmp_path: Path) -> None:
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.absolute()}/mlflow.db"


def test_start_creates_run_with_params(store: str, client: MlflowClient) -> None:
    tracker = Tracker(store, "exp-start", "campaign-1")
    run_id = tracker.start(CONFIG)
    assert tracker.run_id == run_id
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.info.run_name == "campaign-1"
    assert run.data.params == flatten_params(CONFIG)
    assert run.data.params["sim.solver.tol"] == "1e-06"
    experiment = client.get_experiment_by_name("exp-start")
    assert experiment is not None and experiment.experiment_id == run.info.experiment_id
    # artifacts live next to the database, not in the current directory
    db_dir = Path(store.removeprefix("sqlite:///")).parent
    assert experiment.artifact_location == (db_dir / "mlartifacts").as_uri()
    tracker.finish("FINISHED")
    finished = client.get_run(run_id).info
    assert finished.status == "FINISHED" and finished.end_time is not None


def test_metrics_per_round(store: str, client: MlflowClient) -> None:
    tracker = Tracker(store, "exp-metrics", "m")
    run_id = tracker.start({"a": 1})
    for round_ in range(3):
        tracker.log_metrics({"val_rmse": 1.0 / (round_ + 1), "n_samples": 10 * round_}, step=round_)
    tracker.finish("FINISHED")
    history = client.get_metric_history(run_id, "val_rmse")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 1.0 / 3)]
    assert [m.value for m in client.get_metric_history(run_id, "n_samples")] == [0, 10, 20]


def test_log_metrics_rejects_non_numbers(store: str) -> None:
    tracker = Tracker(store, "exp-metrics", "bad")
    tracker.start({})
    with pytest.raises(TrackingError, match="'loss' at step 4 is not a number"):
        tracker.log_metrics({"loss": "high"}, step=4)  # type: ignore[dict-item]
    tracker.finish("FAILED")


def test_artifacts_listed(store: str, client: MlflowClient, tmp_path: Path) -> None:
    files = tmp_path / "files"
    (files / "plots").mkdir(parents=True)
    (files / "loop.yml").write_text("rounds: 3\n")
    (files / "events.jsonl").write_text('{"event": "start"}\n')
    (files / "summary.json").write_text(json.dumps({"ok": True}))
    (files / "plots" / "report.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    tracker = Tracker(store, "exp-artifacts", "a")
    run_id = tracker.start({})
    for name in ("loop.yml", "events.jsonl", "summary.json"):
        tracker.log_artifact(files / name)
    tracker.log_artifact(str(files / "plots" / "report.png"), artifact_path="report")
    tracker.log_artifact(files / "plots", artifact_path="all_plots")  # a directory
    with pytest.raises(TrackingError, match="no such file"):
        tracker.log_artifact(files / "missing.txt")
    tracker.finish("FINISHED")
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"loop.yml", "events.jsonl", "summary.json", "report", "all_plots"} <= top
    assert [a.path for a in client.list_artifacts(run_id, "report")] == ["report/report.png"]
    assert [a.path for a in client.list_artifacts(run_id, "all_plots")] == ["all_plots/report.png"]


def test_register_twice_and_load(store: str, client: MlflowClient) -> None:
    tracker = Tracker(store, "exp-models", "r")
    run_id = tracker.start({})
    first, second = _net(0), _net(1)
    t0 = time.perf_counter()
    v1 = register_model(tracker, first, "surrogate")
    elapsed = time.perf_counter() - t0
    v2 = register_model(tracker, second, "surrogate")
    tracker.finish("FINISHED")
    assert v1 == RegisteredModel("surrogate", "1")
    assert v2 == RegisteredModel("surrogate", "2")
    assert v2.uri == "models:/surrogate/2"
    assert elapsed < 10, f"register_model took {elapsed:.1f}s (requirement inference?)"
    assert client.get_model_version("surrogate", "2").run_id == run_id

    x = torch.randn(5, 3)
    latest = load_registered_model(store, "surrogate")
    assert not latest.training
    with torch.no_grad():
        assert torch.equal(latest(x), second(x))
        assert torch.equal(load_registered_model(store, "surrogate", 1)(x), first(x))
        assert torch.equal(load_registered_model(store, "surrogate", "2")(x), second(x))


def test_resume_appends_to_same_run(store: str, client: MlflowClient) -> None:
    first = Tracker(store, "exp-resume", "campaign")
    run_id = first.start({"rounds": 2, "lr": 0.1})
    first.log_metrics({"loss": 3.0}, step=0)
    first.finish("KILLED")
    assert client.get_run(run_id).info.status == "KILLED"

    resumed = Tracker(store, "exp-resume", "campaign")
    assert resumed.start({"rounds": 4, "lr": 0.1, "resumed_from": 1}, run_id=run_id) == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    resumed.log_metrics({"loss": 2.0}, step=1)
    resumed.finish("FINISHED")

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    # params are immutable in MLflow: the changed one keeps its value, new ones are added
    assert run.data.params == {"rounds": "2", "lr": "0.1", "resumed_from": "1"}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [
        (0, 3.0),
        (1, 2.0),
    ]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_resume_unknown_or_foreign_run(store: str) -> None:
    with pytest.raises(TrackingError, match="run 0123456789abcdef does not exist"):
        Tracker(store, "exp-resume-bad", "x").start({}, run_id="0123456789abcdef")
    other = Tracker(store, "exp-resume-other", "x")
    other_id = other.start({})
    other.finish("FINISHED")
    with pytest.raises(TrackingError, match="belongs to experiment"):
        Tracker(store, "exp-resume-bad", "x").start({}, run_id=other_id)


def test_unknown_model_lists_what_exists(store: str) -> None:
    tracker = Tracker(store, "exp-unknown", "u")
    tracker.start({})
    register_model(tracker, _net(2), "known-model")
    tracker.finish("FINISHED")
    with pytest.raises(TrackingError, match="no registered model named 'nope'") as info:
        load_registered_model(store, "nope")
    assert "'known-model'" in str(info.value) and store in str(info.value)
    with pytest.raises(TrackingError, match="has no version 9; available versions: 1"):
        load_registered_model(store, "known-model", 9)


def test_quiet_on_stderr_and_stdout(store: str, capfd: pytest.CaptureFixture[str]) -> None:
    tracker = Tracker(store, "exp-quiet", "q")
    tracker.start(CONFIG)
    tracker.log_metrics({"x": 1.0}, step=0)
    register_model(tracker, _net(3), "quiet-model")
    tracker.finish("FINISHED")
    load_registered_model(store, "quiet-model")
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_use_before_start_and_finish_without_start(store: str) -> None:
    tracker = Tracker(store, "exp-misuse", "m")
    with pytest.raises(TrackingError, match=r"Tracker.start\(\) has not been called"):
        tracker.log_metrics({"a": 1.0}, step=0)
    tracker.finish("FAILED")  # no-op, must not raise
    with pytest.raises(ValueError):
        tracker.finish("DONE")  # type: ignore[arg-type]


def test_bad_uris_raise_tracking_error(tmp_path: Path) -> None:
    with pytest.raises(TrackingError, match="file store"):
        Tracker(str(tmp_path / "mlruns"), "e", "r").start({})
    with pytest.raises(TrackingError, match="file store"):
        Tracker((tmp_path / "mlruns").as_uri(), "e", "r").start({})
    with pytest.raises(TrackingError, match="unsupported tracking URI"):
        Tracker("bogus://host", "e", "r").start({})

    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(TrackingError, match=f"server at http://127.0.0.1:{port} is not reachable"):
        Tracker(f"http://127.0.0.1:{port}", "e", "r").start({})
    assert time.perf_counter() - t0 < 10

    not_a_db = tmp_path / "garbage.db"
    not_a_db.write_text("this is not sqlite\n" * 100)
    with pytest.raises(TrackingError, match=f"tracking URI sqlite:///{not_a_db}") as info:
        Tracker(f"sqlite:///{not_a_db}", "e", "r").start({})
    assert info.value.__cause__ is not None


def test_flatten_params() -> None:
    import mlflow.utils.validation as limits

    assert MAX_PARAM_VALUE_LENGTH == limits.MAX_PARAM_VAL_LENGTH
    assert MAX_PARAM_KEY_LENGTH == limits.MAX_ENTITY_KEY_LENGTH

    flat = flatten_params(CONFIG)
    assert flat == {
        "campaign.name": "heat",
        "campaign.rounds": "3",
        "campaign.seed": "7",
        "sim.grid": "[64, 64]",
        "sim.solver.tol": "1e-06",
        "sim.solver.method": "cg",
        "sim.extra": "{}",
        "train.lr": "0.001",
        "train.early_stop": "True",
        "train.note": "None",
    }
    assert flatten_params({"a": {"b": 1}}, prefix="cfg") == {"cfg.a.b": "1"}
    assert flatten_params({"already.flat": 2}) == {"already.flat": "2"}
    assert flatten_params({"bad key!": 1, "x": {"y=z": 2}}) == {"bad key_": "1", "x.y_z": "2"}
    assert flatten_params({"paths": ("a", Path("/b"))}) == {"paths": '["a", "/b"]'}

    long = flatten_params({"blob": "x" * 10_000, "k" * 300: 1})
    value = long["blob"]
    assert len(value) == MAX_PARAM_VALUE_LENGTH and value.endswith("...[truncated]")
    (long_key,) = (k for k in long if k != "blob")
    assert len(long_key) == MAX_PARAM_KEY_LENGTH


def test_long_and_many_params_are_accepted(store: str, client: MlflowClient) -> None:
    params: dict[str, dict[str, object]] = {
        f"group{i}": {f"p{j}": j for j in range(30)} for i in range(8)
    }  # 240 params, more than one log_batch (100) holds
    params["blob"] = {"text": "y" * 20_000}
    tracker = Tracker(store, "exp-many", "p")
    run_id = tracker.start(params)
    tracker.finish("FINISHED")
    logged = client.get_run(run_id).data.params
    assert len(logged) == 241
    assert len(logged["blob.text"]) == MAX_PARAM_VALUE_LENGTH


def test_importing_tracking_changes_no_environment_variable() -> None:
    code = ("import os; before = dict(os.environ); import orchestrator.tracking; "
            "print(sorted(set(os.environ.items()) ^ set(before.items())))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_schema_creation_killed_midway_leaves_nothing_half_made(tmp_path: Path) -> None:
    """SIGKILL a process while it creates a new sqlite store: the next campaign opens it cleanly.

    Before, MLflow built the schema in place and a kill in between left a file every later
    open failed on ("table jobs already exists"); now it appears whole or not at all.
    """
    db = tmp_path / "runs" / "mlflow.db"
    code = ("import sys; from orchestrator.tracking import ready_store; "
            f"ready_store('sqlite:///{db}'); sys.exit(3)")
    child = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 120
    while not list(db.parent.glob(".mlflow.db.init-*")):  # wait for the build to begin
        assert child.poll() is None, "the child ended before it began building the schema"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    child.kill()
    child.wait()
    assert not db.exists(), "a half-built database appeared at the final path"
    tracker = Tracker(f"sqlite:///{db}", "after-kill", "r")
    run_id = tracker.start({"a": 1})
    tracker.finish("FINISHED")
    assert MlflowClient(f"sqlite:///{db}").get_run(run_id).data.params == {"a": "1"}
    assert not list(db.parent.glob(".mlflow.db.init-*")), "the killed builder's file was not cleaned up"


def test_half_created_store_from_an_earlier_version_is_set_aside(tmp_path: Path) -> None:
    """A file whose schema creation never finished (tables, no alembic stamp) is rebuilt, kept aside."""
    import sqlalchemy
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

    db = tmp_path / "mlflow.db"
    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    InitialBase.metadata.create_all(engine)  # what MLflow does first, before its migrations
    engine.dispose()
    tracker = Tracker(f"sqlite:///{db}", "rebuilt", "r")
    tracker.start({})
    tracker.finish("FINISHED")
    (aside,) = tmp_path.glob("mlflow.db.unfinished-*")
    assert aside.stat().st_size > 0


def test_a_held_schema_lock_is_waited_for_a_bounded_time_and_its_holder_named(tmp_path: Path) -> None:
    """Issue 24 item 8: another process holds ``mlflow.db.lock`` (stopped, hung): the wait ends with a
    passing fault naming that process, instead of blocking registration for ever."""
    from orchestrator.tracking import ready_store

    db = tmp_path / "mlflow.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys\n"
         f"fd = os.open({str(db) + '.lock'!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\nsys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        t0 = time.monotonic()
        with pytest.raises(TrackingError) as info:
            ready_store(f"sqlite:///{db}", wait_s=0.5)
        waited = time.monotonic() - t0
        assert 0.5 <= waited < 5, waited
        assert info.value.transient  # a passing fault: the campaign stops resumable (exit 75)
        msg = str(info.value)
        assert f"{db}.lock is held by pid {holder.pid} ({sys.executable} -c import fcntl" in msg, msg
        assert "\n" not in msg
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    ready_store(f"sqlite:///{db}", wait_s=0.5)  # released: taken at once, the schema made
    assert MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()


def test_an_unsupported_uri_is_not_retried_as_a_passing_fault() -> None:
    with pytest.raises(TrackingError) as info:
        Tracker("ftp://example.org/mlflow", "e", "r").start({})
    assert not info.value.transient


@pytest.mark.integration
def test_registration_behind_a_held_schema_lock_stops_resumable_naming_the_holder(tmp_path: Path) -> None:
    """Issue 24 item 8, end to end: another process holds ``mlflow.db.lock`` when the target is met. The
    registration waits SCHEMA_LOCK_WAIT_S, then the campaign stops resumable (75) with one line naming the
    holder; once the lock is free, the resume registers the model."""
    import fcntl
    import os

    from orchestrator.tracking import SCHEMA_LOCK_WAIT_S
    from tests.fault_chain import campaign_loop, start

    loop = campaign_loop(tmp_path, "lk", **{"target.successes": 1})
    work = tmp_path / "runs"
    proc = start(loop, work)
    fd = -1
    try:
        deadline = time.monotonic() + 240
        while fd < 0:  # MLflow's start has taken and released the lock once it names its run
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            states = list(work.glob("lk-*/state.json"))
            with contextlib.suppress(OSError, ValueError):
                if states and json.loads(states[0].read_text()).get("mlflow_run_id"):
                    fd = os.open(work / "mlflow.db.lock", os.O_RDWR)
                    fcntl.flock(fd, fcntl.LOCK_EX)
            time.sleep(0.05)
        t_held = time.monotonic()
        _, err = proc.communicate(timeout=SCHEMA_LOCK_WAIT_S + 240)
        assert proc.returncode == 75, err[-3000:]
        assert time.monotonic() - t_held >= SCHEMA_LOCK_WAIT_S - 1
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
        assert f"mlflow.db.lock is held by pid {os.getpid()} (" in errors[0], errors
    finally:
        if fd >= 0:
            os.close(fd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run_dir = next(work.glob("lk-*"))
    done = subprocess.run([sys.executable, "-m", "orchestrator", "run", "--resume", str(run_dir), "--no-live"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "model registered as lk-surrogate version 1" in done.stdout
