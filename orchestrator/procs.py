"""One door for processes: starting, watching, killing trees by the ids we own.

Every external command the orchestrator starts goes through here: it is
logged with its argv, started without a shell, in its own process group (so a
timeout or shutdown can end the whole tree), and its failure is raised with
argv, exit code and output tail. Process trees are listed with psutil; a
process is named by (pid, start time), so a reused pid is never signalled,
and only processes below one we started (or ones we were told about) are killed.
Both the coordinator and the spawn agent use these helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil

from orchestrator import shm
from orchestrator.errors import CommandError
from orchestrator.holding import Cgroup, become_subreaper, child_setup
from orchestrator.logcap import LOG_CAP_BYTES, LogPump

log = logging.getLogger(__name__)

KILL_GRACE_S = 2.0



def run_checked(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float | None = 60, input: str | None = None
) -> str:
    """Run a short command synchronously; return stdout, raise CommandError on failure."""
    log.debug("run: %s", argv)
    try:
        proc = subprocess.run(
            list(argv), env=dict(env) if env is not None else None, capture_output=True, text=True,
            timeout=timeout, input=input, check=False,
        )
    except FileNotFoundError as exc:
        raise CommandError(argv, 127, "", f"{argv[0]}: command not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(argv, 124, "", f"timed out after {timeout} s") from exc
    if proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


@dataclass(frozen=True)
class ProcessOutcome:
    """How a supervised process ended."""

    returncode: int | None
    """Exit code (negative: killed by that signal); None if it timed out or was cancelled."""
    timed_out: bool
    pid: int
    wall_s: float
    log_error: str | None = None
    """The first failure to write the process's output to its logs (a full disk), if any."""


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a process group we started; a group already gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


GUARD_GRACE_S = 1.5
"""After the coordinator dies, how long its process groups get between SIGTERM and SIGKILL."""

GUARD_ENV = "ORCHESTRATOR_GUARD"
"""Set in the coordinator's environment to a token of its own; every process it starts inherits it."""

_GUARD = r"""
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
token = ("%s=" % sys.argv[2]).encode() + sys.argv[3].encode() + b"\0"
me = os.getpid()
def started(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[19]
    except OSError:
        return None
groups, pids = set(), {}
for line in sys.stdin:  # EOF: the coordinator is gone, however it ended (SIGKILL included)
    op, kind, rest = line[0], line[1], line[2:].split()
    if kind == "g":
        groups.add(int(rest[0])) if op == "+" else groups.discard(int(rest[0]))
    elif op == "+":
        pids[int(rest[0])] = rest[1]
    else:
        pids.pop(int(rest[0]), None)
def marked():
    # every process of ours whose environment carries the coordinator's token, started before the
    # guardian could be told of it included (a fork in flight at the SIGKILL)
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != me:
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if token in f.read():
                        s = started(d)
                        if s is not None:
                            pids.setdefault(int(d), s)
            except OSError:
                pass
def send(sig):
    for g in list(groups):
        try:
            os.killpg(g, sig)
        except (ProcessLookupError, PermissionError):
            groups.discard(g)
    for p, start in list(pids.items()):
        if started(p) != start:  # gone, or its pid reused: never ours to signal
            del pids[p]
            continue
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            del pids[p]
marked()
ending = bool(groups or pids)  # nothing at a normal end: the coordinator unregistered all it started
send(signal.SIGTERM)  # srun forwards it to its step; mpiexec ends its ranks
deadline = time.monotonic() + float(sys.argv[1])
while (groups or pids) and time.monotonic() < deadline:
    time.sleep(0.05)
    send(0)
marked()
send(signal.SIGKILL)
def cgroup_pids(top):
    out = []
    for d, _, files in os.walk(top):
        try:
            with open(os.path.join(d, "cgroup.procs")) as f:
                out += [int(p) for p in f.read().split()]
        except (OSError, ValueError):
            pass
    return out
def end_cgroup(top):  # what left every group and the token (setsid, a cleared environment)
    try:
        with open(os.path.join(top, "cgroup.kill"), "w") as f:
            f.write("1")
    except OSError:
        for p in cgroup_pids(top):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
    deadline = time.monotonic() + 5
    while cgroup_pids(top) and time.monotonic() < deadline:
        time.sleep(0.02)
    for d, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
        try:
            os.rmdir(d)
        except OSError:
            pass
if len(sys.argv) > 4 and sys.argv[4] and os.path.isdir(sys.argv[4]):
    end_cgroup(sys.argv[4])
def sweep_shm(since, prefixes):  # the shared memory the ended processes left (a clean MPI end removes its own)
    try:
        names = [n for n in os.listdir("/dev/shm") if n.startswith(prefixes)]
    except OSError:
        return
    uid, found = os.getuid(), []
    for n in names:
        try:
            st = os.stat("/dev/shm/" + n)
        except OSError:
            continue
        if st.st_uid == uid and st.st_ctime >= since:
            found.append("/dev/shm/" + n)
    if not found:
        return
    mapped = set()  # as shm.mapped_paths (this script imports nothing of ours); read after the listing,
    # and a segment is mapped the moment it is made
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/maps") as f:
                    for line in f:
                        i = line.find("/dev/shm/")
                        if i >= 0:
                            mapped.add(line[i:].rstrip("\n").removesuffix(" (deleted)"))
            except OSError:
                pass
    for path in found:
        if path not in mapped:  # still mapped: a live run's (a concurrent campaign's, anyone's)
            try:
                os.unlink(path)
            except OSError:
                pass
if ending and len(sys.argv) > 5:
    sweep_shm(float(sys.argv[5]), tuple(sys.argv[6].split(",")))
"""


