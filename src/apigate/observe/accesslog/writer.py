"""Access log lines off the event loop: a bounded queue the loop appends to, and one thread that
writes what is queued in batches, to stdout or a file it rotates.

The loop's side is ``LogWriter.put``: a length check and a deque append (a deque's append and
popleft are atomic, so the loop and the thread share it without a lock). When the output cannot
keep up (a full disk, a pipe nobody reads), the queue fills and further lines are dropped and
counted; nothing queues without bound and the loop never waits for the output.

A file is opened in append mode. Several worker processes may append to one file: each batch is
written in pieces that end at a line's end (at most ``PIPE_BUF`` bytes to a pipe, whose writes
that size are atomic), and with rotation on, the processes take an advisory lock on
``<file>.lock`` to rotate and write, and a process whose file was renamed under it (by another
worker, or by logrotate) opens the path again.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import select
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

log = logging.getLogger("apigate.access_log")

STDOUT: Final = None
# Largest piece of a batch written at once to a regular file; pipes get PIPE_BUF (atomic writes).
FILE_PIECE: Final = 1 << 20
PIPE_PIECE: Final = select.PIPE_BUF
WAIT_WRITABLE: Final = 1.0  # a non-blocking output that is full is polled this often


@dataclass(frozen=True, slots=True)
class Destination:
    """Where lines go: ``path`` None is stdout; a file rotates when ``max_bytes`` or ``every``
    (seconds, each UTC boundary of it) says so, keeping ``keep`` rotated files."""

    path: str | None = STDOUT
    max_bytes: int | None = None
    every: float | None = None
    keep: int = 7

    @property
    def rotates(self) -> bool:
        return self.path is not None and (self.max_bytes is not None or self.every is not None)


class Sink:
    """The writer thread's end of a destination: opens it on first use, follows its path when
    the file is renamed, rotates it. Used by one thread only."""

    def __init__(self, destination: Destination, clock: Callable[[], float] = time.time) -> None:
        self.destination = destination
        self.clock = clock
        self.fd = -1
        self.identity: tuple[int, int] | None = None
        self.regular = False
        self.period = 0
        self.lock_fd = -1
        self.written_lines = 0  # of the current ``write`` call, so a failure knows what was lost

    def write(self, lines: list[bytes]) -> None:
        """Write ``lines`` whole, rotating first or between them when due; raises OSError."""
        self.written_lines = 0
        with self._locked():
            fd = self._current()
            max_bytes = self.destination.max_bytes if self.regular else None
            rotating = self.regular and (max_bytes is not None or self.destination.every is not None)
            size = os.fstat(fd).st_size if rotating else 0
            if self._period_passed():
                if size:
                    fd = self._rotate()
                    size = 0
                else:  # nothing of the past period to keep apart
                    self.period = self._period_at(self.clock())
            piece_limit = FILE_PIECE if self.regular else PIPE_PIECE
            total = sum(map(len, lines))
            if total <= piece_limit and (max_bytes is None or size + total <= max_bytes):
                # The usual batch: one write, and no Python loop over its lines (the thread holds
                # the GIL for as little as it can: the event loop needs it).
                self._put(fd, lines)
                return
            piece: list[bytes] = []
            piece_size = 0
            for line in lines:
                length = len(line)
                if max_bytes is not None and size + piece_size + length > max_bytes and size + piece_size:
                    self._put(fd, piece)
                    piece, piece_size = [], 0
                    fd = self._rotate()
                    size = 0
                elif piece and piece_size + length > piece_limit:
                    self._put(fd, piece)
                    size += piece_size
                    piece, piece_size = [], 0
                piece.append(line)
                piece_size += length
            self._put(fd, piece)

    def close(self) -> None:
        self._close_file()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1

    # -- the file ---------------------------------------------------------------------------------
    def _current(self) -> int:
        """The open output; a file renamed or removed under it is opened again at its path."""
        path = self.destination.path
        if path is None:
            if self.fd < 0:
                self.fd = 1
                self.regular = stat.S_ISREG(os.fstat(1).st_mode)
            return self.fd
        if self.fd >= 0:
            try:
                found = os.stat(path)
                if (found.st_dev, found.st_ino) == self.identity:
                    return self.fd
            except FileNotFoundError:
                pass
            self._close_file()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        info = os.fstat(fd)
        self.fd = fd
        self.identity = (info.st_dev, info.st_ino)
        self.regular = stat.S_ISREG(info.st_mode)
        # A file that already holds lines belongs to the period of its last write.
        self.period = self._period_at(info.st_mtime if info.st_size else self.clock())
        return fd

    def _close_file(self) -> None:
        if self.fd > 2:
            os.close(self.fd)
        self.fd = -1
        self.identity = None

    def _put(self, fd: int, piece: list[bytes]) -> None:
        if not piece:
            return
        view = memoryview(b"".join(piece))
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:  # a non-blocking stdout that is full
                select.select([], [fd], [], WAIT_WRITABLE)
        self.written_lines += len(piece)

    # -- rotation ---------------------------------------------------------------------------------
    def _period_at(self, moment: float) -> int:
        every = self.destination.every
        return int(moment // every) if every else 0

    def _period_passed(self) -> bool:
        return self.destination.every is not None and self._period_at(self.clock()) != self.period

    def _rotate(self) -> int:
        """Rename the file to its dated name, open a new one, delete the oldest beyond ``keep``."""
        path = self.destination.path
        assert path is not None
        now = self.clock()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        os.rename(path, _free_name(f"{path}.{stamp}"))
        self._close_file()
        fd = self._current()
        self.period = self._period_at(now)
        self._prune(path)
        return fd

    def _prune(self, path: str) -> None:
        directory, base = os.path.split(path)
        rotated = re.compile(re.escape(base) + r"\.\d{8}T\d{6}\.\d{3}Z(-\d{3})?")
        names = sorted(name for name in os.listdir(directory or ".") if rotated.fullmatch(name))
        for name in names[: max(0, len(names) - self.destination.keep)]:
            with contextlib.suppress(FileNotFoundError):  # another worker deleted it first
                os.remove(os.path.join(directory, name))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """With rotation on, the processes that share the file rotate and write one at a time."""
        if not self.destination.rotates:
            yield
            return
        if self.lock_fd < 0:
            self.lock_fd = os.open(
                f"{self.destination.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640
            )
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)


class LogWriter:
    """The bounded queue and the thread that empties it every ``flush_interval`` seconds, or as
    soon as a batch is queued."""

    def __init__(
        self,
        destination: Destination,
        buffer: int,
        flush_interval: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.queue: deque[bytes] = deque()
        self.destination = destination
        self.clock = clock
        self.configure(destination, buffer, flush_interval)
        self.overflowed = 0  # lines refused because the queue was full (counted on the loop)
        self.lost = 0  # lines the output refused (counted by the thread)
        self.written = 0  # counted by the thread
        self.error: OSError | None = None  # the output's last failure, until a write succeeds
        self.wake = threading.Event()
        self.stopping = False
        self.thread: threading.Thread | None = None

    def configure(self, destination: Destination, buffer: int, flush_interval: float) -> None:
        """New settings (a reload): the thread moves to a new destination before its next batch."""
        self.destination = destination
        self.limit = buffer
        self.batch = max(1, min(8192, buffer // 4))  # (fewer, larger batches: fewer GIL handovers)
        self.flush_interval = flush_interval

    @property
    def dropped(self) -> int:
        """Lines that never reached the output: the queue was full, or the output failed."""
        return self.overflowed + self.lost

    def put(self, line: bytes) -> None:
        """Queue ``line`` (the event loop's side: never waits)."""
        queue = self.queue
        queued = len(queue)
        if queued >= self.limit:
            self.overflowed += 1
            return
        queue.append(line)
        if queued + 1 == self.batch:
            self.wake.set()

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="apigate-access-log", daemon=True)
            self.thread.start()

    def stop(self, timeout: float) -> bool:
        """Write what is queued and end the thread; False if it did not finish within ``timeout``
        (the output blocks): the thread is left behind, it holds no lock the process needs."""
        self.stopping = True
        self.wake.set()
        thread = self.thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _run(self) -> None:
        sink = Sink(self.destination, self.clock)
        try:
            while not self.stopping:
                self.wake.wait(self.flush_interval)
                self.wake.clear()
                sink = self._drain(sink)
            self._drain(sink)
        finally:
            sink.close()

    def _drain(self, sink: Sink) -> Sink:
        queue = self.queue
        while queue:
            if sink.destination != self.destination:
                sink.close()
                sink = Sink(self.destination, self.clock)
            lines = [queue.popleft() for _ in range(min(len(queue), self.batch))]
            try:
                sink.write(lines)
                self.error = None
            except OSError as exc:
                self.error = exc
                sink.close()  # opened again for the next batch
                self.lost += len(lines) - sink.written_lines
            self.written += sink.written_lines
        return sink


def _free_name(name: str) -> str:
    """``name``, or when files of that time exist (several rotations in one millisecond), the next
    sequence number after theirs, so that names keep sorting in the order they were made."""
    directory, base = os.path.split(name)
    taken = [entry for entry in os.listdir(directory or ".") if entry.startswith(base)]
    if not taken:
        return name
    numbers = [int(entry[len(base) + 1 :]) for entry in taken if entry[len(base) + 1 :].isdigit()]
    return f"{name}-{max(numbers, default=0) + 1:03d}"
