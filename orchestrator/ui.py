"""``ui``: the MLflow web UI over a campaign workdir's tracking store, on loopback.

``python -m orchestrator ui [WORKDIR]`` finds ``WORKDIR/mlflow.db`` (the embedded
store every campaign run from that workdir writes; artifacts sit beside it in
``mlartifacts/``), starts ``mlflow server`` on 127.0.0.1 (port 5000, or a free
one if it is busy), prints the URL and serves until Ctrl-C (or SIGTERM), then
stops the server's whole process tree. The server is the full ``mlflow`` package (the ``ui`` extra, which
``make setup`` installs): ``mlflow-skinny`` has neither Flask nor the UI's pages.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.errors import UIError, UsageError
from orchestrator.procs import guardian, kill_group

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_PORT = 5000
START_TIMEOUT_S = 120.0
"""A first start imports the whole of MLflow and may migrate the database schema."""


class _Stop(BaseException):
    """Ctrl-C or SIGTERM while serving: stop the server and return 0."""


def store_of(workdir: Path) -> Path:
    """The campaign store under ``workdir``; one line naming what to do when there is none."""
    db = workdir / "mlflow.db"
    if not workdir.is_dir():
        raise UsageError(f"{workdir}: no such directory; give the workdir your campaigns ran in (default ./runs)")
    if not db.is_file():
        raise UsageError(f"{workdir}: no MLflow store here (no mlflow.db); give the workdir your campaigns ran "
                         "in, e.g. `python -m orchestrator ui runs`")
    return db.resolve()


def port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def choose_port(wanted: int | None) -> tuple[int, str | None]:
    """The port to serve on, and a note when the one asked for (or the default) is taken."""
    port = DEFAULT_PORT if wanted is None else wanted
    if port_is_free(port):
        return port, None
    other = free_port()
    return other, f"port {port} is in use; serving on {other} instead"


def server_argv(db: Path, port: int, python: str | None = None) -> list[str]:
    """``mlflow server`` on loopback over the campaign store, one worker, no job runner."""
    return [python or sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{db}", "--registry-store-uri", f"sqlite:///{db}",
            "--default-artifact-root", (db.parent / "mlartifacts").as_uri(),
            "--host", HOST, "--port", str(port), "--workers", "1",
            "--uvicorn-opts", "--log-level warning"]  # no line per request


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    # Otherwise the server starts a pool of job-execution workers (~230 MB each).
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.setdefault("GIT_PYTHON_REFRESH", "quiet")
    env.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")  # starlette's, inside MLflow
    return env


def wait_until_up(url: str, proc: subprocess.Popen[bytes], timeout: float = START_TIMEOUT_S) -> None:
    """Until ``/health`` answers 200; fails at once if the server exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UIError(f"mlflow server exited with code {proc.returncode} before serving; see its output above")
        with contextlib.suppress(OSError, urllib.error.URLError), \
                urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            if resp.status == 200:
                return
        time.sleep(0.25)  # a readiness probe of another process: there is no event to wait on
    raise UIError(f"mlflow server did not answer at {url} within {timeout:.0f} s")


def stop(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM to the server's process group (gunicorn/uvicorn workers too), then SIGKILL."""
    if proc.poll() is None:
        kill_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            proc.wait()
    kill_group(proc.pid)  # any worker the server left in its group
    guardian.unwatch_group(proc.pid)


def require_server() -> None:
    if importlib.util.find_spec("flask") is None or importlib.util.find_spec("mlflow.server.js") is None:
        raise UsageError("the MLflow UI is not installed in this environment; `make setup` installs it, "
                         "or `pip install -e '.[ui]'`")


def serve(workdir: Path, port: int | None = None, on_ready: Callable[[str], None] | None = None) -> int:
    """Start the server, announce its URL, serve until SIGINT/SIGTERM, stop the tree."""
    db = store_of(workdir)
    require_server()
    chosen, note = choose_port(port)
    if note:
        print(f"ui: {note}", file=sys.stderr)
    url = f"http://{HOST}:{chosen}"
    guardian.start()  # first: a SIGKILLed `ui` does not leave its server running
    # The server's own chatter goes to stderr: stdout carries only the URL line.
    proc = subprocess.Popen(server_argv(db, chosen), env=server_env(), start_new_session=True, stdout=sys.stderr)
    guardian.watch_group(proc.pid)
    def handler(signum: int, _frame: Any) -> None:
        raise _Stop(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        wait_until_up(url, proc)
        print(f"MLflow UI for {db.parent}: {url}  (Ctrl-C stops it)", flush=True)
        if on_ready is not None:
            on_ready(url)
        code = proc.wait()  # until Ctrl-C or SIGTERM (raised here as _Stop), or the server's own end
        raise UIError(f"mlflow server exited with code {code}")
    except _Stop:
        pass
    finally:
        stop(proc)
        for s, h in old.items():
            signal.signal(s, h)
    print("ui: stopped", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    """The ``ui`` subcommand's flags."""
    p = sub.add_parser("ui", help="open the campaigns' MLflow tracking in a browser (served on 127.0.0.1)")
    p.add_argument("workdir", nargs="?", type=Path, default=Path("runs"),
                   help="the run root holding mlflow.db (default ./runs)")
    p.add_argument("--port", type=int, help=f"port on 127.0.0.1 (default {DEFAULT_PORT}; a busy one picks another)")


def main(args: argparse.Namespace) -> int:
    """``python -m orchestrator ui``."""
    if args.port is not None and not 1 <= args.port <= 65535:
        raise UsageError(f"--port: expected 1..65535, got {args.port}")
    return serve(args.workdir, args.port)
