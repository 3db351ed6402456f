"""Dask's passing faults reach the user's terminal as one line, not a traceback (a real LocalCluster)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from orchestrator.config import TrainingConfig
from orchestrator.training.backends import LocalBackend


def test_a_failed_heartbeat_on_a_worker_is_one_line(capfd: pytest.CaptureFixture[str]) -> None:
    def heartbeat_fails() -> None:  # what distributed.worker logs when the scheduler is unreachable
        import logging

        try:
            raise OSError("Timed out trying to connect to tls://127.0.0.1:1")
        except OSError:
            logging.getLogger("distributed.worker").exception("Failed to communicate with scheduler during heartbeat.")

    async def main() -> None:
        backend = LocalBackend(TrainingConfig(workers=1))
        client: Any = await backend.start()
        try:
            await client.run(heartbeat_fails)
        finally:
            await backend.close()

    asyncio.run(main())
    err = capfd.readouterr().err
    assert "Failed to communicate with scheduler during heartbeat. (OSError: Timed out" in err, err
    assert "Traceback" not in err, err
