"""Dask's passing faults reach the user's terminal as one line, not a traceback (a real LocalCluster)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# A coordinator of its own (the workers write to the stderr of the process that started their
# forkserver): a worker logs what distributed.worker logs when the scheduler is unreachable.
SCRIPT = textwrap.dedent("""
    import asyncio

    from orchestrator.config import TrainingConfig
    from orchestrator.procs import guardian
    from orchestrator.training.backends import LocalBackend


    def heartbeat_fails():
        import logging

        try:
            raise OSError("Timed out trying to connect to tls://127.0.0.1:1")
        except OSError:
            logging.getLogger("distributed.worker").exception("Failed to communicate with scheduler during heartbeat.")


    async def main():
        backend = LocalBackend(TrainingConfig(workers=1))
        client = await backend.start()
        try:
            await client.run(heartbeat_fails)
        finally:
            await backend.close()


    if __name__ == "__main__":
        guardian.start(hold=True)
        asyncio.run(main())
""")


def test_a_failed_heartbeat_on_a_worker_is_one_line() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Failed to communicate with scheduler during heartbeat. (OSError: Timed out" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
