"""The worker's end of span export: finished spans wait in a bounded queue, and a thread sends
them in frames to the exporting process (otlp.py, run as a program), which encodes, batches
and sends them. In the worker, a span costs a tuple and a queue append on the loop and a share
of one ``orjson.dumps`` on the sending thread.

A frame is a 4-byte length and a JSON list of spans. When the exporting process cannot keep up,
the queue fills and further spans are dropped and counted; when it ends, the spans it had not
sent are counted dropped and a new one is started (at most one a second).
"""

from __future__ import annotations

import contextlib
import logging
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any, Final, Literal

import orjson

if TYPE_CHECKING:
    from apigate.config.tracing import ExportConfig

log = logging.getLogger("apigate.tracing")

FRAME_HEADER: Final = struct.Struct("<I")  # the frame's payload length
MOST_FRAME_BYTES: Final = 256 << 20
SEND_EVERY: Final = 0.5  # seconds between frames (each wake of the thread takes the GIL from the loop)
SEND_AT: Final = 1024  # queued spans that wake the sending thread sooner (half a smaller queue)
WAIT_RESPAWN: Final = 1.0  # seconds between starts of an exporting process that keeps ending
COMMAND: Final = (sys.executable, "-m", "apigate.observe.otlp")

Kind = Literal["server", "client"]
# A span attribute's value, as OTLP's AnyValue holds it (otlpwire.py encodes these).
AttributeValue = str | bool | int | float | Sequence[str]


