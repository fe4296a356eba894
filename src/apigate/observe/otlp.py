"""The exporting process (``python -m apigate.observe.otlp``), which a gateway worker starts once
``tracing.export`` is set (spanprocess.py): it reads the worker's span records, encodes them as
OTLP protobuf (otlpwire.py) and POSTs them in batches to the collector (OTLP/HTTP,
https://opentelemetry.io/docs/specs/otlp/#otlphttp), reporting how they fared.

Its own process, because encoding spans in the worker held the interpreter lock for whole switch
intervals, which the event loop waited out (a p99 of 12-18 ms with 1 % of requests traced, from
1.6 ms); encoded by hand, because the OpenTelemetry SDK's ~45 µs of CPU a span, spent next to the
gateway on its cores, cost ~6 % of its requests/s at that ratio (otlpwire.py).

Batching follows the SDK's batch span processor and its settings (``tracing.export.batch``): a
bounded queue (further spans are dropped and counted), a send once ``max_export_batch_size``
spans wait or ``schedule_delay`` has passed. A send that fails on a connection or with 429, 502,
503 or 504 is retried after 1, 2, 4... seconds (or the answer's Retry-After) within ``timeout``;
any other answer fails the batch. The environment variables of the OTLP exporter configuration
that apply to this transport are read: ``OTEL_EXPORTER_OTLP_[TRACES_]COMPRESSION`` (gzip),
``OTEL_EXPORTER_OTLP_[TRACES_]CERTIFICATE`` (the CA file for https) and
``OTEL_RESOURCE_ATTRIBUTES``.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import logging
import os
import signal
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, BinaryIO, Final
from urllib.parse import unquote, urlsplit

import orjson

from apigate import __version__
from apigate.config.tracing import ExportConfig
from apigate.observe.otlpwire import SpanEncoder
from apigate.observe.spanprocess import FRAME_HEADER, MOST_FRAME_BYTES

log = logging.getLogger("apigate.tracing")

REPORT_EVERY: Final = 1.0  # seconds between reports of changed counts to the worker
RETRYABLE: Final = frozenset({429, 502, 503, 504})  # OTLP/HTTP: "retryable response codes"
FIRST_BACKOFF: Final = 1.0


class Collector:
    """The collector's endpoint: one kept-alive connection, a POST per batch."""

    def __init__(
        self,
        settings: ExportConfig,
        environ: Mapping[str, str],
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        url = urlsplit(settings.endpoint)
        self.https = url.scheme == "https"
        self.host = url.hostname or ""
        self.port = url.port or (443 if self.https else 80)
        self.path = url.path or "/"
        self.timeout = settings.timeout
        self.headers = {
            **settings.headers,
            "content-type": "application/x-protobuf",
            "user-agent": f"apigate/{__version__}",
        }
        self.gzip = _setting(environ, "COMPRESSION").lower() == "gzip"
        if self.gzip:
            self.headers["content-encoding"] = "gzip"
        certificate = _setting(environ, "CERTIFICATE")
        self.context = ssl.create_default_context(cafile=certificate or None) if self.https else None
        self.sleep = sleep
        self.clock = clock
        self.connection: http.client.HTTPConnection | None = None

    def send(self, body: bytes) -> bool:
        """POST one export request, retried as the OTLP specification says within ``timeout``;
        True when the collector took it (2xx)."""
        if self.gzip:
            body = gzip.compress(body)
        deadline = self.clock() + self.timeout
        backoff = FIRST_BACKOFF
        while True:
            reused = self.connection is not None
            try:
                status, retry_after = self._post(body, max(0.001, deadline - self.clock()))
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if reused:  # closed by the collector while idle (keep-alive): a new one, at once
                    continue
                status, retry_after, why = None, None, f"{type(exc).__name__}: {exc}"
            else:
                if 200 <= status < 300:
                    return True
                why = f"the collector answered {status}"
                if status not in RETRYABLE:
                    log.warning("trace export: %s; the batch is not retried", why)
                    return False
            wait = retry_after if retry_after is not None else backoff
            if self.clock() + wait >= deadline:
                log.warning("trace export failed within %.0fs: %s", self.timeout, why)
                return False
            self.sleep(wait)
            backoff *= 2

    def _post(self, body: bytes, timeout: float) -> tuple[int, float | None]:
        connection = self.connection
        if connection is None:
            if self.context is not None:
                connection = http.client.HTTPSConnection(self.host, self.port, context=self.context)
            else:
                connection = http.client.HTTPConnection(self.host, self.port)
            self.connection = connection
        connection.timeout = timeout
        if connection.sock is not None:
            connection.sock.settimeout(timeout)
        connection.request("POST", self.path, body=body, headers=self.headers)
        response = connection.getresponse()
        response.read()  # (all of it: the connection serves the next batch)
        if response.will_close:
            self.close()
        return response.status, _seconds(response.getheader("retry-after"))

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


class Exporter:
    """The queue of encoded spans between the reading thread (``add``) and the sending one
    (``run``), and the counts; ``report`` writes "<exported> <failed> <dropped>" lines."""

    def __init__(
        self,
        settings: ExportConfig,
        encoder: SpanEncoder,
        send: Callable[[bytes], bool],
        report: BinaryIO,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        batch = settings.batch
        self.capacity = batch.max_queue_size
        self.batch_size = batch.max_export_batch_size
        self.delay = batch.schedule_delay
        self.encoder = encoder
        self.send = send
        self.report = report
        self.clock = clock
        self.queue: deque[bytes] = deque()
        self.ready = threading.Condition()
        self.closing = False
        self.exported = self.failed = self.dropped = 0
        self.reported = (0, 0, 0)

    def add(self, sent: Sequence[Any]) -> None:
        """Queue a span record as the worker sent it (otlpwire.py's ``SpanEncoder.span``)."""
        with self.ready:
            if len(self.queue) >= self.capacity:
                self.dropped += 1
                return
        encoded = self.encoder.span(sent)
        with self.ready:
            self.queue.append(encoded)
            if len(self.queue) == self.batch_size:
                self.ready.notify()

    def close(self) -> None:
        """No more spans: what is queued is sent, then ``run`` returns."""
        with self.ready:
            self.closing = True
            self.ready.notify()

    def run(self) -> None:
        """Send batches until closed and emptied; report changed counts at least every second."""
        next_send = self.clock() + self.delay
        while True:
            with self.ready:
                now = self.clock()
                if not (self.closing or len(self.queue) >= self.batch_size or now >= next_send):
                    self.ready.wait(max(0.0, min(REPORT_EVERY, next_send - now)))
                due = self.closing or len(self.queue) >= self.batch_size or self.clock() >= next_send
                taken = min(len(self.queue), self.batch_size) if due else 0
                batch = [self.queue.popleft() for _ in range(taken)]
                finished = self.closing and not self.queue
            if due:
                next_send = self.clock() + self.delay
            if batch:
                if self.send(self.encoder.request(batch)):
                    self.exported += len(batch)
                else:
                    self.failed += len(batch)
            self.send_counts()
            if finished:
                return

    def send_counts(self) -> None:
        counts = (self.exported, self.failed, self.dropped)
        if counts != self.reported:
            self.reported = counts
            with contextlib.suppress(OSError):  # (the worker is gone: nobody reads them)
                self.report.write(b"%d %d %d\n" % counts)
                self.report.flush()


def resource_attributes(settings: ExportConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """``OTEL_RESOURCE_ATTRIBUTES`` (key=value pairs, comma-separated, values percent-encoded),
    then ``service.name`` from the config, which wins."""
    found: dict[str, str] = {}
    for pair in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, equals, value = pair.partition("=")
        if equals and key.strip():
            found[key.strip()] = unquote(value.strip())
    found["service.name"] = settings.service_name
    return found


def main(source: BinaryIO, report: BinaryIO, environ: Mapping[str, str]) -> None:
    """The first frame on ``source`` is the export's settings (not argv, which any local user can
    read), each later one a list of span records; at its end, what is queued is sent and the
    process ends."""
    described = _read_frame(source)
    if described is None:
        return  # (the worker ended before it said what to do)
    settings = ExportConfig.model_validate_json(described)
    encoder = SpanEncoder(resource_attributes(settings, environ), "apigate", __version__)
    collector = Collector(settings, environ)
    exporter = Exporter(settings, encoder, collector.send, report)
    sender = threading.Thread(target=exporter.run, name="apigate-spans-send", daemon=True)
    sender.start()
    while (frame := _read_frame(source)) is not None:
        for span in orjson.loads(frame):
            exporter.add(span)
    exporter.close()
    sender.join()
    collector.close()


def _setting(environ: Mapping[str, str], name: str) -> str:
    """An OTLP exporter variable: the traces-only one first (OTEL_EXPORTER_OTLP_TRACES_<name>)."""
    value = environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or environ.get(f"OTEL_EXPORTER_OTLP_{name}")
    return (value or "").strip()


def _seconds(retry_after: str | None) -> float | None:
    """A Retry-After of delay-seconds (RFC 9110 §10.2.3); an HTTP-date is left to the backoff."""
    if retry_after is None or not retry_after.strip().isdigit():
        return None
    return float(retry_after.strip())


def _read_frame(source: BinaryIO) -> bytes | None:
    """The next frame's payload; None at the end of the input (a frame cut short included)."""
    header = source.read(FRAME_HEADER.size)
    if len(header) < FRAME_HEADER.size:
        return None
    (size,) = FRAME_HEADER.unpack(header)
    if size > MOST_FRAME_BYTES:
        raise SystemExit(f"span export: a frame of {size} bytes; the input is not frames")
    payload = source.read(size)
    return payload if len(payload) == size else None


if __name__ == "__main__":
    # A stop signal to the gateway's whole process group (systemd's default, a Ctrl-C) is the
    # worker's to act on: this process ends once its input ends, having sent what it holds.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.SIG_IGN)
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:  # (Linux: named in ps)
        comm.write("apigate-spans")
    # Idle scheduling class (Linux): woken by its worker's frames, it was put on the worker's
    # core and preempted it, costing more requests than its CPU time (tracing-1% in alternating
    # wrk runs: 0.82 of plain's requests/s with the default class, 0.94 with this one). Under CPU
    # saturation spans wait for idle time, and past the queue are dropped and counted.
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    main(sys.stdin.buffer, sys.stdout.buffer, os.environ)
