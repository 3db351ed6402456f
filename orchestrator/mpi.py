"""Which MPI a simulation binary was built with, and how to launch that MPI.

A sim's MPI is the user's choice (the PyPI mpich wheel by default, a site's
MPICH or Open MPI through ``make setup MPICC=...``, or whatever a third-party
code was built with). The launchers must fit it: hydra's ``mpiexec`` cannot
start an Open MPI binary, ``srun --mpi=pmi2`` cannot wire Open MPI ranks, and
``srun --mpi=pmix`` runs MPICH ranks as singletons. So the flavour is read from
the binary itself: the ``libmpi`` it loads, as ``ldd`` resolves it
(``libmpi.so.12`` is the MPICH ABI: MPICH, Intel MPI, Cray MPICH;
``libmpi.so.40`` is Open MPI). loop.yml may override it per sim
(``mpi: mpich|openmpi``, ``mpiexec: PATH``).

:func:`mpi_for` gives one :class:`MpiInfo` per sim: the flavour, where it came
from, the local ``mpiexec`` of that very MPI, the srun plugin, and whether
``MPI_Comm_spawn`` from our spawn agent works with it.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import CommandError, ConfigError
from orchestrator.procs import run_checked

log = logging.getLogger(__name__)


class Flavour(enum.Enum):
    """An MPI family: the ABI a binary links and the launch rules that follow from it."""

    MPICH = "mpich"
    OPENMPI = "openmpi"

    @property
    def srun_plugin(self) -> str:
        """``srun --mpi=`` value that wires this MPI's ranks (platform facts: pmi2 / pmix)."""
        return "pmix" if self is Flavour.OPENMPI else "pmi2"

    @property
    def label(self) -> str:
        return "Open MPI" if self is Flavour.OPENMPI else "MPICH"


SONAMES: dict[str, Flavour] = {
    "libmpi.so.12": Flavour.MPICH,  # MPICH ABI (MPICH, Intel MPI, MVAPICH)
    "libmpich.so.12": Flavour.MPICH,
    "libmpi_cray.so.12": Flavour.MPICH,
    "libmpi.so.40": Flavour.OPENMPI,  # Open MPI 3.x-5.x
    "libmpi.so.20": Flavour.OPENMPI,
}
"""Shared-library names (SONAMEs) that tell an MPI family."""

ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
"""Open MPI refuses to start as root without these (containers, CI)."""
NODE_LOCAL_UCX = {"UCX_TLS": "self,sm", "UCX_MEM_MMAP_HOOK_MODE": "none", "UCX_MEM_EVENTS": "no"}
"""For an MPICH run whose ranks all sit on one node (the mpiexec launcher, the node agent): UCX, MPICH's
network module (the wheel's and Debian's), need not probe the network, nor patch ``mmap`` at load time
to keep a registration cache that only RDMA uses (it then registers per transfer). Measured for issue
25 with the wheel's MPICH 5 on the 2-core box: ``mpiexec -n 4 sim-cheap`` 300 -> 170 ms of CPU, and a
one-rank run (``UCX_TLS=self``) 86 -> 26 ms (mpiexec) and 69 -> 16 ms (singleton); most of it was
UCX's ``mmap`` patch spinning in ``sched_yield``. A value in the environment or the sim's ``env``
wins. Multi-node runs (srun) keep UCX's defaults."""

_LDD_LINE = re.compile(r"^\s*(?P<name>\S+)\s+=>\s+(?P<path>/\S+)")


@dataclass(frozen=True)
class Linked:
    """The libmpi a binary loads, as ``ldd`` resolves it."""

    soname: str
    path: Path | None
    flavour: Flavour


def parse_ldd(text: str) -> Linked | None:
    """The first known libmpi in ``ldd`` output, or None.

    >>> parse_ldd("\\tlibmpi.so.40 => /usr/lib/x86_64-linux-gnu/libmpi.so.40 (0x7f)").flavour
    <Flavour.OPENMPI: 'openmpi'>
    """
    for line in text.splitlines():
        match = _LDD_LINE.match(line)
        name = match.group("name") if match else line.strip().split(" ", 1)[0]
        if name in SONAMES:
            return Linked(name, Path(match.group("path")) if match else None, SONAMES[name])
    return None


@functools.lru_cache(maxsize=64)
def linked_mpi(binary: Path) -> Linked | None:
    """The libmpi ``binary`` loads (None: not dynamically linked to a known MPI, or no ``ldd``)."""
    if shutil.which("ldd") is None:
        log.info("no ldd on this machine: cannot tell the MPI of %s", binary)
        return None
    try:
        out = run_checked(["ldd", str(binary)], timeout=30)
    except CommandError as exc:  # a script, a static binary
        log.info("ldd %s: %s", binary, exc)
        return None
    return parse_ldd(out)


@functools.lru_cache(maxsize=64)
def launcher_flavour(mpiexec: str) -> Flavour | None:
    """The MPI family an ``mpiexec``/``mpirun`` belongs to, from its ``--version``."""
    try:
        out = run_checked([mpiexec, "--version"], timeout=30)
    except CommandError as exc:
        log.info("%s --version: %s", mpiexec, exc)
        return None
    text = out.lower()
    if "open mpi" in text or "openrte" in text or "prte" in text:
        return Flavour.OPENMPI
    if "hydra" in text or "mpich" in text or "intel" in text:
        return Flavour.MPICH
    return None


