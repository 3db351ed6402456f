"""Sim logs stay capped while the sim runs: a real sim writing hundreds of MB to stderr, watched at
pauses it makes itself, with the coordinator's memory measured around it."""

from __future__ import annotations

import asyncio
import os
import select
import textwrap
from pathlib import Path

import psutil
import pytest

from orchestrator.launchers.base import LaunchRequest, Outcome
from orchestrator.launchers.mpiexec import MpiexecLauncher
from orchestrator.logcap import LOG_CAP_BYTES, CappedLog

pytestmark = pytest.mark.integration

PHASES = 3
PHASE_BYTES = 80_000_000
SLACK = 256
"""The cut note line."""

LOUD_SIM = textwrap.dedent("""\
    #!/bin/sh
    # A user's sim that floods stderr: PHASE_BYTES per phase, then it says where it is and waits.
    line=$(printf '%0100d' 0)
    phase=1
    while [ "$phase" -le "$PHASES" ]; do
        yes "$line" | head -c "$PHASE_BYTES" >&2
        echo "$phase" > "$READY"
        read go < "$GO"
        phase=$((phase + 1))
    done
    echo "the real last words" >&2
    exit 3
""")


def wait_line(fd: int, timeout: float = 120) -> bytes:
    """One line from a FIFO (the sim's 'phase done'), waiting on the descriptor, not in a sleep loop."""
    got = b""
    while not got.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, "the sim never reached its pause"
        got += os.read(fd, 64)
    return got


def test_a_flooding_sim_never_outgrows_its_log_cap(tmp_path: Path) -> None:
    binary = tmp_path / "loud-sim"
    binary.write_text(LOUD_SIM)
    binary.chmod(0o755)
    ready, go = tmp_path / "ready", tmp_path / "go"
    os.mkfifo(ready)
    os.mkfifo(go)
    # O_RDWR: a FIFO held open both ways never reports a hang-up, and the sim's opens never block
    ready_fd, go_fd = os.open(ready, os.O_RDWR | os.O_NONBLOCK), os.open(go, os.O_RDWR)
    req = LaunchRequest(run_id="loud-000001", role="check", binary=binary, args=[], ranks=1,
                        workdir=tmp_path / "loud-000001", timeout_s=300, ncols=2, nrows=1,
                        env={"READY": str(ready), "GO": str(go), "PHASES": str(PHASES),
                             "PHASE_BYTES": str(PHASE_BYTES)})
    me = psutil.Process()
    sizes: list[int] = []
    rss: list[int] = []

    async def watch() -> None:
        for _ in range(PHASES):
            await asyncio.to_thread(wait_line, ready_fd)
            sizes.append(req.stderr_path.stat().st_size)  # the sim is paused: what it wrote is in the log
            rss.append(me.memory_info().rss)
            os.write(go_fd, b"go\n")

    async def go_run() -> object:
        run = asyncio.ensure_future(MpiexecLauncher().run(req))
        await watch()
        return await run

    try:
        before = me.memory_info().rss
        result = asyncio.run(go_run())
    finally:
        os.close(ready_fd)
        os.close(go_fd)
    assert result.outcome is Outcome.FAILED  # type: ignore[attr-defined]
    assert result.message.rstrip().endswith("the real last words"), result.message[-300:]  # type: ignore[attr-defined]
    assert len(sizes) == PHASES and max(sizes) <= LOG_CAP_BYTES + SLACK, sizes
    assert min(sizes) > LOG_CAP_BYTES // 4, f"the log kept too little of its end: {sizes}"
    log = req.stderr_path.read_bytes()
    assert len(log) <= LOG_CAP_BYTES + SLACK
    assert log.startswith(b"[orchestrator: the first ") and log.endswith(b"the real last words\n")
    assert max(rss) - before < 64 * 1024 * 1024, f"the coordinator grew by {(max(rss) - before) >> 20} MB"


def test_a_capped_log_keeps_the_latest_bytes_in_order(tmp_path: Path) -> None:
    cap = CappedLog(tmp_path / "x.log", cap=4096)
    lines = [f"line {i:05d}\n".encode() for i in range(3000)]
    for line in lines:
        cap.write(line)
        assert cap.size <= 4096
    cap.close()
    text = (tmp_path / "x.log").read_bytes()
    head, _, body = text.partition(b"\n")
    assert head.startswith(b"[orchestrator: the first ") and f"{cap.cut} bytes".encode() in head
    assert b"".join(lines).endswith(body) and len(body) >= 2048 - 128
    assert cap.cut + len(body) == sum(map(len, lines))
