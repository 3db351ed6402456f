"""mpiexec: sims on the local box, no Slurm (the embedded default)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import ClassVar

from orchestrator.errors import LaunchError
from orchestrator.launchers.base import LaunchRequest, ProcessLauncher


def find_mpiexec() -> str:
    """The mpiexec next to this Python (the mpich wheel's hydra), else the one on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return str(here)
    found = shutil.which("mpiexec")
    if not found:
        raise LaunchError("no mpiexec found next to Python or on PATH; `pip install mpich` provides one")
    return found


class MpiexecLauncher(ProcessLauncher):
    """``mpiexec -n N BINARY ARGS --out FILE``."""

    name: ClassVar[str] = "mpiexec"

    def __init__(self, mpiexec: str | None = None) -> None:
        self.mpiexec = mpiexec or find_mpiexec()

    def command(self, req: LaunchRequest) -> list[str]:
        return [self.mpiexec, "-n", str(req.ranks), str(req.binary), *req.args, "--out", str(req.out_path)]
