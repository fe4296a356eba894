"""The access log's end on the event loop: lines gather in a compiled ``LineBuffer`` and go, in
batches with one non-blocking ``write`` each, to a pipe read by the writing process (writer.py).

When the output cannot keep up (a full disk, a pipe nobody reads), the pipe fills, the lines
that do not fit wait in a bounded backlog, and the ones after that are dropped and counted;
nothing queues without bound and the loop never waits for the output.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import subprocess
import sys
import time
from typing import Final

from apigate.observe.accesslog import writer
from apigate.observe.accesslog.hotpath import LineBuffer
from apigate.observe.accesslog.writer import BATCH_HEADER, Destination

log = logging.getLogger("apigate.access_log")

BATCH: Final = 256  # lines per write into the pipe, at most
PIPE_SIZE: Final = 1 << 20  # what the pipe holds: about 2,500 lines of 400 bytes
F_SETPIPE_SZ: Final = 1031  # (fcntl.F_SETPIPE_SZ, Linux; named in fcntl only from Python 3.10)
WAIT_RESPAWN: Final = 1.0  # seconds between starts of a writing process that keeps ending
_SCRIPT: Final = os.path.abspath(writer.__file__)


class LogPipe:
    """The loop's end: the buffer the finish hook fills, the pipe to the writing process, and the
    counts (``written`` and ``lost`` as that process last reported them)."""

    def __init__(self, destination: Destination, buffer: int, flush_interval: float) -> None:
        self.lines = LineBuffer(1, self._send)
        self.configure(destination, buffer, flush_interval)
        self.process: _WritingProcess | None = None
        self.retired: list[_WritingProcess] = []  # earlier outputs' processes, finishing
        self.backlog: list[tuple[bytes, int]] = []  # batches' lines (and how many) waiting for the pipe
        self.backlog_lines = 0
        self.partial = b""  # the rest of a batch the pipe took in part (its lines counted sent)
        self.overflowed = 0  # lines refused on the loop: the pipe and the buffer were full
        self.started = False
        self.waiting = False  # the loop watches the pipe for room
        self.last_spawn = -WAIT_RESPAWN
        self.ended_written = 0  # counts of the processes that ended and were let go
        self.ended_lost = 0

    def configure(self, destination: Destination, buffer: int, flush_interval: float) -> None:
        """New settings (a reload): a new output gets a new writing process; the old one writes
        what it was sent and ends."""
        self.destination = destination
        self.limit = buffer
        self.lines.batch = max(1, min(BATCH, buffer // 4))
        self.flush_interval = flush_interval
        process = getattr(self, "process", None)
        if process is not None and process.destination != destination:
            self._retire()
            self.last_spawn = -WAIT_RESPAWN  # (the new output's process starts with the next batch)

    @property
    def written(self) -> int:
        return self.ended_written + sum(process.written for process in self._processes())

    @property
    def lost(self) -> int:
        """Lines the output refused (a failed write), as the writing processes reported them."""
        return self.ended_lost + sum(process.lost for process in self._processes())

    @property
    def dropped(self) -> int:
        """Lines that never reached the output: no room on the way to it, or it failed."""
        return self.overflowed + self.lost

    @property
    def error(self) -> str | None:
        """The output's last failure, until a write succeeds."""
        return self.process.error if self.process is not None else None

    @property
    def unwritten(self) -> int:
        """Lines handed over and not yet written or lost."""
        waiting = len(self.lines) + self.backlog_lines
        return waiting + sum(process.in_flight for process in self._processes())

    def start(self) -> None:
        """Start writing (on the running event loop): lines put before this waited in the buffer."""
        self.started = True
        self.flush()

    def flush(self) -> None:
        """Send what the buffer holds; the owner calls this every ``flush_interval``."""
        for process in self._processes():
            process.read_status()
        for process in [p for p in self.retired if p.child.poll() is not None]:
            process.close()  # (its counts stay: they are part of the totals)
            self.ended_written += process.written
            self.ended_lost += process.lost + process.in_flight
            self.retired.remove(process)
        lines, count = self.lines.take()
        if count or self.backlog or self.partial:
            self._send(lines, count)

    async def stop(self, timeout: float) -> int:
        """Send what is left and wait up to ``timeout`` for the writing processes to write it and
        end (past it, the output blocks: they are killed). The lines not written: 0 normally."""
        deadline = time.monotonic() + timeout
        self.flush()
        while (self.backlog or self.partial) and time.monotonic() < deadline and self._running():
            await asyncio.sleep(0.01)  # (the pipe is full: the process is writing)
            self._drain()
        self._unwatch()
        waiting = self.backlog_lines  # (what the pipe had no room for)
        self.backlog_lines, self.backlog, self.partial = 0, [], b""
        self.overflowed += waiting
        self._retire()
        for process in self.retired:
            await process.finish(deadline - time.monotonic())
            process.close()
        unwritten = waiting + sum(process.in_flight for process in self.retired)
        for process in self.retired:  # killed with lines in its pipe: those are lost
            process.lost += process.in_flight
        return unwritten

    def _running(self) -> bool:
        return self.process is not None and self.process.running()

    # -- the pipe ---------------------------------------------------------------------------------
    def _send(self, lines: bytes, count: int) -> None:
        """Queue ``lines`` (``count`` of them) as one batch after what is waiting (up to ``limit``
        lines wait, or one batch whatever its size; the rest are dropped and counted) and write
        what the pipe has room for."""
        if self.backlog and self._running():
            self._drain()  # (the pipe may have room that the loop has not been told of yet)
        if self.backlog and self.backlog_lines + count > self.limit:
            self.overflowed += count
        elif count:
            self.backlog.append((lines, count))
            self.backlog_lines += count
        if not self.started:
            return
        if not self._running():
            self._spawn()
        if self._running():
            self._drain()

    def _drain(self) -> bool:
        """Write what waits, oldest first; True when nothing does any more. When the pipe is full
        the loop watches it and comes back."""
        process = self.process
        while process is not None and (self.partial or self.backlog):
            begun = bool(self.partial)
            if begun:
                data, lines, header = self.partial, 0, b""
            else:  # (the header goes with the lines in one writev: no copy of the batch to join them)
                data, lines = self.backlog[0]
                header = BATCH_HEADER.pack(len(data), lines)
            try:
                done = os.writev(process.pipe, (header, data)) if process.pipe_open else -1
            except BlockingIOError:
                done = 0
            except OSError:
                done = -1
            if done < 0:  # it ended: what it was sent is lost; the waiting batches go to the next
                self._unwatch()
                process.gone()
                self.partial = b""
                return False
            if done and not begun:
                self.backlog.pop(0)
                self.backlog_lines -= lines
                process.sent += lines
            if done < len(header) + len(data):
                if done:
                    self.partial = (header + data)[done:]
                self._watch()
                return False
            self.partial = b""
        self._unwatch()
        return True

    def _watch(self) -> None:
        if not self.waiting and self._running():
            assert self.process is not None
            asyncio.get_running_loop().add_writer(self.process.pipe, self._writable)
            self.waiting = True

    def _unwatch(self) -> None:
        if self.waiting and self.process is not None:
            asyncio.get_running_loop().remove_writer(self.process.pipe)
        self.waiting = False

    def _writable(self) -> None:
        self._drain()

    # -- the writing processes --------------------------------------------------------------------
    def _spawn(self) -> None:
        now = time.monotonic()
        if now - self.last_spawn < WAIT_RESPAWN:
            return  # (a process that keeps dying is not restarted in a loop)
        self.last_spawn = now
        if self.process is not None:
            self._retire()
        self._unwatch()
        self.partial = b""  # (the batch's start went to the process that ended: it counts it lost)
        try:
            self.process = _WritingProcess(self.destination)
        except OSError as exc:
            log.warning("access log: cannot start the writing process: %s", exc)

    def _retire(self) -> None:
        self._unwatch()
        if self.process is not None:
            self.process.close_pipe()
            self.retired.append(self.process)
            self.process = None

    def _processes(self) -> list[_WritingProcess]:
        current = [self.process] if self.process is not None else []
        return [*self.retired, *current]


