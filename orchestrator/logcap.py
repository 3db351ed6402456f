"""Sim logs bounded while the sim runs: its stdout and stderr come through pipes into capped files.

A sim that writes hundreds of MB must fill neither the disk nor the coordinator's memory. So a
supervised process does not write its log files itself: it writes into pipes, and one small
thread per process (:class:`LogPump`) copies what arrives into the files, each a
:class:`CappedLog` that never grows past :data:`LOG_CAP_BYTES` (plus one note line): when the
next chunk would pass the cap, the older part is cut and the latest :data:`KEEP_BYTES` are
moved to the front, after a line saying how much was cut. Memory stays at one chunk, and the
end of the log (what a failure message quotes) is always the real end.

A write that fails (a full disk) drops that chunk but keeps draining the pipe, so the sim
never blocks on its own output; the first error is kept for the run's record.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

LOG_CAP_BYTES = 8 * 1024 * 1024
"""A sim's stdout/stderr log is never longer than this (plus one note line), while it runs and after."""
KEEP_BYTES = LOG_CAP_BYTES // 2
"""What a cut keeps: the latest this many bytes (so at least this much of the end is always there)."""
CHUNK = 1 << 16
PIPE_SIZE = 1 << 20
"""Asked-for pipe buffer (best effort): a sim writing in bursts waits less on the pump."""
MOVE_CHUNK = 1 << 20
"""How much of the kept tail is in memory at once while a cut moves it to the front."""
STOP_DRAIN_BYTES = 4 * PIPE_SIZE
"""Once told to stop, what the pump still takes before it ends (a process left writing forever)."""
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def cut_note(cut: int) -> bytes:
    return f"[orchestrator: the first {cut} bytes of this log were cut; the latest are kept]\n".encode()


class CappedLog:
    """A log file that holds at most ``cap`` bytes (plus a note line) however much is written to it."""

    def __init__(self, path: Path, cap: int = LOG_CAP_BYTES, keep: int | None = None) -> None:
        self.path = path
        self.cap = cap
        self.keep = min(keep if keep is not None else cap // 2, cap)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        self.size = 0
        """Bytes in the file now."""
        self.cut = 0
        """Bytes of output cut from the front so far."""
        self._note = 0
        """Length of the note line at the front (0 before the first cut)."""
        self.dropped = 0
        """Bytes that could not be written (a full disk)."""
        self.error: OSError | None = None

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self.cap:
            self._cut_front(len(data))
        try:
            view = memoryview(data)
            while view:
                n = os.pwrite(self.fd, view, self.size)
                self.size += n
                view = view[n:]
        except OSError as exc:
            self._failed(exc, len(view))

    def _failed(self, exc: OSError, lost: int) -> None:
        self.dropped += lost
        if self.error is None:
            self.error = exc
            # a full disk is the campaign's to report (once); anything else is worth a warning here
            level = logging.INFO if exc.errno in (errno.ENOSPC, errno.EDQUOT) else logging.WARNING
            log.log(level, "%s: cannot write the sim's output (%s); dropping it until it can", self.path, exc.strerror)

    def _cut_front(self, incoming: int) -> None:
        """Keep the latest bytes (room left for ``incoming``) after a note; copied forward in place."""
        keep = max(0, min(self.keep, self.cap - incoming) - 128)  # 128: room for the note line
        start = self.size - keep
        note = cut_note(self.cut + start - self._note)
        try:
            os.pwrite(self.fd, note, 0)  # the note is shorter than what it overwrites: start > len(note)
            moved = 0
            while moved < keep:
                chunk = os.pread(self.fd, min(MOVE_CHUNK, keep - moved), start + moved)
                if not chunk:
                    break
                os.pwrite(self.fd, chunk, len(note) + moved)
                moved += len(chunk)
            os.ftruncate(self.fd, len(note) + moved)
        except OSError as exc:  # keep what is there; later writes still land at the end
            self._failed(exc, 0)
            return
        self.cut += start - self._note
        self._note = len(note)
        self.size = len(note) + moved

    def close(self) -> None:
        os.close(self.fd)


class LogPump:
    """Pipes for a process's stdout and stderr, drained by one thread into :class:`CappedLog` files."""

    def __init__(self, paths: dict[str, Path], cap: int = LOG_CAP_BYTES,
                 on_done: Callable[[], None] | None = None) -> None:
        self._on_done = on_done
        """Called (in the pump's thread) once it has taken the last output."""
        self._error: str | None = None
        self._closed = False
        self.logs: dict[int, CappedLog] = {}
        self.write_ends: dict[str, int] = {}
        """Hand these to the child (then :meth:`start`, which closes our copies)."""
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        try:
            for name, path in paths.items():
                r, w = os.pipe2(os.O_CLOEXEC)
                with contextlib.suppress(OSError):
                    fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
                self.logs[r] = CappedLog(path, cap)
                self.write_ends[name] = w
        except BaseException:
            self.close()
            raise
        self._thread = threading.Thread(target=self._drain, name=f"logpump:{paths}", daemon=True)


    def start(self) -> None:
        """Start draining; the child holds the write ends now, so ours are closed."""
        for w in self.write_ends.values():
            os.close(w)
        self.write_ends.clear()
        self._thread.start()

    def _drain(self) -> None:
        try:
            self._copy()
        finally:
            if self._on_done is not None:
                self._on_done()

    def _copy(self) -> None:
        poller = select.poll()
        for fd in [*self.logs, self._wake_r]:
            poller.register(fd, select.POLLIN)
        open_fds = set(self.logs)
        stopping, after_stop = False, 0
        while open_fds and after_stop <= STOP_DRAIN_BYTES:
            events = poller.poll(0 if stopping else None)
            if not events:
                break  # stopping, and nothing more to read now
            for fd, _ in events:
                if fd == self._wake_r:
                    stopping = True
                    poller.unregister(fd)
                    continue
                chunk = os.read(fd, CHUNK)
                if chunk:
                    self.logs[fd].write(chunk)
                    after_stop += len(chunk) if stopping else 0
                else:
                    poller.unregister(fd)
                    open_fds.discard(fd)

    def stop(self) -> None:
        """Tell the thread to take what is readable now and end (a process left holding a pipe)."""
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def join(self) -> str | None:
        """Wait for the thread, close everything; the first write error as a short line (None: none)."""
        if self._thread.is_alive():
            self._thread.join()
        for cap in self.logs.values():
            if cap.error is not None and self._error is None:
                self._error = f"{cap.path.name}: {cap.error.strerror} ({cap.dropped} bytes of output dropped)"
        self.close()
        return self._error

    def close(self) -> None:
        """Close every descriptor (once)."""
        if self._closed:
            return
        self._closed = True
        for fd in [*self.write_ends.values(), self._wake_r, self._wake_w]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.write_ends.clear()
        for r, cap in self.logs.items():
            with contextlib.suppress(OSError):
                os.close(r)
            with contextlib.suppress(OSError):
                cap.close()
        self.logs.clear()
