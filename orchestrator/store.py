"""The run directory: the campaign's memory on disk.

::

    <workdir>/<name>-<timestamp>/
        loop.yml        the config as given
        state.json      rewritten atomically after every completed step
        events.jsonl    append-only: one line per sim/training start, end, failure
        data/           one .npy per accepted generate run, and check-N.npy per check row joining the data
        models/         one checkpoint per finished training
        sims/<run_id>/  stdout.log, stderr.log, result.npy of each attempt
        summary.json    written at the end
        .lock           held (fcntl) by the one coordinator using the run dir; names its pid and host

Everything is written atomically (temporary name, fsync, rename), so a kill at
any moment leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import stat
import time
import zipfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.errors import StoreError
from orchestrator.results import Table
from orchestrator.runlog import Event, LoggedEvent, State, data_role, parse_events, status_of

log = logging.getLogger(__name__)

STATE = "state.json"
EVENTS = "events.jsonl"
SUMMARY = "summary.json"
LOOP = "loop.yml"
LOCK = ".lock"
LAUNCH_ID = re.compile(r"^(?:check|generate)-(\d+)$")
NOT_ADOPTED = "not-adopted"
"""Where a resume moves .npy files in data/ that are not accepted data (beside them, never deleted)."""


def table_problem(table: np.ndarray, ncols: int | None, names: Sequence[str] = ()) -> str | None:
    """Why an array is not a table of training rows (None: it is one).

    >>> table_problem(np.zeros((4, 3)), 2, ["x", "y"])
    '3 columns, where loop.yml declares 2 (x, y)'
    """
    if table.ndim != 2:
        return f"a {table.ndim}-D array of shape {table.shape}, not a table of rows"
    if ncols is not None and table.shape[1] != ncols:
        declared = f" ({', '.join(names)})" if names else ""
        return f"{table.shape[1]} columns, where loop.yml declares {ncols}{declared}"
    if not np.issubdtype(table.dtype, np.floating):
        return f"{table.dtype} values, not floats"
    if not np.isfinite(table).all():
        return f"{int((~np.isfinite(table)).any(axis=1).sum())} row(s) with NaN or Inf"
    return None


def data_file_problem(path: Path, ncols: int | None, names: Sequence[str] = ()) -> str | None:
    """Why the .npy at ``path`` is not training data (unreadable, not a finite table of ``ncols``)."""
    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        return f"unreadable .npy ({exc.__class__.__name__}: {exc})"
    return table_problem(np.asarray(table), ncols, names)


DATA_RUNS = ("generate-", "check-")
"""Run ids whose rows may be data (a check's truth joins the training data too)."""


def unaccepted(path: Path, ncols: int | None, logged_rows: int | None) -> str | None:
    """Why a file in data/ that the state does not count is not a generate or check run's accepted data."""
    if not LAUNCH_ID.match(path.stem) or not path.stem.startswith(DATA_RUNS):
        return "not named after a generate or check run"
    if logged_rows is None:
        return "no run of that id ended ok in the run log"
    why = data_file_problem(path, ncols)
    if why is None and int(np.load(path, mmap_mode="r").shape[0]) != logged_rows:
        why = f"not the {logged_rows} rows the run log says that run returned"
    return why


def checkpoint_ok(path: Path) -> bool:
    """A model checkpoint reads as one: a zip archive (what torch.save writes) whose members'
    checksums hold. Checked without torch, which only the Dask workers import."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write data to path via a temporary file in the same directory, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves the old file, never a 0-byte temporary one
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


class AcceptedRows:
    """Every accepted row of a run, as one table, read from its data files as they come.

    Files are appended as rows are accepted (a check row each, with ``train_on_checks``), so only
    the new ones are read: reading them all again for every check made the coordinator's CPU grow
    with the square of the checks. A list that changed otherwise (continual mode's window) is read
    again whole."""

    def __init__(self, root: Path, n_columns: int) -> None:
        self.root = root
        self.files: list[str] = []
        self.table = np.empty((0, n_columns))

    def read(self, files: Sequence[str]) -> np.ndarray:
        files = list(files)
        if files != self.files:
            kept = len(self.files) if files[:len(self.files)] == self.files else 0
            tables = [np.load(self.root / f, allow_pickle=False) for f in files[kept:]]
            self.table = np.concatenate([self.table[:0] if kept == 0 else self.table, *tables])
            self.files = files
        return self.table


class RunStore:
    """One campaign's run directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.models_dir = root / "models"
        self.sims_dir = root / "sims"
        self._events: Any = None
        self.full_error: OSError | None = None
        """The first event that did not fit on the disk (None: every one was written)."""
        self._lock_fd: int | None = None

    @classmethod
    def create(cls, workdir: Path, name: str, loop_file: Path) -> RunStore:
        """Make a fresh run directory (mode 0700) with a copy of loop.yml.

        The path is made absolute: sims run with their own directory as working
        directory, so every path handed to them must not depend on ours.
        """
        workdir = workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        for i in range(1000):
            root = workdir / (f"{name}-{stamp}" if i == 0 else f"{name}-{stamp}-{i}")
            try:
                root.mkdir(mode=0o700)
                break
            except FileExistsError:
                continue
        else:
            raise StoreError(f"cannot create a run directory under {workdir}")
        store = cls(root)
        for d in (store.data_dir, store.models_dir, store.sims_dir):
            d.mkdir(mode=0o700)
        shutil.copyfile(loop_file, root / LOOP)
        return store

    @classmethod
    def open(cls, root: Path) -> RunStore:
        """An existing run directory (for resume, status, report)."""
        root = root.resolve()
        if not (root / STATE).is_file():
            raise StoreError(f"{root} is not a run directory (no {STATE}); give the directory `run` printed")
        return cls(root)

    # -- state ------------------------------------------------------------
    def write_state(self, state: Mapping[str, Any]) -> None:
        # Compact: rewritten after every step, and json's C encoder only serves indent=None.
        atomic_write_bytes(self.root / STATE, (json.dumps(dict(state), sort_keys=True) + "\n").encode())

    def read_state(self) -> dict[str, Any]:
        try:
            data = json.loads((self.root / STATE).read_text())
        except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError too
            raise StoreError(f"{self.root / STATE}: unreadable ({exc}); the run cannot be resumed") from exc
        if not isinstance(data, dict):
            raise StoreError(f"{self.root / STATE}: not a campaign state (a JSON {type(data).__name__}); "
                             "the run cannot be resumed")
        return data

    def read_campaign_state(self) -> State:
        """state.json as a :class:`State` (its config stays in :meth:`read_state`)."""
        try:
            return State.from_json(self.read_state())
        except (TypeError, ValueError, AttributeError) as exc:
            raise StoreError(f"{self.root / STATE}: not a campaign state ({exc}); the run cannot be resumed") from exc

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        path = self.root / SUMMARY
        atomic_write_json(path, dict(summary))
        return path

    # -- events -----------------------------------------------------------
    def log(self, event: Event) -> None:
        """Append one event line, whole or not at all, flushed at once (monotonic and wall timestamps).

        A full disk does not raise here (the campaign's next checkpoint does, see
        :attr:`full_error`): a line that does not fit is cut back off, so events.jsonl is never torn.
        """
        if self._events is None:
            self._events = self._open_events()
        record = {"t": time.time(), "mono": time.monotonic(), "event": event.KIND.value, **event.record()}
        data = (json.dumps(record, default=str) + "\n").encode()
        fd = self._events.fileno()
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            os.ftruncate(fd, size)
            if self.full_error is None:
                log.warning("%s: disk full, event %s not logged", self.root / EVENTS, event.KIND.value)
                self.full_error = exc

    def _open_events(self) -> Any:
        """events.jsonl for appending; a torn last line (a kill mid-write) is ended first,
        so it stays one unreadable line instead of swallowing the next event."""
        path = self.root / EVENTS
        f = path.open("a+b", buffering=0)
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                log.warning("%s: ending a torn last line", path)
                f.write(b"\n")
        f.close()
        return path.open("ab", buffering=0)

    def read_events(self) -> list[LoggedEvent]:
        """Every event so far (a torn last line is skipped)."""
        return read_events(self.root)

    def close(self, *, release: bool = True) -> None:
        """Close the event log and (unless ``release`` is False) give up the run dir's lock."""
        if self._events is not None:
            self._events.close()
            self._events = None
        if release and self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def discard_unstarted(self) -> bool:
        """Remove a fresh run directory that nothing ran in (what :meth:`create` and the first state.json
        made, and nothing else), so that the next ``run`` of the campaign does not resume it; True if
        removed. Anything else in it keeps the directory whole."""
        made = {LOCK, LOOP, STATE, self.data_dir.name, self.models_dir.name, self.sims_dir.name}
        try:
            if {p.name for p in self.root.iterdir()} - made or any(
                    any(d.iterdir()) for d in (self.data_dir, self.models_dir, self.sims_dir)):
                return False
            self.close()
            for d in (self.data_dir, self.models_dir, self.sims_dir):
                d.rmdir()
            for name in (LOOP, STATE, LOCK):
                (self.root / name).unlink(missing_ok=True)
            self.root.rmdir()
        except OSError as exc:
            log.warning("could not remove the unstarted run directory %s: %s", self.root, exc)
            return False
        return True

    # -- one coordinator per run dir -----------------------------------------
    def lock(self) -> None:
        """Take the run dir for this process (an fcntl lock, released when it ends, even by SIGKILL).

        Raises StoreError naming the holder (pid and host) when another coordinator has it.
        """
        path = self.root / LOCK
        fd = _open_lock(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise StoreError(f"{self.root} is in use by {holder}; wait for that coordinator to end "
                             "(or stop it) before running this campaign again") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._lock_fd = fd

    def coordinator(self) -> tuple[bool | None, str]:
        """Whether a live coordinator holds the run dir, and who (``.lock`` names it): True when a
        process holds the lock (the kernel's lock table says so), False when none does (it ended, or
        was SIGKILLed), None when it ran on another host (its lock is not in this host's table)."""
        path = self.root / LOCK
        if not path.exists() and not path.is_symlink():
            return False, ""
        fd = _open_lock(path, os.O_RDONLY)
        try:
            named = os.pread(fd, 200, 0).decode(errors="replace").strip()
            pid = flock_holder(fd)
        finally:
            os.close(fd)
        if pid is not None:
            return True, named or f"pid {pid}"
        host = named.rpartition(" on ")[2]
        return (None if host and host != socket.gethostname() else False), named

    # -- resume: the state checked against the disk --------------------------
    def next_launch(self, counter: int) -> int:
        """A launch counter past every sim dir on disk (a sim in flight at a SIGKILL keeps its id)."""
        if not self.sims_dir.is_dir():
            return counter
        used = [int(m.group(1)) for d in self.sims_dir.iterdir() if (m := LAUNCH_ID.match(d.name))]
        return max([counter, *used])

    def reconcile(self, state: State, ncols: int | None = None) -> list[tuple[str, int]]:
        """Check the state's data files against data/ before a resume; adopt complete ones it missed.

        A file the state counts but the disk lacks (or one that does not load) is a StoreError
        saying which; a file written just before a kill, whose step the state had not recorded
        yet, is added to the state (it was accepted: written atomically). Only such a file is
        adopted: a generate run the run log says ended ok with that many rows, a finite table of
        ``ncols`` columns; anything else in data/ (a stray or damaged .npy) is moved aside to
        ``data/not-adopted/`` with a warning. A checkpoint that does not read falls back to the
        last one that does (:meth:`usable_models`). Returns the adopted files and their rows.
        """
        self.usable_models(state)
        rows = {"generate": 0, "check": 0}
        for rel in state.data_files:
            rows[data_role(rel)] += self._rows(rel, missing=f"{self.root / rel} is missing")
        for role, counted in (("generate", state.data_points), ("check", state.check_rows)):
            if rows[role] != counted:
                raise StoreError(f"{self.root}: data/ holds {rows[role]} {role} rows of the state's files but "
                                 f"state.json counts {counted}; start a new run (--new)")
        known = set(state.data_files)
        adopted = []
        ended = self._runs_ended_ok()
        for path in sorted(self.data_dir.glob("*.npy")):
            rel = str(path.relative_to(self.root))
            if rel not in known:
                why = unaccepted(path, ncols, ended.get(path.stem))
                if why is not None:
                    self._set_aside(path, why)
                    continue
                n = self._rows(rel, missing=f"{path} is unreadable")
                state.data_files.append(rel)
                if data_role(rel) == "check":  # a check's row: data, never a round's worth of new runs
                    state.check_rows += n
                else:
                    state.untrained.append(rel)
                    state.data_points += n
                adopted.append((rel, n))
        for tmp in self.data_dir.glob(".*.tmp*"):
            tmp.unlink(missing_ok=True)  # a write a kill cut short: never accepted
        return adopted

    def check_models(self, state: State) -> None:
        """Before a resume: the checkpoints the state names are there (``models/`` made again when it
        names none); a missing one is a one-line StoreError."""
        named = [f for f in [state.model_file, *state.member_files] if f]
        if not named:
            self.models_dir.mkdir(mode=0o700, exist_ok=True)
            return
        for rel in named:
            if not (self.root / rel).is_file():
                where = "models/ is gone" if not self.models_dir.is_dir() else f"{self.root / rel} is missing"
                raise StoreError(f"{self.root}: {where}, but state.json's model_file/member_files name {rel}; "
                                 "restore it, or start a new run (--new)")

    def _runs_ended_ok(self) -> dict[str, int]:
        """Run id -> rows of every generate or check run the run log says ended ok."""
        return {str(e["run_id"]): int(e.get("rows") or 0) for e in self.read_events()
                if e.kind == "sim_end" and e.get("outcome") == "ok"
                and str(e.get("run_id", "")).startswith(DATA_RUNS)}

    def _set_aside(self, path: Path, why: str) -> None:
        aside = self.data_dir / NOT_ADOPTED
        aside.mkdir(mode=0o700, exist_ok=True)
        log.warning("resume: %s is not accepted data (%s): not adopted, moved to %s", path, why, aside)
        os.replace(path, aside / path.name)

    def usable_models(self, state: State) -> None:
        """The state's checkpoint (and ensemble members) must read as one: a garbage or truncated
        file makes the resume fall back, with a warning, to the newest older version whose files
        read, or to no model (the next round trains a fresh one); every data file is then untrained."""
        files = [state.model_file, *state.member_files] if state.model_file else []
        bad = next((f for f in files if not checkpoint_ok(self.root / f)), None)
        if bad is None:
            return
        fallback = next((v for v in range(state.model_version - 1, 0, -1)
                         if checkpoint_ok(self.models_dir / f"model-{v:04d}.pt")), 0)
        log.warning("resume: %s is an unreadable checkpoint; going on from %s", self.root / bad,
                    f"model {fallback}" if fallback else "no model (the next round trains a fresh one)")
        state.model_version = fallback
        state.model_file = f"models/model-{fallback:04d}.pt" if fallback else None
        state.member_files = [state.model_file] if state.model_file else []
        state.untrained = list(state.data_files)
        state.successes, state.failed_current = 0, False

    def _rows(self, rel: str, missing: str) -> int:
        try:
            table = np.load(self.root / rel, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise StoreError(f"{missing} ({exc.__class__.__name__}); the state counts it: restore the file, "
                             "or start a new run (--new)") from exc
        return int(table.shape[0])

    # -- data and models --------------------------------------------------
    def sim_dir(self, run_id: str) -> Path:
        return self.sims_dir / run_id

    def accept_data(self, run_id: str, table: Table) -> Path:
        """Store an accepted generate result; it counts only once this returns."""
        path = self.data_dir / f"{run_id}.npy"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with tmp.open("wb") as f:
                np.save(f, table, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def save_model(self, version: int, state: bytes, member: int = 0) -> Path:
        """A checkpoint; ensemble member k > 0 of a version goes beside member 0's."""
        suffix = f"-m{member}" if member else ""
        path = self.models_dir / f"model-{version:04d}{suffix}.pt"
        atomic_write_bytes(path, state)
        return path


def _open_lock(path: Path, flags: int) -> int:
    """The run dir's ``.lock``, opened; anything but a lock file there is a one-line StoreError."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.EISDIR, errno.ELOOP):
            raise
        fd = -1
    if fd >= 0 and stat.S_ISREG(os.fstat(fd).st_mode):
        return fd
    if fd >= 0:
        os.close(fd)
    kind = "a symbolic link" if path.is_symlink() else "a directory" if path.is_dir() else "not a plain file"
    raise StoreError(f"{path} is {kind}, not the run's lock file; remove it if no coordinator uses this run, "
                     "then try again")


def flock_holder(fd: int, locks: Path = Path("/proc/locks")) -> int | None:
    """The pid of the process holding a lock on the file open as ``fd`` (this host's lock table,
    ``/proc/locks``), or None when none holds one (or the table cannot be read)."""
    st = os.fstat(fd)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = locks.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and "->" not in fields[:2] and fields[5] == want:  # "->": a waiter, not the holder
            return int(fields[4]) if fields[4].isdigit() else None
    return None


def read_events(run_dir: Path) -> list[LoggedEvent]:
    """The events of a run directory, typed (a torn last line is skipped)."""
    path = run_dir / EVENTS
    if not path.exists():
        return []
    try:
        text = path.read_bytes().decode(errors="replace")
    except OSError as exc:
        raise StoreError(f"{path}: unreadable ({exc.strerror})") from exc
    return parse_events(text.splitlines(), str(path))


def find_unfinished(workdir: Path, name: str) -> Path | None:
    """The newest run of this campaign under workdir that did not finish (running or interrupted)."""
    candidates = sorted(workdir.glob(f"{name}-*/{STATE}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for state_file in candidates:
        try:
            status = status_of(RunStore.open(state_file.parent).read_state())
        except StoreError:
            continue
        if status is not None and status.resumable:
            return state_file.parent
    return None