def start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot, as the guardian reads it), which tells it from a
    later one with its pid."""
    info = read_stat(pid)
    return None if info is None else str(info.start)


class Guardian:
    """A tiny process that ends what the coordinator started once the coordinator is gone.

    The coordinator's environment carries a token (:data:`GUARD_ENV`) that every process it starts
    inherits; the guardian ends those, plus the groups and pids it was told of. It reads
    process-group ids (and single pids) to watch from a pipe whose only writer is the coordinator;
    the kernel closes that pipe when the coordinator dies, even by SIGKILL, and the guardian then
    sends SIGTERM, waits :data:`GUARD_GRACE_S`, and sends SIGKILL, then removes the MPI shared memory
    they left (:data:`orchestrator.shm.PREFIXES`: ours, made since it started, mapped by no live
    process). A normal end unregisters everything first, so the guardian just exits. It runs in its
    own session: a signal to the coordinator's terminal group does not reach it.
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._token: str | None = None
        self.holding = False
        """Descendants are held by the kernel's means too (:meth:`start` with ``hold``)."""
        self.cgroup: Cgroup | None = None
        """The campaign's cgroup v2 subtree (None where none is writable): see :mod:`orchestrator.holding`."""
        self._groups: set[int] = set()
        self._pids: dict[int, str] = {}
        """What the guardian was told, to tell a new one if it dies (:meth:`_watch`)."""
        self._since = 0.0
        """When the first guardian started: the shared-memory files it sweeps are newer."""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, *, hold: bool = False) -> None:
        """Start the guardian (idempotent); call it before anything else is started.

        ``hold`` (the coordinator's first call): also hold descendants with the kernel's means
        (:mod:`orchestrator.holding`: child subreaper, a cgroup per started process, a parent-death
        signal). It costs about 10 ms per process started, so a node agent's many small sims go
        without it (their agent is held instead)."""
        with self._lock:
            if hold and self._token is None:
                self.holding = True
            self._start()

    def _start(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        first = self._token is None
        if self._token is None:  # this coordinator's own (a parent's token is never reused)
            self._since = time.time() - 1.0  # what the campaign makes in /dev/shm is newer (1 s: ctime's coarseness)
            self._token = f"{os.getpid()}-{secrets.token_hex(8)}"
            os.environ[GUARD_ENV] = self._token
            if self.holding:
                become_subreaper()
                self.cgroup = Cgroup.create(f"orchestrator-{self._token}")
        token = self._token
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _GUARD, str(GUARD_GRACE_S), GUARD_ENV, token,
             str(self.cgroup.path) if self.cgroup else "", repr(self._since), ",".join(shm.PREFIXES)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        log.debug("guardian %d started", self._proc.pid)
        if not first:  # a new guardian learns what the lost one watched
            lines = [f"+g{g}\n" for g in self._groups] + [f"+p{p} {t}\n" for p, t in self._pids.items()]
            self._write("".join(lines))
        threading.Thread(target=self._watch, args=(self._proc,), name="guardian-watch", daemon=True).start()

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        """The guardian's loss is noticed: if it dies while the coordinator lives, a new one is started
        at once and told everything the lost one watched."""
        proc.wait()
        with self._lock:
            if self._proc is not proc:
                return
            log.warning("the process guardian (pid %d) died (%s); starting a new one", proc.pid, proc.returncode)
            self._start()

    def _write(self, text: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(text.encode())
            self._proc.stdin.flush()
        except BrokenPipeError:
            log.warning("the process guardian is gone; %s is not watched", text.strip())

    def _send(self, line: str) -> None:
        with self._lock:
            self._start()
            op, kind, rest = line[0], line[1], line[2:].split()
            if kind == "g":
                (self._groups.add if op == "+" else self._groups.discard)(int(rest[0]))
            elif op == "+":
                self._pids[int(rest[0])] = rest[1]
            else:
                self._pids.pop(int(rest[0]), None)
            self._write(line)

    def watch_group(self, pgid: int) -> None:
        self._send(f"+g{pgid}\n")

    def unwatch_group(self, pgid: int) -> None:
        self._send(f"-g{pgid}\n")

    def end_cgroup(self, pid: int) -> None:
        """After a started process ended: kill what it left in its cgroup (a daemon that setsid)."""
        if self.cgroup is not None:
            left = self.cgroup.end(pid)
            if left:
                log.info("process %d left %d process(es) in its cgroup: killed", pid, left)

    def watch_pid(self, pid: int) -> None:
        """Watch one process (not a group), known by its pid and start time."""
        start = start_time(pid)
        if start is not None:
            self._send(f"+p{pid} {start}\n")

    def unwatch_pid(self, pid: int) -> None:
        self._send(f"-p{pid}\n")


guardian = Guardian()
"""The coordinator's one guardian (started with the first process it watches)."""


async def _end(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the process group, then SIGKILL it after ``grace`` seconds."""
    kill_group(proc.pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), grace)
    kill_group(proc.pid, signal.SIGKILL)
    await proc.wait()


ENTER = "orch-enter"
"""The program (sims/orch-enter.c, installed beside the interpreter) a held process runs first: it
does what :func:`~orchestrator.holding.child_setup` does between fork and exec, so the coordinator
starts the process with vfork instead of a fork of itself plus Python in the child. Measured for
issue 25 with the coordinator's imports loaded: 0.45 instead of 2.4 ms of the coordinator's CPU
per process started (wall 0.9 vs 4.8 ms)."""


@functools.cache
def enter_program() -> str | None:
    """``orch-enter`` beside the interpreter; None where it is not installed (``child_setup`` then)."""
    path = Path(sys.executable).parent / ENTER
    return str(path) if os.access(path, os.X_OK) else None


def executable(program: str, env: Mapping[str, str], cwd: Path | None) -> str:
    """``program`` as exec would find it (on the child's PATH, or relative to its cwd); raises what a
    direct exec would: FileNotFoundError, or PermissionError for a file that is not executable."""
    if os.sep in program:
        path = Path(program) if os.path.isabs(program) or cwd is None else Path(cwd) / program
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
        if path.is_dir() or not os.access(path, os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
        return str(path)
    found = shutil.which(program, path=env.get("PATH", os.defpath))
    if found is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    return found


async def start(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    stdout: IO[bytes] | int | None,
    stderr: IO[bytes] | int | None,
    stdin: int | None = subprocess.DEVNULL,
    cwd: Path | None = None,
    limit: int = 1 << 16,
) -> asyncio.subprocess.Process:
    """Start argv (no shell) in its own session, so its whole tree can be ended by group.

    The one place the orchestrator starts a long-lived child: sims (:func:`supervise`),
    spawn agents, srun'd Dask workers. The :data:`guardian` watches its group from here on
    (whoever ends it normally calls ``guardian.unwatch_group``). Raises FileNotFoundError if
    argv[0] does not exist.
    """
    log.debug("exec: %s", list(argv))
    guardian.start()  # before the fork: the child enters the campaign's cgroup
    setup = None
    if guardian.holding:
        enter = enter_program()
        if enter is not None:  # started by vfork, held by orch-enter before it execs argv
            argv = [enter, str(os.getpid()), str(guardian.cgroup.path) if guardian.cgroup else "",
                    executable(argv[0], env, cwd), *argv]
        else:
            setup = functools.partial(child_setup, guardian.cgroup)
    proc = await asyncio.create_subprocess_exec(
        *argv, env=dict(env), stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd, start_new_session=True, limit=limit,
        preexec_fn=setup,
    )
    guardian.watch_group(proc.pid)  # a SIGKILLed coordinator leaves nothing of it behind
    return proc


async def supervise(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    stdout: Path,
    stderr: Path,
    timeout: float,
    cwd: Path | None = None,
    grace: float = KILL_GRACE_S,
    log_cap: int = LOG_CAP_BYTES,
) -> ProcessOutcome:
    """Run argv to completion in its own session, output to files capped at ``log_cap`` bytes.

    The output comes through pipes into :class:`~orchestrator.logcap.CappedLog` files, so a
    log never outgrows its cap while the process runs (``os.devnull`` is passed straight on).
    On timeout or cancellation the whole process group is ended (SIGTERM, then SIGKILL), so no
    rank outlives its run. Raises FileNotFoundError if argv[0] does not exist.
    """
    t0 = time.monotonic()
    loop = asyncio.get_running_loop()
    drained = loop.create_future()

    def settle() -> None:
        if not drained.done():
            drained.set_result(None)

    def on_done() -> None:
        with contextlib.suppress(RuntimeError):  # the loop is already closed: nobody waits
            loop.call_soon_threadsafe(settle)

    pump = LogPump({name: path for name, path in (("stdout", stdout), ("stderr", stderr))
                    if str(path) != os.devnull}, log_cap, on_done)
    try:
        ends = pump.write_ends
        proc = await start(argv, env=env, stdout=ends.get("stdout", subprocess.DEVNULL),
                           stderr=ends.get("stderr", subprocess.DEVNULL), cwd=cwd)
    except BaseException:
        pump.close()
        raise
    pump.start()
    timed_out, rc = False, None
    try:
        rc = await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        timed_out = True
        await _end(proc, grace)
    except asyncio.CancelledError:
        await asyncio.shield(_end(proc, grace))
        raise
    finally:
        if proc.returncode is not None:
            # Ranks may linger after the launcher exits (a crashed mpiexec): end the group.
            kill_group(proc.pid, signal.SIGKILL)
            guardian.unwatch_group(proc.pid)
            guardian.end_cgroup(proc.pid)
        log_error = await asyncio.shield(_drained(pump, drained))
    return ProcessOutcome(None if timed_out else rc, timed_out, proc.pid, time.monotonic() - t0, log_error)


PUMP_DRAIN_S = 2.0
"""After a process ended, how long its output may take to arrive (a process that escaped its
group and still holds the pipe is not waited for longer)."""


async def _drained(pump: LogPump, drained: asyncio.Future[None]) -> str | None:
    """Wait for the pump to take the last output (at most PUMP_DRAIN_S, then it is told to stop)."""
    _, pending = await asyncio.wait([drained], timeout=PUMP_DRAIN_S)
    if pending:
        pump.stop()
        await drained
    return pump.join()  # the thread has ended (or is ending): no wait to speak of


def cap_log(path: Path, cap: int = LOG_CAP_BYTES) -> None:
    """Cut a log down to its last ``cap`` bytes (with a first line saying so); small logs are untouched.

    For logs another process wrote (slurmstepd, a spawned rank's shell), once it is done.
    """
    tmp = path.with_name(f".{path.name}.cap")
    try:
        size = path.stat().st_size
        if size <= cap:
            return
        with path.open("rb") as f:
            f.seek(size - cap)
            kept = f.read()
        note = f"[orchestrator: the first {size - cap} bytes of this log were cut; the last {cap} are kept]\n"
        tmp.write_bytes(note.encode() + kept)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial copy
        log.warning("%s: could not cap the log (%s)", path, exc.strerror)


TAIL_BYTES = 64 * 1024
"""How much of a log's end :func:`tail` reads (a failing sim's stderr may be hundreds of MB)."""


def tail(path: Path, lines: int = 5) -> str:
    """The last lines of a log file, for error messages (read from the end, never whole)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


# -- process trees: identities that survive pid reuse, killing exactly the ones we own --


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    start: int
    """Start time in clock ticks since boot: with the pid, a process identity that survives pid reuse."""
    comm: str


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@functools.cache
def _boot_time() -> float:
    return float(psutil.boot_time())


def _info(proc: psutil.Process) -> ProcInfo:
    """psutil's view of a process; its start back in clock ticks since boot (/proc/<pid>/stat's field)."""
    with proc.oneshot():
        start = round((proc.create_time() - _boot_time()) * CLOCK_TICKS)
        return ProcInfo(proc.pid, proc.ppid(), start, proc.name())


def read_stat(pid: int) -> ProcInfo | None:
    """One process; None if it is gone."""
    try:
        return _info(psutil.Process(pid))
    except psutil.Error:
        return None


def children_of(pid: int) -> list[int]:
    """Direct children (psutil; [] when the process is gone)."""
    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def descendants(root: int) -> list[ProcInfo]:
    """Every process below ``root`` (not ``root`` itself), parents before children (one scan)."""
    try:
        below = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return []
    return [info for child in below if (info := _info_or_none(child)) is not None]


def _info_or_none(proc: psutil.Process) -> ProcInfo | None:
    try:
        return _info(proc)
    except psutil.Error:
        return None


def all_processes() -> list[ProcInfo]:
    """Every process on this host."""
    return [info for proc in psutil.process_iter() if (info := _info_or_none(proc)) is not None]


def alive(pid: int, start: int) -> bool:
    """Is this very process (pid and start time) still there and not a zombie?"""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            return _info(proc).start == start and proc.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def signal_procs(procs: Iterable[tuple[int, int]], sig: int) -> None:
    """Send ``sig`` to each (pid, start) that is still that process."""
    for pid, start in procs:
        if alive(pid, start):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def kill_tree(root: int, known: Iterable[tuple[int, int]] = (), *, include_root: bool = True) -> list[int]:
    """SIGKILL ``root``, everything below it and the ``known`` (pid, start) pairs.

    The tree is frozen first (SIGSTOP, repeated until no new process appears) so
    nothing forks or gets reparented away between listing and killing. Returns
    the pids signalled.
    """
    targets: dict[int, int] = {pid: start for pid, start in known}
    root_info = read_stat(root)
    for _ in range(10):
        found = {p.pid: p.start for p in descendants(root)}
        if include_root and root_info is not None:
            found[root] = root_info.start
        new = {pid: start for pid, start in found.items() if targets.get(pid) != start}
        targets.update(found)
        signal_procs(new.items(), signal.SIGSTOP)
        if not new:
            break
    signal_procs(targets.items(), signal.SIGKILL)
    return sorted(targets)


def kill_known(procs: Iterable[tuple[int, int]]) -> list[int]:
    """SIGKILL each (pid, start) pair that is still that process; return those signalled."""
    live = [(pid, start) for pid, start in procs if alive(pid, start)]
    signal_procs(live, signal.SIGKILL)
    return sorted(pid for pid, _ in live)


def wait_gone(procs: Iterable[tuple[int, int]], timeout: float) -> bool:
    """Wait (on pidfds, no polling) until every process has exited; True if they all did."""
    fds: list[int] = []
    try:
        for pid, start in procs:
            try:
                fd = os.pidfd_open(pid)
            except (ProcessLookupError, OSError):
                continue
            if alive(pid, start):
                fds.append(fd)
            else:
                os.close(fd)
        deadline = time.monotonic() + timeout
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        pending = set(fds)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            for fd, _ in poller.poll(left * 1000):
                pending.discard(fd)
                poller.unregister(fd)
        return True
    finally:
        for fd in fds:
            os.close(fd)


def _cwd(pid: int) -> str | None:
    try:
        return str(psutil.Process(pid).cwd())
    except psutil.Error:
        return None


def _exe(pid: int) -> str | None:
    try:
        return str(psutil.Process(pid).exe()) or None
    except psutil.Error:
        return None


def _argv(pid: int) -> list[str]:
    try:
        return [str(a) for a in psutil.Process(pid).cmdline()]
    except psutil.Error:
        return []


def find_ranks(candidates: Iterable[ProcInfo], wdir: str, binary: str) -> list[ProcInfo]:
    """The spawned ranks among ``candidates``: running ``binary`` in ``wdir``."""
    want_exe, want_cwd = os.path.realpath(binary), os.path.realpath(wdir)  # /proc shows resolved paths
    return [p for p in candidates if _cwd(p.pid) == want_cwd and _exe(p.pid) == want_exe]


def end_ranks(wdir: str, binary: str, timeout: float = 5.0) -> list[int]:
    """SIGKILL any process on this host running ``binary`` in ``wdir`` (one run's ranks) and wait for them.

    The last resort after an agent died: hydra may still be tearing down the
    ranks it had, and an agent that died early never reported them.
    """
    ranks = [(p.pid, p.start) for p in find_ranks(all_processes(), wdir, binary)]
    signal_procs(ranks, signal.SIGKILL)
    wait_gone(ranks, timeout)
    return [pid for pid, _ in ranks]


def find_spawned_sruns(agent_srun: int, wdir: str) -> list[ProcInfo]:
    """The ``srun --mpi=pmi2 … --chdir=WDIR …`` that Slurm's PMI2 forked for one spawn.

    Slurm 22.05 forks it from the srun that started the spawn agent (on the
    coordinator's host, wherever the agent runs), next to that srun's own helper.
    """
    flag = f"--chdir={wdir}"
    found = []
    for pid in children_of(agent_srun):
        argv = _argv(pid)
        if argv and os.path.basename(argv[0]) == "srun" and flag in argv and (info := read_stat(pid)):
            found.append(info)
    return found
