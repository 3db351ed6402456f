"""mpiexec: sims on the local box, no Slurm (the embedded default).

The launcher is the binary's own MPI's (:mod:`orchestrator.mpi`): hydra's
``mpiexec`` for MPICH, Open MPI's ``mpiexec`` with ``--oversubscribe`` (a
laptop has fewer cores than a campaign's ranks) and, as root, the two
variables Open MPI insists on.
"""

from __future__ import annotations

import functools
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

from orchestrator.errors import LaunchError
from orchestrator.launchers.base import LaunchRequest, ProcessLauncher
from orchestrator.mpi import MpiInfo, local_command, merged_env

log = logging.getLogger(__name__)

ISOLATE = ["unshare", "--map-current-user", "--net", "--"]
"""A network namespace of its own for mpiexec and its ranks: hydra's control port listens on every
interface (hard-wired in MPICH's hydra), and no option binds it to loopback; inside an unshared
network namespace nobody on the node can reach it. Local ranks talk through shared memory."""


@functools.cache
def can_isolate() -> bool:
    """Whether this box lets us unshare a network namespace (unprivileged user namespaces)."""
    try:
        done = subprocess.run([*ISOLATE, "true"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if done.returncode != 0:
        log.warning("mpiexec: cannot unshare a network namespace (%s); hydra's control port will listen on "
                    "every interface", done.stderr.decode(errors="replace").strip()[:200])
    return done.returncode == 0


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
    """``[unshare --net --] mpiexec -n N [--oversubscribe] BINARY ARGS [--out FILE]``."""

    name: ClassVar[str] = "mpiexec"

    def __init__(self, mpiexec: str | None = None, *, mpi: MpiInfo | None = None, isolate: bool | None = None) -> None:
        self.mpi = mpi
        self.mpiexec = mpiexec or (mpi.mpiexec if mpi is not None else None) or find_mpiexec()
        wheel = mpi is None or mpi.is_wheel_mpich
        self.isolate = (can_isolate() and wheel) if isolate is None else isolate
        """Run in a private network namespace (default: the mpich wheel's hydra, when the box allows
        it; other MPIs' launchers are not run so: Debian's MPICH fails there)."""

    def command(self, req: LaunchRequest) -> list[str]:
        if self.mpi is None:
            head = [self.mpiexec, "-n", str(req.ranks)]
        else:
            head = [self.mpiexec, *local_command(self.mpi, req.ranks)[1:]]
        return [*(ISOLATE if self.isolate else []), *head, *self.program(req)]

    def environment(self, req: LaunchRequest) -> dict[str, str]:
        env = super().environment(req)
        return env if self.mpi is None else merged_env(env, self.mpi, req.ranks)
