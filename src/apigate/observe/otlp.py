"""The OpenTelemetry SDK side of span export: the one module that imports the SDK (the ``otel``
extra), and only once ``tracing.export`` is set.

Spans are built after the fact as the SDK's ``ReadableSpan``, with the ids the gateway already
sent on (in traceresponse, in the upstream's or a webhook destination's traceparent): no id
generator or sampler of the SDK takes part, so the exported ids are exactly those. The SDK's
``BatchSpanProcessor`` queues them, and its OTLP/HTTP exporter sends them in batches from the
processor's own thread, never from the event loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import AttributeValue

from apigate import __version__
from apigate.config.tracing import ExportConfig

Kind = Literal["server", "client"]
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
