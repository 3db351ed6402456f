"""Shared fixtures: the installed sims, a small fast campaign config, the Slurm cluster."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.slurm_cluster import slurm_env  # noqa: F401  (session fixture)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def sim(name: str) -> Path:
    """A sim binary installed next to the interpreter by `pip install -e .`."""
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make setup` (pip install -e .) to build the sims")
    return path


def fast_loop(**overrides: Any) -> dict[str, Any]:
    """The sine campaign, made quick for tests (no sim work time, small ranks)."""
    cfg: dict[str, Any] = yaml.safe_load((REPO / "examples/sine/loop.yml").read_text())
    cfg["sims"]["generate"]["args"] = ["--points-per-rank", "32", "--lo", "{lo}", "--hi", "{hi}",
                                       "--seed", "{seed}"]
    cfg["sims"]["generate"]["ranks"] = 4
    cfg["sims"]["check"]["ranks"] = 2
    cfg["tracking"] = {"enabled": False}
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def faulty_args(fault: str) -> list[str]:
    """sim-faulty's arguments that make ``fault`` (crash, hang, nan, truncate, wrong-shape, exit) happen always."""
    return ["--points-per-rank", "4", "--seed", "1", "--fault-seed", "1", f"--{fault}-prob", "1"]


MALFORMED_FAULTS = [
    ("nan", "non-finite value"),
    ("truncate", "unreadable or truncated"),
    ("wrong-shape", "expected 2 columns, got 3"),
]
"""sim-faulty's malformed outputs and the words of the result check that rejects each."""


def write_loop(tmp_path: Path, cfg: dict[str, Any], name: str = "loop.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def _quiet_dask(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DASK_LOGGING__DISTRIBUTED", "error")
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")


def leaked_segments(before: set[str], patience: float = 20.0) -> set[str]:
    """MPI shared-memory segments that appeared since ``before`` and that nobody maps.

    Another test's sims (``make test`` runs two pytest workers) create and unlink segments too: a
    segment is a leak only if it stays unmapped until ``patience`` s have passed (a live sim's is
    mapped again or unlinked at its end within that time; a leaked one never is).
    """
    from orchestrator import shm

    deadline = time.monotonic() + patience
    while True:
        mapped = shm.mapped_paths()
        left = {n for n in shm.snapshot() - before if str(shm.SHM_DIR / n) not in mapped}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def dask_worker_processes(root: int) -> list[int]:
    """The local Dask worker processes under ``root``: forked from the workers' forkserver (the server,
    ``root``'s child that stays for the process's next campaign, left out), or spawned."""
    import psutil

    found = []
    for p in psutil.Process(root).children(recursive=True):
        try:
            cmd, parent = " ".join(p.cmdline()), p.ppid()
        except psutil.Error:
            continue
        if "spawn_main" in cmd or ("forkserver" in cmd and parent != root):
            found.append(p.pid)
    return found


def pids_of(pattern: str) -> list[int]:
    """PIDs whose command line contains pattern (to prove nothing was left behind)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if pattern in cmd:
            found.append(int(d.name))
    return found


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``-n 2 --dist loadgroup`` (make test): a file's tests on one worker (its module fixtures
    are made once), and every Slurm test on the same one (the 3-node test cluster runs one at a time)."""
    for item in items:
        group = "slurm" if item.get_closest_marker("slurm") else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))
