"""Holding every descendant of the coordinator with what the kernel offers.

A process group and an environment token (:mod:`orchestrator.procs`) find what a sim
starts unless it leaves both: a daemon that calls ``setsid`` and clears its environment
escapes them. The kernel has three ways to keep such a process in view:

* a **cgroup v2** subtree (where one is writable: root, or a delegated subtree): each process
  :func:`orchestrator.procs.start` starts moves itself, between fork and exec, into its own
  ``p<pid>`` cgroup under the campaign's; whatever it forks later stays there, setsid or not.
  A sim's end kills what is left in its cgroup (``cgroup.kill``); the guardian kills the whole
  subtree when the coordinator is gone, however it ended;
* ``PR_SET_CHILD_SUBREAPER`` on the coordinator: an orphaned descendant is reparented to the
  coordinator instead of init, so the coordinator reaps it and it never leaves the tree while
  the coordinator lives;
* ``PR_SET_PDEATHSIG`` (SIGTERM) on each started launcher: if the coordinator dies while its
  guardian is already dead, mpiexec and srun are still told, and end their ranks and steps.

Linux only; elsewhere (and where no cgroup is writable) each is skipped and the group and
token rules of :mod:`orchestrator.procs` are what hold.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_libc: ctypes.CDLL | None = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        _libc = ctypes.CDLL(None, use_errno=True)


def prctl(option: int, value: int) -> bool:
    """``prctl(option, value)``; False where it is not available or fails."""
    if _libc is None:
        return False
    return int(_libc.prctl(option, value, 0, 0, 0)) == 0


def become_subreaper() -> bool:
    """Orphaned descendants are reparented to this process (and reaped by it) instead of init."""
    ok = prctl(PR_SET_CHILD_SUBREAPER, 1)
    log.debug("child subreaper: %s", ok)
    return ok


def cgroup2_base() -> Path | None:
    """This process's own cgroup v2 directory, where a cgroup2 hierarchy is mounted."""
    try:
        mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
        own = next((ln[3:] for ln in Path("/proc/self/cgroup").read_text().splitlines() if ln.startswith("0::")),
                   None)
    except OSError:
        return None
    mount = next((m[1] for m in mounts if len(m) > 2 and m[2] == "cgroup2"), None)
    if mount is None or own is None:
        return None
    return Path(mount) / own.lstrip("/")


class Cgroup:
    """The campaign's cgroup v2 subtree: one ``p<pid>`` child per process started."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._procs = os.fsencode(path)

    @classmethod
    def create(cls, name: str) -> Cgroup | None:
        """A fresh subtree under this process's cgroup; None where none can be made (no cgroup2,
        not writable, or the kernel refuses processes there)."""
        base = cgroup2_base()
        if base is None:
            return None
        sweep_stale(base)
        path = base / name
        try:
            path.mkdir(mode=0o700)
        except OSError as exc:
            log.debug("no cgroup for the campaign's processes under %s: %s", base, exc)
            return None
        group = cls(path)
        if not (path / "cgroup.kill").exists():  # before Linux 5.14: the guardian kills by cgroup.procs
            log.debug("cgroup %s has no cgroup.kill", path)
        return group

    def enter(self) -> None:
        """In a forked child before exec: move into ``p<pid>`` (async-signal-safe calls only)."""
        own = self._procs + b"/p" + str(os.getpid()).encode()
        try:
            os.mkdir(own, 0o700)
            fd = os.open(own + b"/cgroup.procs", os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        except OSError:
            pass  # not held by the cgroup; the group and token rules still hold it

    def end(self, pid: int, timeout: float = 2.0) -> int:
        """Kill what is left in ``p<pid>`` (a daemon the process left), reap it, remove the cgroup.
        Returns how many processes were left."""
        return kill_cgroup(self.path / f"p{pid}", timeout)


def sweep_stale(base: Path) -> None:
    """Remove the empty subtrees of coordinators that died with their guardian (``orchestrator-<pid>-…``,
    that pid gone); a populated one is left alone."""
    for old in base.glob("orchestrator-*-*"):
        pid = old.name.split("-")[1]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists() or _pids(old):
            continue
        kill_cgroup(old, timeout=0)


def _pids(path: Path) -> list[int]:
    pids: list[int] = []
    for procs in path.rglob("cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            pids += [int(p) for p in procs.read_text().split()]
    return pids


def kill_cgroup(path: Path, timeout: float = 2.0) -> int:
    """SIGKILL every process in the cgroup ``path`` and below, reap those that are our children,
    and remove the (now empty) cgroups. Returns how many processes were there."""
    if not path.is_dir():
        return 0
    left = _pids(path)
    if left:
        try:
            (path / "cgroup.kill").write_text("1")
        except OSError:
            for pid in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while _pids(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    for pid in left:  # an orphan reparented to us (the subreaper) is ours to reap
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
    for d in sorted((p for p in [path, *path.rglob("*")] if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()
    return len(left)


def child_setup(cgroup: Cgroup | None) -> None:
    """Between fork and exec of a started process: its own cgroup, and SIGTERM when the
    coordinator dies (so a launcher ends its ranks even with the guardian gone)."""
    if cgroup is not None:
        cgroup.enter()
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
