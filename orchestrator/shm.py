"""Shared-memory segments that killed MPI ranks leave behind, and only those.

MPICH keeps its intra-node segments as files in /dev/shm (``mpich_shm_*``) and
removes them when a job ends cleanly. A rank killed by a signal (a crash, a
timeout) cannot, and every such run leaks megabytes. After a failed run the
launcher sweeps exactly the segments that run made: new since its launch,
created while it ran, owned by us, and no longer mapped by any live process (a
concurrent run, ours or anyone's, still maps its own).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIXES = ("mpich_shm_",)
"""How the segments' names begin: MPICH's intra-node segments. The launchers and the guardian (after a
SIGKILLed coordinator) remove those nobody maps, so only kinds whose live files show in /proc/PID/maps
under their own names may be here: a POSIX semaphore (``sem.*``, Python's multiprocessing locks) is
mapped under a temporary name that glibc then links to its real one, so a live one looks unmapped
(sweeping them broke a concurrent Dask nanny's start)."""
SLACK_S = 1.0


def snapshot(shm_dir: Path = SHM_DIR) -> set[str]:
    """Names of the MPI segments that exist now (taken before every launch: one scandir of /dev/shm, which
    a shared node fills with other programs' files, instead of a glob that makes a Path of each)."""
    try:
        with os.scandir(shm_dir) as entries:
            return {e.name for e in entries if e.name.startswith(PREFIXES)}
    except OSError:
        return set()


def mapped_paths(proc: Path = Path("/proc")) -> set[str]:
    """Every /dev/shm file some live process maps (those we may read)."""
    found: set[str] = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "maps").read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            idx = line.find("/dev/shm/")
            if idx >= 0:
                found.add(line[idx:].removesuffix(" (deleted)"))
    return found


def sweep(before: set[str], started: float, ended: float, shm_dir: Path = SHM_DIR) -> list[str]:
    """Remove the segments a failed run left; return their names."""
    uid = os.getuid()
    candidates = []
    for name in snapshot(shm_dir) - before:
        path = shm_dir / name
        try:
            st = path.stat()
        except OSError:
            continue
        if st.st_uid == uid and started - SLACK_S <= st.st_ctime <= ended + SLACK_S:
            candidates.append(path)
    if not candidates:
        return []
    mapped = mapped_paths()
    removed = []
    for path in candidates:
        if str(path) in mapped:
            continue
        try:
            path.unlink()
            removed.append(path.name)
        except OSError as exc:
            log.debug("cannot remove %s: %s", path, exc)
    return removed
