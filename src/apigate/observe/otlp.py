"""The OpenTelemetry SDK side of span export: the one module that imports the SDK (the ``otel``
extra). It runs as a program of its own, the exporting process (``python -m
apigate.observe.otlp``), which a gateway worker starts once ``tracing.export`` is set
(spanprocess.py): the SDK encodes spans in Python, and in the worker its export thread held the
interpreter lock for whole switch intervals, which the event loop waited out (a p99 of 12-18 ms
with 1 % of requests traced, from 1.6 ms).

Spans are built after the fact as the SDK's ``ReadableSpan``, with the ids the gateway already
sent on (in traceresponse, in the upstream's or a webhook destination's traceparent): no id
generator or sampler of the SDK takes part, so the exported ids are exactly those. The SDK's
``BatchSpanProcessor`` queues them, and its OTLP/HTTP exporter sends them in batches from the
processor's own thread.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any, BinaryIO, Final

import orjson
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from apigate import __version__
from apigate.config.tracing import ExportConfig
from apigate.observe.spanprocess import FRAME_HEADER, MOST_FRAME_BYTES

REPORT_EVERY: Final = 1.0  # seconds between reports of changed counts to the worker

_KINDS = {"server": SpanKind.SERVER, "client": SpanKind.CLIENT}
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)


class CountingExporter(SpanExporter):
    """Passes batches on, counting the spans it was handed and how their export ended (plain
    integers written by the processor's thread, read on the loop)."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self.handed = 0
        self.exported = 0
        self.failed = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.handed += len(spans)
        result = self.inner.export(spans)
        if result is SpanExportResult.SUCCESS:
            self.exported += len(spans)
        else:
            self.failed += len(spans)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class SpanPipeline:
    """One export configuration: an OTLP/HTTP exporter behind a batch processor."""

    def __init__(self, settings: ExportConfig) -> None:
        batch = settings.batch
        exporter = OTLPSpanExporter(
            endpoint=settings.endpoint, headers=dict(settings.headers), timeout=settings.timeout
        )
        self.exporter = CountingExporter(exporter)
        self.processor = BatchSpanProcessor(
            self.exporter,
            max_queue_size=batch.max_queue_size,
            schedule_delay_millis=batch.schedule_delay * 1000,
            max_export_batch_size=batch.max_export_batch_size,
            export_timeout_millis=settings.timeout * 1000,
        )
        self.resource = Resource.create({"service.name": settings.service_name})
        self.scope = InstrumentationScope("apigate", __version__)
        self.capacity = batch.max_queue_size
        self.queued = 0
        self.dropped = 0

    def add(self, sent: Sequence[Any]) -> None:
        """Queue a finished span as the worker sent it (spanprocess.py's ``SpanProcess.emit``):
        name, kind, (trace, span, parent or None) ids in hex, whether the parent is remote,
        (start, end) in nanoseconds since the epoch, attributes, the description of an ERROR
        status or None."""
        name, kind, ids, remote_parent, times, attributes, error = sent
        if self.queued - self.exporter.handed >= self.capacity:
            # Counted here: the SDK would drop it too, but log a warning for every span.
            self.dropped += 1
            return
        self.queued += 1
        trace_id, span_id, parent_id = ids
        trace = int(trace_id, 16)
        context = SpanContext(trace, int(span_id, 16), is_remote=False, trace_flags=_SAMPLED)
        parent = (
            None
            if parent_id is None
            else SpanContext(trace, int(parent_id, 16), is_remote=remote_parent, trace_flags=_SAMPLED)
        )
        span = ReadableSpan(
            name,
            context,
            parent,
            self.resource,
            attributes,
            kind=_KINDS[kind],
            status=_UNSET if error is None else Status(StatusCode.ERROR, error),
            start_time=times[0],
            end_time=times[1],
            instrumentation_scope=self.scope,
        )
        self.processor.on_end(span)

    def counts(self) -> tuple[int, int, int]:
        """(exported, failed, dropped) spans."""
        return self.exporter.exported, self.exporter.failed, self.dropped

    def close(self) -> None:
        """Send what is queued, then stop. Blocks: call it off the event loop."""
        self.processor.shutdown()


def main(source: BinaryIO, report: BinaryIO) -> None:
    """The exporting process: the first frame on ``source`` is the export's settings (not argv,
    which any local user can read), each later one a list of spans to emit; at its end, what is
    queued is sent and the process ends. "<exported> <failed> <dropped>" lines on ``report`` say
    how the spans fared, whenever that changed."""
    described = _read_frame(source)
    if described is None:
        return  # (the worker ended before it said what to do)
    settings = ExportConfig.model_validate_json(described)
    pipeline = SpanPipeline(settings)
    ended = threading.Event()
    last: list[tuple[int, int, int]] = [(0, 0, 0)]

    def send_counts() -> None:
        counts = pipeline.counts()
        if counts != last[0]:
            last[0] = counts
            exported, failed, dropped = counts
            with contextlib.suppress(OSError):  # (the worker is gone: nobody reads them)
                report.write(f"{exported} {failed} {dropped}\n".encode())
                report.flush()

    def keep_reporting() -> None:
        while not ended.wait(REPORT_EVERY):
            send_counts()

    reporter = threading.Thread(target=keep_reporting, name="apigate-spans-report", daemon=True)
    reporter.start()
    while (frame := _read_frame(source)) is not None:
        for span in orjson.loads(frame):
            pipeline.add(span)
    pipeline.close()
    ended.set()
    reporter.join()
    send_counts()


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
    main(sys.stdin.buffer, sys.stdout.buffer)
