"""The live panel, as a user on a terminal sees it: a real campaign on a pseudo-terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, fast_loop, write_loop

pytestmark = pytest.mark.integration

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def on_a_terminal(argv: list[str], timeout: float) -> tuple[int, str]:
    """Run ``argv`` with stdout and stderr on a 120x40 pseudo-terminal; its exit code and what it
    showed, escape codes removed (the live panel's frames follow each other in the text)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES")}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, cwd=REPO, env=env)
    os.close(follower)
    shown = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:  # ended, and nothing more on the terminal
                    break
                continue
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: every process holding the terminal has closed it
                break
            if not data:
                break
            shown += data
        else:
            proc.kill()
            pytest.fail(f"no end within {timeout} s: {ANSI.sub('', shown.decode(errors='replace'))[-3000:]}")
        code = proc.wait(timeout=60)
    finally:
        os.close(leader)
    return code, ANSI.sub("", shown.decode(errors="replace"))


def test_the_live_panel_shows_the_registration_while_it_runs(tmp_path: Path) -> None:
    """Issue 12: after the target is met the model's registration takes seconds; the panel must say
    so and keep moving (not freeze on the last check), then end on the summary's wall time."""
    cfg = fast_loop()
    cfg["tracking"] = {"experiment": "live", "register_as": "live-test"}
    loop = write_loop(tmp_path, cfg)
    work = tmp_path / "runs"
    code, shown = on_a_terminal([sys.executable, "-m", "orchestrator", "run", str(loop), "--workdir", str(work)],
                                timeout=300)
    assert code == 0, shown[-3000:]
    (run_dir,) = work.glob("sine-*")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["registered_model"] == {"name": "live-test", "version": "1"}

    met = shown.index("successes 5/5)")  # the check note that meets the target
    end = shown.index("target_met: ")  # the result line, after the panel
    assert met < end
    registering = [(m.start(), float(m.group(1))) for m in
                   re.finditer(r"registering the model as live-test in MLflow … (\d+\.\d) s", shown)]
    assert registering, shown[met:end][-3000:]
    assert all(met < at < end for at, _ in registering)
    ages = sorted({age for _, age in registering})
    assert len(ages) >= 2, f"the panel did not refresh during the registration: {ages}"
    # the line without the panel too, once, before the registration's frames
    assert shown.count("registering the model as live-test in MLflow …\n") == 1
    # the last frame: how it ended, and the summary's wall time (the same number as the result line)
    last = shown.rindex("ended: target_met")
    assert met < last < end
    assert re.search(rf"elapsed\s+{summary['wall_s']:.1f} s", shown[last:end]), shown[last:end]
    assert f"{summary['wall_s']:.1f} s" in shown[end:].splitlines()[0]
