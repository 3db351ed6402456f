"""A second local account reaches nothing of a campaign's through any port the project opens.

The account is real: made with ``useradd`` when missing (the tests run as root, here and in
CI; elsewhere they skip, saying why). Every probe runs as that account (``runuser -u USER --``,
the system Python with only its standard library) against the listening sockets psutil finds
in the processes the test started: the ``ui`` command's tree, and the Dask scheduler, workers
and nannies of a local training backend. A registered model that someone else slipped into
the registry is refused by ``predict`` without running its payload.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from orchestrator.config import CHAMPION_ALIAS
from orchestrator.tracking import Tracker, default_tracking_uri
from orchestrator.training.serving import register_model
from tests.conftest import REPO

OTHER = "orch-intruder"
MODEL = "owned-surrogate"
SYSTEM_PYTHON = "/usr/bin/python3"

# Runs as the other account: stdlib only. argv[1]: a JSON list of probes; prints a JSON list of outcomes:
# the status line an HTTP server answered, or why there was none.
PROBE = r'''
import json, socket, ssl, sys

def talk(sock, request):
    sock.sendall(request)
    data = b""
    while len(data) < 65536:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0].decode(errors="replace") or "closed without an answer"

def http(p):
    body = p.get("body", "").encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in p.get("headers", {}).items())
    request = (f"{p['method']} {p['path']} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{head}\r\n").encode() + body
    family = socket.AF_UNIX if "unix" in p else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(15)
    try:
        sock.connect(p["unix"] if "unix" in p else ("127.0.0.1", p["port"]))
        if p.get("tls"):
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            sock = ctx.wrap_socket(sock)
        return talk(sock, request)
    except (OSError, ssl.SSLError) as exc:
        return f"refused: {type(exc).__name__} {getattr(exc, 'errno', '')}"
    finally:
        sock.close()

print(json.dumps([http(p) for p in json.loads(sys.argv[1])]))
'''


@pytest.fixture(scope="module")
def other_user() -> str:
    """A second, unprivileged local account, created when missing."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create and act as a second local account (useradd, runuser)")
    if shutil.which("useradd") is None or shutil.which("runuser") is None or not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"needs useradd, runuser and {SYSTEM_PYTHON}")
    try:
        pwd.getpwnam(OTHER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER],
                       check=True, capture_output=True)
    return OTHER


def as_other(user: str, probes: list[dict[str, Any]]) -> list[str]:
    """Each probe's outcome, tried by ``user``."""
    proc = subprocess.run(["runuser", "-u", user, "--", SYSTEM_PYTHON, "-I", "-S", "-c", PROBE, json.dumps(probes)],
                          capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr
    outcomes: list[str] = json.loads(proc.stdout)
    return outcomes


def listening(pids: set[int]) -> tuple[set[int], set[str]]:
    """The TCP ports and Unix socket paths on which the processes ``pids`` listen."""
    ports, paths = set(), set()
    for conn in psutil.net_connections("inet"):
        if conn.pid in pids and conn.status == psutil.CONN_LISTEN:
            ports.add(conn.laddr.port)
    for pid in pids:
        for conn in psutil.Process(pid).net_connections("unix"):
            if conn.laddr and conn.status == psutil.CONN_NONE:
                paths.add(conn.laddr)
    return ports, paths


def small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir whose mlflow.db holds a campaign's run and one registered version, the champion."""
    root = tmp_path_factory.mktemp("owned")
    tracker = Tracker(default_tracking_uri(root), "owned", "sine-owned")
    tracker.start({"purpose": "owner-only tests"})
    version = register_model(tracker, small_model(1), MODEL).version
    tracker.set_alias(MODEL, CHAMPION_ALIAS, version)
    tracker.finish("FINISHED")
    return root


def registry_state(root: Path) -> dict[str, Any]:
    """What another account must not be able to change: experiments, versions, the champion, artifact files."""
    from mlflow.tracking import MlflowClient

    uri = default_tracking_uri(root)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return {"experiments": sorted(e.name for e in client.search_experiments()),
            "versions": sorted((v.name, v.version) for v in client.search_model_versions()),
            "champion": client.get_model_version_by_alias(MODEL, CHAMPION_ALIAS).version,
            "files": sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix != ".db"
                            and "lock" not in p.name)}


# ---------------------------------------------------------------- the UI


