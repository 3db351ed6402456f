"""The Slurm test cluster for benchmarks that need one (``make bench`` starts it first)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

CLUSTER = Path(__file__).resolve().parents[1] / "scripts" / "slurm-test-cluster.sh"


def noop_sim() -> Path:
    """The installed ``sim-noop`` (next to the interpreter); exits with the fix when it is missing."""
    path = Path(sys.executable).parent / "sim-noop"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `make setup` to build the sims")
    return path


def cluster_env() -> dict[str, str]:
    """Start the test cluster (idempotent) and return the environment for its clients:
    ours without any outer SLURM_* variables, plus what the script exports.
    Raises RuntimeError with the script's reason when it cannot run here."""
    started = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=300,
                             check=False)
    if started.returncode != 0:
        raise RuntimeError(f"{CLUSTER.name} start exited {started.returncode}: {started.stderr.strip()[-300:]}")
    exported = subprocess.run(["bash", str(CLUSTER), "env"], capture_output=True, text=True, timeout=30,
                              check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for line in exported.stdout.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export":
            key, _, value = words[1].partition("=")
            env[key] = value
    return env
