"""One MLflow server for many campaigns; validate warns about sqlite on a shared filesystem.

The server test starts a real ``mlflow server`` on loopback (it needs the ``ui``
extra, full mlflow: ``pip install -e '.[ui]'``, which ``make setup`` installs), runs three
campaigns at once against it, each registering versions of the same model name, and
checks from the server that no metric was lost and the versions are in order.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.sharedfs import parse_mounts, shared_filesystem, sqlite_on_shared_fs
from tests.conftest import REPO, fast_loop, write_loop

MOUNTS = """\
/dev/vda1 / ext4 rw,relatime 0 0
tmpfs /dev/shm tmpfs rw 0 0
fs1:/export/home /home nfs4 rw,vers=4.2 0 0
10.0.0.1@o2ib:/scratch /lus/scratch lustre rw 0 0
/dev/vdb1 /home/alice/local\\040disk ext4 rw 0 0
"""


def test_shared_filesystems_are_told_from_local_ones() -> None:
    assert [m.fstype for m in parse_mounts(MOUNTS)] == ["ext4", "tmpfs", "nfs4", "lustre", "ext4"]
    assert shared_filesystem(Path("/home/alice/runs/mlflow.db"), MOUNTS) == "nfs4"
    assert shared_filesystem(Path("/lus/scratch/u/mlflow.db"), MOUNTS) == "lustre"
    assert shared_filesystem(Path("/tmp/mlflow.db"), MOUNTS) is None
    assert shared_filesystem(Path("/home/alice/local disk/mlflow.db"), MOUNTS) is None  # a local disk inside
    assert shared_filesystem(Path("/homework/x.db"), MOUNTS) is None  # /home is not a prefix of /homework
    warning = sqlite_on_shared_fs("sqlite:////lus/scratch/u/mlflow.db", MOUNTS)
    assert warning is not None and "shared lustre filesystem" in warning and "mlflow server" in warning
    assert sqlite_on_shared_fs("http://127.0.0.1:5000", MOUNTS) is None
    assert sqlite_on_shared_fs("sqlite:////tmp/mlflow.db", MOUNTS) is None


def test_validate_is_quiet_about_a_local_sqlite_file(tmp_path: Path) -> None:
    cfg = fast_loop(**{"tracking": {"enabled": True, "uri": f"sqlite:///{tmp_path}/mlflow.db"}})
    loop = write_loop(tmp_path, cfg)
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(loop)], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    if shared_filesystem(tmp_path, Path("/proc/mounts").read_text()) is None:
        assert "warning" not in proc.stderr


# ---------------------------------------------------------------- the real server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    pytest.importorskip("flask", reason="the MLflow server needs the `ui` extra (full mlflow): pip install -e '.[ui]'")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
            "--artifacts-destination", str(tmp_path / "server-artifacts")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with (tmp_path / "server.log").open("wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server not up after 120 s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def _events(run_dir: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


@pytest.mark.full  # the long matrix: `make test-full` (CI runs the subset, see README)
@pytest.mark.integration
def test_three_campaigns_share_one_server(mlflow_server: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    procs = []
    for i in range(3):
        cfg = fast_loop(seed=i, **{"target.successes": 1, "training.hparams": {"epochs": 150},
                                   "tracking": {"enabled": True, "uri": mlflow_server, "experiment": "shared",
                                                "register_as": "shared-surrogate"}})
        loop = write_loop(tmp_path, cfg, name=f"loop{i}.yml")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "run", str(loop), "--workdir", str(tmp_path / f"runs{i}"),
             "--no-live"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]

    client = MlflowClient(tracking_uri=mlflow_server)
    run_ids = set()
    for i in range(3):
        (run_dir,) = [d for d in (tmp_path / f"runs{i}").iterdir() if d.is_dir() and d.name.startswith("sine-")]
        summary = json.loads((run_dir / "summary.json").read_text())
        run_ids.add(summary["mlflow_run_id"])
        ev = _events(run_dir)
        checks = [e for e in ev if e["event"] == "check" and "error" in e]
        trains = [e for e in ev if e["event"] == "train_end"]
        # every metric the campaign logged is on the server, step for step
        history = client.get_metric_history(summary["mlflow_run_id"], "check_error")
        assert sorted(m.step for m in history) == list(range(1, len(checks) + 1))
        assert sorted(m.value for m in history) == sorted(float(e["error"]) for e in checks)  # type: ignore[arg-type]
        rounds = client.get_metric_history(summary["mlflow_run_id"], "round_data_points")
        assert sorted(m.step for m in rounds) == [int(e["version"]) for e in trains]  # type: ignore[call-overload]
        assert client.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"
    assert len(run_ids) == 3

    versions = sorted(client.search_model_versions("name='shared-surrogate'"), key=lambda v: int(v.version))
    assert [v.version for v in versions] == ["1", "2", "3"]  # one per campaign, none lost or doubled
    assert {v.run_id for v in versions} == run_ids
    created = [v.creation_timestamp for v in versions]
    assert created == sorted(created), "versions are numbered in the order they were registered"