@pytest.fixture(scope="module")
def ui(store: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    pytest.importorskip("flask", reason="the MLflow UI needs the `ui` extra (full mlflow): pip install -e '.[ui]'")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "ui", str(store)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("MLflow UI for "), line
    yield proc, line.split(": ", 1)[1].split()[0]
    proc.terminate()
    proc.wait(60)


def test_another_account_can_neither_read_nor_write_through_the_ui(ui: tuple[subprocess.Popen[str], str],
                                                                    store: Path, other_user: str) -> None:
    proc, url = ui
    base, _, token = url.partition("/?token=")
    tree = {proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))}
    ports, paths = listening(tree)
    front = int(base.rsplit(":", 1)[1])
    assert ports == {front}, f"the ui's processes listen on TCP ports {ports}; only the front {front} may"
    assert paths, "the MLflow server listens on no Unix socket"
    before = registry_state(store)

    api = "/api/2.0/mlflow"
    attempts: list[dict[str, Any]] = [
        {"method": "GET", "path": "/"},
        {"method": "GET", "path": "/?token=guess"},
        {"method": "GET", "path": f"{api}/experiments/search?max_results=10"},
        {"method": "GET", "path": f"{api}/registered-models/search",
         "headers": {"Cookie": f"orchestrator-ui-{front}=x"}},
        {"method": "POST", "path": f"{api}/experiments/create",
         "body": json.dumps({"name": "intruder", "artifact_location": "/tmp/intruder"})},
        {"method": "POST", "path": f"{api}/model-versions/create",
         "body": json.dumps({"name": MODEL, "source": "/tmp/intruder/model", "run_id": ""})},
        {"method": "POST", "path": f"{api}/registered-models/alias",
         "body": json.dumps({"name": MODEL, "alias": CHAMPION_ALIAS, "version": "1"}),
         "headers": {"Authorization": "Bearer guess"}},
        {"method": "PUT", "path": "/api/2.0/mlflow-artifacts/artifacts/1/intruder.txt", "body": "written by another"},
    ]
    probes = [{**a, "port": front} for a in attempts]
    probes += [{**a, "unix": path} for path in sorted(paths) for a in attempts]
    outcomes = as_other(other_user, probes)
    for probe, outcome in zip(probes, outcomes, strict=True):
        where = probe.get("unix", probe.get("port"))
        if "unix" in probe:
            assert outcome.startswith("refused: PermissionError"), (where, probe["path"], outcome)
        else:
            assert outcome.startswith("HTTP/1.1 403"), (where, probe["method"], probe["path"], outcome)
    assert registry_state(store) == before

    # the owner, with the printed URL's token, is let in (so a refusal above is the front's, not a dead server)
    owner = as_other("root", [{"method": "GET", "path": f"{api}/experiments/search?max_results=10",
                               "headers": {"Authorization": f"Bearer {token}"}, "port": front}])
    assert owner == ["HTTP/1.1 200 OK"]


# ---------------------------------------------------------------- Dask


def test_another_account_gets_no_answer_from_any_dask_port(other_user: str) -> None:
    """Scheduler, workers and nannies of the local backend: every port demands the campaign's client certificate."""
    from orchestrator.config import TrainingConfig
    from orchestrator.training.backends import LocalBackend

    async def probe() -> tuple[set[int], list[dict[str, Any]], list[str]]:
        me = psutil.Process()
        others = {p.pid for p in me.children(recursive=True)}  # not the backend's (another test's ui, say)
        backend = LocalBackend(TrainingConfig(workers=2))
        client = await backend.start()
        try:
            assert await client.submit(sum, [1, 2]) == 3  # the campaign itself gets through
            ports, _ = listening({me.pid, *(p.pid for p in me.children(recursive=True))} - others)
            paths = ("/health", "/info/main/workers.html", "/json/identity.json")
            probes = [{"method": "GET", "path": path, "port": port, "tls": tls}
                      for port in sorted(ports) for path in paths for tls in (False, True)]
            return ports, probes, await asyncio.to_thread(as_other, other_user, probes)
        finally:
            await backend.close()

    ports, probes, outcomes = asyncio.run(probe())
    assert len(ports) >= 5, f"expected a scheduler and two workers with their nannies, found ports {ports}"
    answered = [(p["port"], p["path"], p["tls"], o) for p, o in zip(probes, outcomes, strict=True)
                if o.startswith("HTTP/")]
    assert answered == [], f"Dask ports answered another account: {answered}"