class _WritingProcess:
    """A running ``python writer.py``: its pipe, and the counts it reports on its status pipe."""

    def __init__(self, destination: Destination) -> None:
        self.destination = destination
        read_end, self.pipe = os.pipe2(os.O_CLOEXEC)
        status_read, status_write = os.pipe2(os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError):  # a larger pipe holds a burst (Linux; best effort)
                fcntl.fcntl(self.pipe, F_SETPIPE_SZ, PIPE_SIZE)
            self.child = subprocess.Popen(
                # -I: the process imports nothing but the standard library (no site, no path).
                [sys.executable, "-I", _SCRIPT, str(status_write), _describe(destination)],
                stdin=read_end,
                pass_fds=(status_write,),
                close_fds=True,
            )
        except BaseException:
            for fd in (read_end, self.pipe, status_read, status_write):
                os.close(fd)
            raise
        os.close(read_end)
        os.close(status_write)
        os.set_blocking(self.pipe, False)
        os.set_blocking(status_read, False)
        self.status = status_read
        self.sent = 0  # lines of the batches written into the pipe, in whole or in part
        self.written = 0
        self.lost = 0
        self.error: str | None = None
        self.status_rest = b""
        self.pipe_open = True

    @property
    def in_flight(self) -> int:
        return max(0, self.sent - self.written - self.lost)

    def running(self) -> bool:
        return self.pipe_open and self.child.poll() is None

    def gone(self) -> None:
        """The pipe broke: the process ended; what it had not written is lost."""
        self.read_status()
        self.lost += self.in_flight
        self.sent = self.written + self.lost
        self.close_pipe()

    def read_status(self) -> None:
        """Take the process's latest report: "<written> <lost> <error>" lines."""
        if self.status < 0:
            return
        chunks = [self.status_rest]
        while True:
            try:
                chunk = os.read(self.status, 65536)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        data = b"".join(chunks)
        complete, _, self.status_rest = data.rpartition(b"\n")
        if complete:
            written, lost, error = complete.rsplit(b"\n", 1)[-1].split(b" ", 2)
            self.written, self.lost = int(written), int(lost)
            self.error = error.decode() or None

    def close_pipe(self) -> None:
        if self.pipe_open:
            self.pipe_open = False
            os.close(self.pipe)  # the process writes what it has and ends

    async def finish(self, timeout: float) -> bool:
        """Wait for the process to end (it was sent everything); kill it after ``timeout``."""
        self.close_pipe()
        deadline = time.monotonic() + max(0.0, timeout)
        while self.child.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        ended = self.child.poll() is not None
        if not ended:
            self.child.kill()
            await asyncio.to_thread(self.child.wait)
        self.read_status()
        return ended

    def close(self) -> None:
        """Let go of an ended process's status pipe (after a last look at it)."""
        if self.status >= 0:
            self.read_status()
            os.close(self.status)
            self.status = -1


def _describe(destination: Destination) -> str:
    return json.dumps([destination.path, destination.max_bytes, destination.every, destination.keep])
