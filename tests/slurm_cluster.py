"""Pytest helper: a real throwaway Slurm cluster (3 fake nodes) for tests.

``ensure_cluster()`` runs ``scripts/slurm-test-cluster.sh start`` once per
process and returns the environment variables clients need (``SLURM_CONF``).
When the script exits 77 (no Slurm and no way to install it, or not root) the
calling test is skipped with the script's own reason. The cluster is left
running after the session; ``scripts/slurm-test-cluster.sh stop`` ends it.

Use the ``slurm_env`` fixture (session scope) and pass its mapping to
subprocesses, e.g. ``subprocess.run([...], env={**os.environ, **slurm_env})``.
"""

from __future__ import annotations

import functools
import os
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "slurm-test-cluster.sh"
SKIP_EXIT_CODE = 77
START_TIMEOUT_S = 300.0  # covers a first-time apt-get install


class SlurmClusterError(RuntimeError):
    """The test cluster script failed for a reason other than 'cannot run here'."""


def _run_script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _parse_exports(text: str) -> dict[str, str]:
    """Turn ``export K=V`` lines (shell-quoted V) into a mapping."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, _, value = words[1].partition("=")
            env[key] = value
    return env


@functools.lru_cache(maxsize=1)
def _start_once() -> tuple[str, dict[str, str]]:
    """Start the cluster once; return ("ok", env), ("skip", {}) or ("error", {}).

    The reason for skip/error is in env["reason"]. Failures are cached too, so
    a broken cluster costs one start attempt per session, not one per test.
    """
    started = _run_script("start", timeout=START_TIMEOUT_S)
    if started.returncode == SKIP_EXIT_CODE:
        return "skip", {"reason": started.stderr.strip() or "Slurm test cluster unavailable"}
    if started.returncode != 0:
        msg = f"{SCRIPT.name} start exited {started.returncode}:\n{started.stderr}"
        return "error", {"reason": msg}
    exported = _run_script("env", timeout=30.0)
    env = _parse_exports(exported.stdout)
    if exported.returncode != 0 or "SLURM_CONF" not in env:
        msg = f"{SCRIPT.name} env exited {exported.returncode}: {exported.stdout!r} {exported.stderr!r}"
        return "error", {"reason": msg}
    return "ok", env


def ensure_cluster() -> dict[str, str]:
    """Start the test cluster (once per process) and return the env vars to add.

    Skips the calling test when the script says the cluster cannot run here
    (exit 77); raises SlurmClusterError when it should run but failed.
    """
    status, env = _start_once()
    if status == "skip":
        pytest.skip(env["reason"])
    if status == "error":
        raise SlurmClusterError(env["reason"])
    return dict(env)


@pytest.fixture(scope="session")
def slurm_env() -> Iterator[dict[str, str]]:
    """Env vars (``SLURM_CONF``) that point Slurm clients at the test cluster."""
    env = ensure_cluster()
    yield env


def has_gres() -> bool:
    """True when the running test cluster's nodes declare GPUs (``slurm-test-cluster.sh gres``)."""
    return _run_script("gres", timeout=30.0).returncode == 0


def slurm_client_env(extra: dict[str, str]) -> dict[str, str]:
    """``os.environ`` plus ``extra``, minus SLURM_* job variables of any outer job."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**base, **extra}