_NAMES = {Flavour.MPICH: ("mpiexec", "mpiexec.mpich", "mpiexec.hydra", "mpirun"),
          Flavour.OPENMPI: ("mpiexec.openmpi", "mpirun.openmpi", "mpiexec", "mpirun")}


def mpiexec_candidates(flavour: Flavour, libmpi: Path | None, path_dirs: Iterable[str]) -> list[Path]:
    """Where that MPI's own launcher may be: beside its libmpi's prefix first, then PATH."""
    dirs: list[Path] = []
    if libmpi is not None:
        lib = libmpi.resolve().parent
        dirs += [lib.parent / "bin", lib.parent.parent / "bin"]  # <prefix>/lib, <prefix>/lib/<multiarch>
    dirs.append(Path(sys.executable).parent)
    dirs += [Path(d) for d in path_dirs if d]
    seen: set[Path] = set()
    out: list[Path] = []
    for d in dirs:
        for name in _NAMES[flavour]:
            p = d / name
            if p not in seen:
                seen.add(p)
                out.append(p)
    return out


def find_mpiexec(flavour: Flavour, libmpi: Path | None) -> str | None:
    """The first candidate that exists and reports the same MPI family."""
    for cand in mpiexec_candidates(flavour, libmpi, os.environ.get("PATH", "").split(os.pathsep)):
        if cand.is_file() and os.access(cand, os.X_OK) and launcher_flavour(str(cand)) is flavour:
            return str(cand)
    return None


@dataclass(frozen=True)
class MpiInfo:
    """What a sim's launchers need to know about its MPI."""

    flavour: Flavour
    source: str
    """How the flavour was found: ``ldd: libmpi.so.40 => /usr/...``, ``loop.yml``, ``assumed``."""
    libmpi: Path | None
    mpiexec: str | None
    """That MPI's own local launcher; None when none was found (mpiexec launcher then fails at start)."""

    @property
    def srun_plugin(self) -> str:
        return self.flavour.srun_plugin

    @property
    def is_wheel_mpich(self) -> bool:
        """The PyPI mpich wheel in this environment: the one MPI where spawn works (platform facts)."""
        if self.flavour is not Flavour.MPICH:
            return False
        if self.libmpi is None:
            return self.source == "assumed"
        return self.libmpi.resolve().is_relative_to(Path(sys.prefix).resolve())

    def spawn_problem(self) -> str | None:
        """Why ``launcher: spawn`` cannot work with this MPI, or None."""
        if self.is_wheel_mpich:
            return None
        where = f" ({self.libmpi})" if self.libmpi else ""
        return (f"launcher: spawn works only with the PyPI mpich wheel's MPI in {sys.prefix}; this binary uses "
                f"{self.flavour.label}{where}, where MPI_Comm_spawn from the spawn agent fails; "
                "use launcher: auto (srun or mpiexec)")

    def local_env(self, ranks: int) -> dict[str, str]:
        """Environment this MPI wants for a launch of ``ranks`` ranks on one node: Open MPI as root
        must be told it is fine; MPICH's UCX stays on the node (:data:`NODE_LOCAL_UCX`)."""
        if self.flavour is Flavour.OPENMPI:
            return dict(ROOT_ENV) if hasattr(os, "geteuid") and os.geteuid() == 0 else {}
        if self.flavour is Flavour.MPICH:
            return {**NODE_LOCAL_UCX, **({"UCX_TLS": "self"} if ranks == 1 else {})}
        return {}

    def describe(self) -> str:
        run = self.mpiexec or "no mpiexec found"
        return f"{self.flavour.label} [{self.source}]; local: {run}; srun --mpi={self.srun_plugin}"


def mpi_for(binary: Path, override: str = "auto", mpiexec: str | None = None, *, key: str = "sim") -> MpiInfo:
    """The MPI of ``binary``: detected from what it links unless loop.yml names it."""
    linked = linked_mpi(binary)
    if override != "auto":
        flavour = Flavour(override)
        source = "loop.yml"
    elif linked is not None:
        flavour = linked.flavour
        source = f"ldd: {linked.soname} => {linked.path}"
    else:
        flavour = Flavour.MPICH
        source = "assumed (no libmpi found by ldd; set mpi: to be sure)"
    libmpi = linked.path if linked is not None and linked.flavour is flavour else None
    if mpiexec is not None:
        found = shutil.which(mpiexec) if "/" not in mpiexec else mpiexec
        if found is None or not os.access(found, os.X_OK):
            raise ConfigError(f"{key}.mpiexec: {mpiexec!r} is not an executable (give a path or a name on PATH)")
        return MpiInfo(flavour, source, libmpi, found)
    return MpiInfo(flavour, source, libmpi, find_mpiexec(flavour, libmpi))


def local_command(info: MpiInfo, ranks: int) -> list[str]:
    """``mpiexec -n N`` for that MPI, up to the program; Open MPI may run more ranks than cores."""
    if info.mpiexec is None:
        raise ConfigError(f"no mpiexec of {info.flavour.label} found (looked beside {info.libmpi or 'Python'} "
                          "and on PATH); set sims.<role>.mpiexec in loop.yml")
    argv = [info.mpiexec, "-n", str(ranks)]
    if info.flavour is Flavour.OPENMPI:
        argv.append("--oversubscribe")
    return argv


def merged_env(base: Mapping[str, str], info: MpiInfo, ranks: int) -> dict[str, str]:
    """``base`` plus what this MPI wants for ``ranks`` ranks on one node; a value already there wins."""
    env = dict(base)
    for k, v in info.local_env(ranks).items():
        env.setdefault(k, v)
    return env