def test_another_account_cannot_reach_the_workers_forkserver(other_user: str) -> None:
    """The local workers' forkserver (it forks a process for whoever sends it a pickle) listens on a
    Unix socket that only the campaign's account may connect to."""
    from multiprocessing import forkserver

    from orchestrator.config import TrainingConfig
    from orchestrator.training.backends import LocalBackend

    async def start_and_close() -> None:
        backend = LocalBackend(TrainingConfig(workers=1))
        await backend.start()
        await backend.close()

    asyncio.run(start_and_close())
    server = forkserver._forkserver._forkserver_pid
    assert server is not None
    _, paths = listening({server})
    assert paths, "the forkserver listens on no Unix socket"
    outcomes = as_other(other_user, [{"method": "GET", "path": "/", "unix": path} for path in sorted(paths)])
    assert outcomes == ["refused: PermissionError 13"] * len(paths), outcomes


# ---------------------------------------------------------------- models someone else registered


class Payload:
    """Pickled, it runs ``touch MARKER`` when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _mlflow_model_dir(where: Path, marker: Path) -> Path:
    """A directory shaped like an MLflow pytorch model whose model.pth is the payload."""
    (where / "data").mkdir(parents=True)
    torch.save(Payload(marker), where / "data" / "model.pth")
    (where / "data" / "pickle_module_info.txt").write_text("pickle")
    (where / "MLmodel").write_text("flavors:\n  pytorch:\n    model_data: data\n    pytorch_version: 2.0\n")
    return where


def _predict(root: Path, model: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", "predict", "--model", model, "--x", "0.5",
                           "--workdir", str(root)], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_a_version_from_outside_the_campaign_is_refused_unrun(tmp_path: Path) -> None:
    """The issue's attack: an experiment of someone else's with its own artifact root, a run there, its pickle
    registered as a new version of the campaign's model, and the champion alias moved to it."""
    from mlflow.tracking import MlflowClient

    root = tmp_path / "runs"
    tracker = Tracker(default_tracking_uri(root), "owned", "sine-owned")
    tracker.start({})
    register_model(tracker, small_model(1), MODEL)
    tracker.finish("FINISHED")
    marker = tmp_path / "payload-ran"
    uri = default_tracking_uri(root)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    theirs = client.create_experiment("intruder", artifact_location=(tmp_path / "intruder").as_uri())
    run = client.create_run(theirs)
    client.log_artifacts(run.info.run_id, str(_mlflow_model_dir(tmp_path / "evil", marker)), "model")
    version = client.create_model_version(MODEL, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(MODEL, CHAMPION_ALIAS, version.version)

    proc = _predict(root, MODEL)
    assert proc.returncode != 0 and not marker.exists()
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"model '{MODEL}' version {version.version}" in proc.stderr and "refusing to load it" in proc.stderr
    assert "not in this store's own artifacts" in proc.stderr


def test_a_pickle_inside_the_campaigns_artifacts_is_not_unpickled(tmp_path: Path) -> None:
    """A version of the campaign's own whose model.pth became a hostile pickle: torch's weights-only loader
    admits only torch module classes, so the payload's ``os.system`` is named and refused, never called."""
    root = tmp_path / "runs"
    tracker = Tracker(default_tracking_uri(root), "owned", "sine-owned")
    tracker.start({})
    version = register_model(tracker, small_model(1), MODEL).version
    tracker.finish("FINISHED")
    (pth,) = (root / "mlartifacts").rglob("data/model.pth")
    marker = tmp_path / "payload-ran"
    torch.save(Payload(marker), pth)

    proc = _predict(root, f"{MODEL}/{version}")
    assert proc.returncode != 0 and not marker.exists()
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "system, which is not an importable torch module class" in proc.stderr, proc.stderr


def test_a_version_in_a_directory_others_may_write_is_refused(tmp_path: Path) -> None:
    """The campaign's own version, but its directory opened to every account: anyone could have swapped it."""
    from orchestrator.errors import TrackingError
    from orchestrator.training.serving import load_registered_model

    root = tmp_path / "runs"
    uri = default_tracking_uri(root)
    tracker = Tracker(uri, "owned", "sine-owned")
    tracker.start({})
    version = register_model(tracker, small_model(1), MODEL).version
    tracker.finish("FINISHED")
    x = torch.ones(2, 1)
    assert torch.equal(load_registered_model(uri, MODEL, version)(x), small_model(1)(x))  # loads while private
    (pth,) = (root / "mlartifacts").rglob("data/model.pth")
    pth.parent.parent.chmod(0o777)
    opened = rf"may be written by another user \(owner uid {os.getuid()}, mode 777\); refusing"
    with pytest.raises(TrackingError, match=opened):
        load_registered_model(uri, MODEL, version)
