"""`python -m orchestrator ui`: the MLflow UI over a finished campaign, looked at in a real browser.

The browser is Debian's headless Chromium (`scripts/install-browser.sh` installs it; `make test` runs it);
the page is the MLflow single-page app, so it is read after Chromium has run its scripts
(``--dump-dom`` with a virtual time budget), not as the server's raw HTML.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import REPO, fast_loop, write_loop

pytestmark = [pytest.mark.ui, pytest.mark.integration]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _api(ui: UI, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """MLflow's REST API through the front, with the printed URL's token: POST with a JSON body, or GET."""
    payload = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{ui.base}/api/2.0/mlflow/{path}", data=payload,
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {ui.token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def _rendered(url: str, timeout: float = 120) -> str:
    """The page's DOM after Chromium ran its scripts (the UI fetches runs and metrics itself)."""
    assert CHROMIUM is not None
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--window-size=1400,1000", "--virtual-time-budget=30000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope="module")
def finished_campaign(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir holding one finished, tracked sine campaign (its mlflow.db and artifacts)."""
    tmp = tmp_path_factory.mktemp("ui")
    cfg = fast_loop(**{"tracking": {"enabled": True, "experiment": "ui-test", "register_as": "ui-surrogate"}})
    loop = write_loop(tmp, cfg)
    work = tmp / "runs"
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(loop), "--workdir", str(work),
                           "--no-live"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


class UI:
    def __init__(self, proc: subprocess.Popen[str], url: str, first_line: str) -> None:
        self.proc, self.url, self.first_line = proc, url, first_line
        self.base, _, self.token = url.partition("/?token=")  # the printed URL: http://127.0.0.1:PORT/?token=T


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture(scope="module")
def ui(finished_campaign: Path, busy_port: int) -> Iterator[UI]:
    """The ui command as a user starts it, asked for a port that is taken."""
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "ui", str(finished_campaign), "--port",
                             str(busy_port)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()  # blocks until the URL is printed (the server answers by then)
    assert line.startswith("MLflow UI for "), (line, proc.stderr.read() if proc.poll() is not None else "")
    yield UI(proc, line.split(": ", 1)[1].split()[0], line)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium: scripts/install-browser.sh installs it (root, apt)")
def test_ui_shows_the_campaign_its_metrics_and_model_in_a_browser(ui: UI, busy_port: int) -> None:
    assert ui.base.startswith("http://127.0.0.1:") and not ui.base.endswith(f":{busy_port}") and ui.token
    descendants = psutil.Process(ui.proc.pid).children(recursive=True)
    for conn in psutil.net_connections("tcp"):  # nothing of the server listens off loopback
        if conn.status == psutil.CONN_LISTEN and conn.pid in {ui.proc.pid, *(p.pid for p in descendants)}:
            assert conn.laddr.ip == "127.0.0.1", conn

    for url in (f"{ui.base}/", f"{ui.base}/api/2.0/mlflow/experiments/search?max_results=1"):  # no token: refused
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=30)
        refused.value.close()  # an open connection would hold the port after the ui ends (FIN_WAIT2)
        assert refused.value.code == 403
    exps = _api(ui, "experiments/search", {"max_results": 100})["experiments"]
    exp = next(e for e in exps if e["name"] == "ui-test")
    runs = _api(ui, "runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert len(runs) == 1
    run = runs[0]
    run_name = run["info"]["run_name"]
    assert run_name.startswith("sine-")

    listing = _rendered(f"{ui.url}#/experiments/{exp['experiment_id']}/runs")
    assert "ui-test" in listing and run_name in listing

    page = _rendered(f"{ui.url}#/experiments/{exp['experiment_id']}/runs/{run['info']['run_id']}")
    assert run_name in page
    for metric in ("check_error", "round_train_rmse", "round_data_points", "round_sims_launched", "round_wall_s"):
        assert metric in page, metric
    assert "ui-surrogate" in page  # the registered model, on the run that made it
    assert "target_met: 1 training round(s)" in page  # the description says how it ended

    # the registry's page of the model version names the campaign run that made it
    version = _rendered(f"{ui.url}#/models/ui-surrogate/versions/1")
    assert f"Surrogate trained by campaign run {run_name}" in version

    artifacts = _api(ui, f"artifacts/list?run_id={run['info']['run_id']}")
    names = {f["path"] for f in artifacts.get("files", [])}
    assert {"timeline.png", "summary.json", "loop.yml", "events.jsonl"} <= names


def test_ctrl_c_stops_the_server_and_its_whole_tree_and_the_busy_port_was_named(ui: UI, busy_port: int) -> None:
    tree = [ui.proc, *psutil.Process(ui.proc.pid).children(recursive=True)]
    assert len(tree) >= 2  # the command and the mlflow server under it
    ui.proc.send_signal(signal.SIGINT)
    assert ui.proc.wait(60) == 0
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert alive == []
    port = int(ui.base.rsplit(":", 1)[1])
    with socket.socket() as s:  # nothing listens there any more (closed connections may linger in TIME_WAIT)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
    assert ui.proc.stderr is not None
    err = ui.proc.stderr.read()
    assert f"ui: port {busy_port} is in use; serving on {port} instead" in err
    assert err.rstrip().endswith("ui: stopped") and "Traceback" not in err


def test_a_sigkilled_ui_leaves_no_server_behind(finished_campaign: Path) -> None:
    """The server runs in its own session (Ctrl-C in the terminal must not reach it mid-start), so only
    the process guardian ends it when `ui` itself is SIGKILLed."""
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "ui", str(finished_campaign)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("MLflow UI for ")  # the server answers by now
        server = [p for p in psutil.Process(proc.pid).children(recursive=True) if "mlflow" in " ".join(p.cmdline())]
        assert server, "no mlflow server under the ui command"
        tree = [*server, *(c for p in server for c in p.children(recursive=True))]
        proc.kill()
        proc.wait(30)
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert alive == [], f"left running after `ui` was SIGKILLed: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_directory_without_a_store_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "ui", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env={**os.environ})
    assert proc.returncode == 2
    assert proc.stderr == (f"error: {tmp_path}: no MLflow store here (no mlflow.db); give the workdir your "
                           "campaigns ran in, e.g. `python -m orchestrator ui runs`\n")