class SpanProcess:
    """One export configuration: the queue, the sending thread and the exporting process.
    ``emit`` is called on the event loop; ``close`` blocks (call it off the loop)."""

    def __init__(self, settings: ExportConfig, command: tuple[str, ...] = COMMAND) -> None:
        self.settings = settings
        self.command = command
        self.capacity = settings.batch.max_queue_size
        self.send_at = max(1, min(SEND_AT, self.capacity // 2))  # (a small queue is not left to fill)
        self.queue: deque[tuple[Any, ...]] = deque()
        self.wake = threading.Event()
        self.closing = False
        self.process: _ExportingProcess | None = None
        self.last_spawn = -WAIT_RESPAWN
        self.refused = 0  # on the loop: the queue was full (or closed)
        self.unsent = 0  # on the sending thread: no exporting process took them
        self.ended = (0, 0, 0)  # (exported, failed, dropped) of exporting processes that ended
        self.counting = threading.Lock()  # (a process's counts move to ``ended`` in one step)
        self.sender = threading.Thread(target=self._send, name="apigate-spans-send", daemon=True)
        self.sender.start()

    def emit(
        self,
        name: str,
        kind: Kind,
        ids: tuple[bytes, bytes, bytes | None],
        remote_parent: bool,
        times: tuple[int, int],
        attributes: Mapping[str, AttributeValue],
        error: str | None = None,
    ) -> None:
        """Queue a finished span: ``ids`` are (trace, span, parent or None) in hex, ``times``
        (start, end) in nanoseconds since the epoch, ``error`` the description of an ERROR status."""
        queue = self.queue
        if len(queue) >= self.capacity or self.closing:
            self.refused += 1
            return
        trace_id, span_id, parent_id = ids
        hex_ids = (trace_id.decode(), span_id.decode(), parent_id.decode() if parent_id else None)
        queue.append((name, kind, hex_ids, remote_parent, times, attributes, error))
        if len(queue) == self.send_at:
            self.wake.set()

    def counts(self) -> tuple[int, int, int]:
        """(exported, failed, dropped) spans, of every exporting process this one started."""
        with self.counting:
            exported, failed, dropped = self.ended
            process = self.process
            if process is not None:
                exported += process.exported
                failed += process.failed
                dropped += process.dropped
        return exported, failed, dropped + self.refused + self.unsent

    def close(self, timeout: float) -> bool:
        """Send what is queued, let the exporting process send it on and end; after ``timeout``
        seconds it is killed. True if it ended in time."""
        deadline = time.monotonic() + timeout
        self.closing = True
        self.wake.set()
        self.sender.join(timeout)
        process = self.process
        if process is None:
            return not self.sender.is_alive()
        if self.sender.is_alive():  # stuck writing to a process that does not read: ended
            process.child.kill()
            self.sender.join()
        ended = process.finish(max(0.0, deadline - time.monotonic()))
        self._let_go(process)
        return ended

    # -- the sending thread ---------------------------------------------------------------------------
    def _send(self) -> None:
        queue = self.queue
        while True:
            self.wake.wait(SEND_EVERY)
            self.wake.clear()
            closing = self.closing  # (read before the queue is emptied: nothing is queued after)
            spans = [queue.popleft() for _ in range(len(queue))]
            if spans:
                self._write(spans)
            if closing:
                return

    def _write(self, spans: list[tuple[Any, ...]]) -> None:
        process = self.process
        if process is not None and not process.running():
            self._let_go(process)
            process = None
        if process is None:
            process = self._spawn()
        if process is None:
            self.unsent += len(spans)
            return
        payload = orjson.dumps(spans)
        if not process.write(FRAME_HEADER.pack(len(payload)) + payload, len(spans)):
            self._let_go(process)
            self.unsent += len(spans)

    def _spawn(self) -> _ExportingProcess | None:
        now = time.monotonic()
        if now - self.last_spawn < WAIT_RESPAWN:
            return None
        self.last_spawn = now
        try:
            process = _ExportingProcess(self.command)
        except OSError as exc:
            log.error("trace export: could not start the exporting process: %s", exc)
            return None
        settings = self.settings.model_dump_json().encode()
        if not process.write(FRAME_HEADER.pack(len(settings)) + settings, 0):
            process.finish(0.0)
            return None
        self.process = process
        return process

    def _let_go(self, process: _ExportingProcess) -> None:
        """An exporting process that ended, or whose input broke: it is waited for (a second at
        most), its counts join the totals, and the spans it was sent and did not report on count
        as dropped."""
        process.finish(1.0)
        with self.counting:
            if self.process is not process:
                return  # (let go already)
            exported, failed, dropped = self.ended
            self.ended = (
                exported + process.exported,
                failed + process.failed,
                dropped + process.dropped + process.unreported,
            )
            self.process = None


class _ExportingProcess:
    """A running ``python -m apigate.observe.otlp``: its input, and the counts it reports."""

    def __init__(self, command: tuple[str, ...]) -> None:
        self.child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        self.input: IO[bytes] = self.child.stdin  # type: ignore[assignment]
        self.sent = 0  # spans written to its input
        self.exported = 0
        self.failed = 0
        self.dropped = 0
        self.reader = threading.Thread(target=self._read_reports, name="apigate-spans-counts", daemon=True)
        self.reader.start()

    @property
    def unreported(self) -> int:
        return max(0, self.sent - self.exported - self.failed - self.dropped)

    def running(self) -> bool:
        return self.child.poll() is None and not self.input.closed

    def write(self, frame: bytes, spans: int) -> bool:
        """Write a frame (blocking: on the sending thread); False if the process is gone."""
        try:
            self.input.write(frame)
            self.input.flush()
        except (OSError, ValueError):  # (a broken pipe; ValueError: the input was closed)
            return False
        self.sent += spans
        return True

    def finish(self, timeout: float) -> bool:
        """Close its input (it sends what it holds and ends) and wait up to ``timeout`` seconds
        before killing it; take its last report. True if it ended on its own."""
        with contextlib.suppress(OSError, ValueError):
            self.input.close()
        try:
            self.child.wait(timeout)
            ended = True
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()
            ended = False
        self.reader.join()
        return ended

    def _read_reports(self) -> None:
        """Its "<exported> <failed> <dropped>" lines, until its output ends."""
        output: IO[bytes] = self.child.stdout  # type: ignore[assignment]
        with output:
            for line in output:
                with contextlib.suppress(ValueError):
                    self.exported, self.failed, self.dropped = (int(n) for n in line.split())
