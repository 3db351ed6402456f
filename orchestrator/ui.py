"""``ui``: the MLflow web UI over a campaign workdir's tracking store, for its owner only.

``python -m orchestrator ui [WORKDIR]`` finds ``WORKDIR/mlflow.db`` (the embedded
store every campaign run from that workdir writes; artifacts sit beside it in
``mlartifacts/``) and serves it the way Jupyter serves a notebook:

* the ``mlflow server`` listens only on a Unix socket in a private directory (mode 0700,
  made for this start): no other account can reach it;
* a small front in this process listens on 127.0.0.1 (port 5000, or a free one if it is
  busy) and admits only requests that carry this start's random token: in the printed URL
  (``?token=...``, exchanged for an HttpOnly cookie and a redirect to the same page), in
  that cookie, or as ``Authorization: Bearer <token>`` (``MLFLOW_TRACKING_TOKEN`` for an
  MLflow client). Everything else is 403 and never reaches MLflow. Loopback is shared by
  every account on a login node, so a port alone admits everyone.

It prints the URL and serves until Ctrl-C (or SIGTERM), then stops the server's whole
process tree and removes the private directory. The server is the full ``mlflow`` package
(the ``ui`` extra, which ``make setup`` installs): ``mlflow-skinny`` has neither Flask nor
the UI's pages; the front is aiohttp, which that package requires.
"""

from __future__ import annotations

import argparse
import errno
import http.client
import importlib.util
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
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
SOCKET_NAME = "mlflow.sock"


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


def _bound(port: int, host: str = HOST) -> socket.socket | None:
    """A listening socket on ``port``, or None when the port is taken."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # As every server does: connections it closed (TIME_WAIT) must not keep the port from the next start.
    # On Linux this never lets two sockets listen on one port.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as exc:
        s.close()
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            return None
        raise
    s.listen(128)
    return s


def listener(wanted: int | None) -> tuple[socket.socket, str | None]:
    """The front's socket, bound and listening (no window in which another program takes the port), and a
    note when the port asked for (or the default) is taken."""
    port = DEFAULT_PORT if wanted is None else wanted
    sock = _bound(port)
    if sock is not None:
        return sock, None
    sock = _bound(0)
    assert sock is not None
    return sock, f"port {port} is in use; serving on {sock.getsockname()[1]} instead"


def private_socket_path() -> Path:
    """Where the server listens: a fresh directory only its owner may enter (mkdtemp makes it 0700)."""
    directory = Path(tempfile.mkdtemp(prefix="orchestrator-ui-"))
    return directory / SOCKET_NAME


def server_argv(db: Path, sock: Path, python: str | None = None) -> list[str]:
    """``mlflow server`` over the campaign store on the Unix socket ``sock`` only (uvicorn's ``--uds`` wins over
    host and port, which MLflow requires), one worker, no job runner."""
    return [python or sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{db}", "--registry-store-uri", f"sqlite:///{db}",
            "--default-artifact-root", (db.parent / "mlartifacts").as_uri(),
            "--host", HOST, "--port", "0", "--workers", "1",
            "--uvicorn-opts", f"--log-level warning --uds {shlex.quote(str(sock))}"]  # no line per request


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    # Otherwise the server starts a pool of job-execution workers (~230 MB each).
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.setdefault("GIT_PYTHON_REFRESH", "quiet")
    env.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")  # starlette's, inside MLflow
    return env


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket (the server's health probe)."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self.path))


def healthy(sock: Path) -> bool:
    """The server on ``sock`` answers ``/health`` with 200."""
    conn = _UnixHTTPConnection(sock, timeout=2)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def wait_until_up(sock: Path, proc: subprocess.Popen[bytes], timeout: float = START_TIMEOUT_S) -> None:
    """Until ``/health`` answers 200 on the socket; fails at once if the server exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UIError(f"mlflow server exited with code {proc.returncode} before serving; see its output above")
        if healthy(sock):
            return
        time.sleep(0.25)  # a readiness probe of another process: there is no event to wait on
    raise UIError(f"mlflow server did not answer on {sock} within {timeout:.0f} s")


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
    if importlib.util.find_spec("flask") is None or importlib.util.find_spec("mlflow.server.js") is None \
            or importlib.util.find_spec("aiohttp") is None:
        raise UsageError("the MLflow UI is not installed in this environment; `make setup` installs it, "
                         "or `pip install -e '.[ui]'`")


def serve(workdir: Path, port: int | None = None, on_ready: Callable[[str], None] | None = None) -> int:
    """Start the server and its owner-only front, announce the URL, serve until SIGINT/SIGTERM, stop the tree."""
    from orchestrator.uifront import TOKEN_PARAM, Front

    db = store_of(workdir)
    require_server()
    sock = private_socket_path()
    listening, note = listener(port)
    if note:
        print(f"ui: {note}", file=sys.stderr)
    token = secrets.token_urlsafe(32)
    url = f"http://{HOST}:{listening.getsockname()[1]}/?{TOKEN_PARAM}={token}"
    front = Front(listening, sock, token)
    guardian.start()  # first: a SIGKILLed `ui` does not leave its server running
    # The server's own chatter goes to stderr: stdout carries only the URL line.
    proc = subprocess.Popen(server_argv(db, sock), env=server_env(), start_new_session=True, stdout=sys.stderr)
    guardian.watch_group(proc.pid)
    def handler(signum: int, _frame: Any) -> None:
        raise _Stop(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        wait_until_up(sock, proc)
        front.start()
        print(f"MLflow UI for {db.parent}: {url}  (for you only: the link carries its key; Ctrl-C stops it)",
              flush=True)
        if on_ready is not None:
            on_ready(url)
        code = proc.wait()  # until Ctrl-C or SIGTERM (raised here as _Stop), or the server's own end
        raise UIError(f"mlflow server exited with code {code}")
    except _Stop:
        pass
    finally:
        front.stop()
        listening.close()
        stop(proc)
        shutil.rmtree(sock.parent, ignore_errors=True)
        for s, h in old.items():
            signal.signal(s, h)
    print("ui: stopped", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    """The ``ui`` subcommand's flags."""
    p = sub.add_parser("ui", help="open the campaigns' MLflow tracking in a browser (127.0.0.1, for you only)")
    p.add_argument("workdir", nargs="?", type=Path, default=Path("runs"),
                   help="the run root holding mlflow.db (default ./runs)")
    p.add_argument("--port", type=int, help=f"port on 127.0.0.1 (default {DEFAULT_PORT}; a busy one picks another)")


def main(args: argparse.Namespace) -> int:
    """``python -m orchestrator ui``."""
    if args.port is not None and not 1 <= args.port <= 65535:
        raise UsageError(f"--port: expected 1..65535, got {args.port}")
    return serve(args.workdir, args.port)
