"""The access log's writing process: run as a script by the gateway (pipe.py starts one per worker),
it reads lines from stdin and writes them to stdout or to a file it rotates, so that no thread of
the gateway's holds its GIL or stalls in the kernel for the file system (a thread writing the
file cost the loop about a tenth of its requests per second in bench/run). It imports nothing
but the standard library.

A file is opened in append mode. Several workers' writers may append to one file: each batch is
written in pieces that end at a line's end (at most ``PIPE_BUF`` bytes to a pipe, whose writes
that size are atomic), and with rotation on, the writers take an advisory lock on
``<file>.lock`` to rotate and write, and a writer whose file was renamed under it (by another
writer, or by logrotate) opens the path again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import signal
import stat
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

STDOUT: Final = None
READ_SIZE: Final = 1 << 20  # the batch buffer's first size; a larger batch grows it
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

    def write(self, data: bytes | memoryview, lines: int) -> None:
        """Write ``data``, ``lines`` whole lines, without cutting a line, rotating first or
        between lines when due; raises OSError (``written_lines`` then says how many went)."""
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
            if len(data) <= piece_limit and (max_bytes is None or size + len(data) <= max_bytes):
                self._put(fd, data)  # the usual batch: one write, no look at its lines
                self.written_lines = lines
                return
            self._write_in_pieces(fd, data, lines, size, piece_limit, max_bytes)

    def _write_in_pieces(
        self,
        fd: int,
        batch: bytes | memoryview,
        lines: int,
        size: int,
        piece_limit: int,
        max_bytes: int | None,
    ) -> None:
        """Write ``batch`` in pieces of whole lines of at most ``piece_limit`` bytes (a longer line
        goes alone), rotating where the next line would take the file past ``max_bytes``."""
        data = bytes(batch)
        start = 0
        try:
            while start < len(data):
                room = piece_limit if max_bytes is None else min(piece_limit, max_bytes - size)
                end = data.rfind(b"\n", start, start + room) + 1 if room > 0 else 0
                if end <= start:  # the next line does not fit
                    line_end = data.find(b"\n", start) + 1 or len(data)
                    if max_bytes is not None and size and size + line_end - start > max_bytes:
                        fd = self._rotate()
                        size = 0
                        continue
                    end = line_end  # longer than a piece, or than a whole file: written alone
                self._put(fd, data[start:end])
                size += end - start
                start = end
        except OSError:
            self.written_lines = lines - data.count(b"\n", start)
            raise
        self.written_lines = lines

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

    def _put(self, fd: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:  # a non-blocking stdout that is full
                select.select([], [fd], [], WAIT_WRITABLE)

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


def _free_name(name: str) -> str:
    """``name``, or when files of that time exist (several rotations in one millisecond), the next
    sequence number after theirs, so that names keep sorting in the order they were made."""
    directory, base = os.path.split(name)
    taken = [entry for entry in os.listdir(directory or ".") if entry.startswith(base)]
    if not taken:
        return name
    numbers = [int(entry[len(base) + 1 :]) for entry in taken if entry[len(base) + 1 :].isdigit()]
    return f"{name}-{max(numbers, default=0) + 1:03d}"


# -- the writing process ------------------------------------------------------------------------------
# What the gateway sends: batches, each a header (its length in bytes and its number of lines,
# unsigned 32-bit little-endian) and the lines. The header spares this process a look at every
# byte to count the lines it writes, and the batches are read into one reused buffer: counting
# and a fresh megabyte per read cost this process more than the gateway spent sending the lines.
BATCH_HEADER: Final = struct.Struct("<II")
MOST_BATCH_BYTES: Final = 1 << 30  # a header saying more is not the gateway's: the stream is broken


def main(status_fd: int, described: str) -> None:
    """Read batches from stdin until it closes, write them to the destination, and report
    "<written> <lost> <error>" after each write on ``status_fd`` (non-blocking: a report the
    gateway has not read yet is replaced by the next one). A batch cut short by the end of the
    input (the gateway ended while sending it) has its whole lines written and the rest counted lost."""
    path, max_bytes, every, keep = json.loads(described)
    sink = Sink(Destination(path, max_bytes, every, keep))
    os.set_blocking(status_fd, False)
    written = lost = 0
    header = bytearray(BATCH_HEADER.size)
    buffer = bytearray(READ_SIZE)
    while _read_into(memoryview(header)) == len(header):
        size, lines = BATCH_HEADER.unpack(header)
        if size > MOST_BATCH_BYTES:
            raise SystemExit(f"access log: a batch header of {size} bytes; the input is not batches")
        if size > len(buffer):
            buffer = bytearray(size)
        view = memoryview(buffer)[:size]
        got = _read_into(view)
        whole = lines
        if got < size:  # the end of the input inside the batch
            view = view[: bytes(view[:got]).rfind(b"\n") + 1]
            whole = view.tobytes().count(b"\n")
        error = ""
        sink.written_lines = 0
        try:
            if whole:
                sink.write(view, whole)
        except OSError as exc:
            sink.close()  # opened again for the next batch
            error = str(exc)
        written += sink.written_lines
        lost += lines - sink.written_lines
        with contextlib.suppress(OSError):
            os.write(status_fd, f"{written} {lost} {error}\n".encode())
        if got < size:
            break
    sink.close()


def _read_into(view: memoryview) -> int:
    """Fill ``view`` from stdin; fewer bytes only at the end of the input."""
    got = 0
    while got < len(view):
        count = os.readv(0, [view[got:]])
        if not count:
            break
        got += count
    return got


if __name__ == "__main__":
    # A stop signal to the gateway's whole process group (systemd's default, a Ctrl-C) is the
    # worker's to act on: this process ends once its input ends, having written what it was sent.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.SIG_IGN)
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:  # (Linux: named in ps)
        comm.write("apigate-log")
    main(int(sys.argv[1]), sys.argv[2])
