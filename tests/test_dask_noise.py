"""Dask's passing faults reach the user's terminal as one line, not a traceback (a real LocalCluster)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

MAIN = textwrap.dedent("""

    if __name__ == "__main__":
        guardian.start(hold=True)
        asyncio.run(main())
""")
"""How each script below runs: as a coordinator does, under the process guardian."""


def coordinator(script: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``script`` as a coordinator process of its own; it must exit 0."""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


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

""") + MAIN


def test_a_failed_heartbeat_on_a_worker_is_one_line() -> None:
    proc = coordinator(SCRIPT, timeout=120)
    assert "Failed to communicate with scheduler during heartbeat. (OSError: Timed out" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


FAILURES = textwrap.dedent("""
    import asyncio
    import gc
    import time

    from orchestrator.config import TrainingConfig
    from orchestrator.errors import TrainingError
    from orchestrator.procs import guardian
    from orchestrator.training.backends import LocalBackend, Trainer


    def boom():
        raise ValueError("a member failed")


    async def main():
        cfg = TrainingConfig(workers=2)
        backend = LocalBackend(cfg)
        client = await backend.start()
        trainer = Trainer(backend, cfg, 1, 1)
        try:
            # a failure cancels its siblings on the workers (an asynchronous client's cancel must be awaited)
            slow = client.submit(time.sleep, 10, pure=False)
            try:
                await trainer._run([slow, client.submit(boom, pure=False)], trainer._failed("training"))
            except TrainingError as exc:
                print("RAISED", exc)
            for _ in range(100):
                if slow.status == "cancelled":
                    break
                await asyncio.sleep(0.05)
            print("SIBLING", slow.status)
            # an evaluation that fails while no one awaits it any more (the campaign ended) is not logged
            trainer.evaluate_ensemble([b"not a model"], [[0.0]])
            await trainer._quiet.wait()
            gc.collect()
        finally:
            await backend.close()
        gc.collect()

""") + MAIN


def test_a_failed_task_cancels_its_siblings_and_an_unawaited_failure_is_not_logged() -> None:
    proc = coordinator(FAILURES, timeout=180)
    assert "RAISED training failed on the Dask workers: ValueError: a member failed" in proc.stdout, proc.stdout
    assert "SIBLING cancelled" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "never retrieved" not in proc.stderr and "never awaited" not in proc.stderr, proc.stderr
