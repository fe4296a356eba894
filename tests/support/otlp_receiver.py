"""An OTLP/HTTP trace receiver for tests: POST /v1/traces with a protobuf body, decoded with
``opentelemetry.proto`` (it comes with the OTLP exporter) into plain spans, answered as a
collector answers. A real HTTP server on its own thread, so a gateway process can export to it."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.support.cli import seconds_until
from tests.support.threaded_server import JsonHandler, ThreadedServer

KINDS = {Span.SPAN_KIND_SERVER: "server", Span.SPAN_KIND_CLIENT: "client"}


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str  # hex, as traceparent writes it
    span_id: str
    parent_span_id: str  # "" for a root span
    name: str
    kind: str
    attributes: dict[str, Any]
    error: bool
    status_message: str
    start_ns: int
    end_ns: int
    service_name: str
    scope: str


def _value(value: AnyValue) -> Any:
    field = value.WhichOneof("value")
    if field == "array_value":
        return [_value(item) for item in value.array_value.values]
    return getattr(value, field) if field is not None else None


def decode(body: bytes) -> list[ReceivedSpan]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        kind=KINDS.get(span.kind, str(span.kind)),
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        error=span.status.code == span.status.STATUS_CODE_ERROR,
                        status_message=span.status.message,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        service_name=resource.get("service.name", ""),
                        scope=scope_spans.scope.name,
                    )
                )
    return spans


class OtlpReceiver(ThreadedServer):
    """Keeps every span it was sent, and the headers of every export request."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.headers: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self.refusals: list[tuple[int, str | None]] = []  # (status, Retry-After) for the next POSTs
        self.posts = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def start(self) -> OtlpReceiver:
        receiver = self

        class Handler(JsonHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver.lock:
                    receiver.posts += 1
                    refusal = receiver.refusals.pop(0) if receiver.refusals else None
                if refusal is not None:
                    status, retry_after = refusal
                    self.send_response(status)
                    if retry_after is not None:
                        self.send_header("retry-after", retry_after)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces" or self.headers.get("content-type") != "application/x-protobuf":
                    self.send_error(404 if self.path != "/v1/traces" else 415)
                    return
                spans = decode(body)
                with receiver.lock:
                    receiver.spans.extend(spans)
                    receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.listen(Handler)
        return self

    def refuse(self, status: int, retry_after: str | None = None, times: int = 1) -> None:
        """Answer the next ``times`` export requests with ``status`` (and a Retry-After)."""
        with self.lock:
            self.refusals += [(status, retry_after)] * times

    def snapshot(self) -> list[ReceivedSpan]:
        with self.lock:
            return list(self.spans)

    def wait_for(
        self, condition: Callable[[list[ReceivedSpan]], bool], limit: float = 20.0
    ) -> list[ReceivedSpan]:
        """Poll until ``condition(spans)`` holds; fail with what arrived after ``limit`` seconds."""
        try:
            seconds_until(lambda: condition(self.snapshot()), limit)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; spans: {self.snapshot()}") from None
        return self.snapshot()

    def trace(self, trace_id: str, count: int, limit: float = 20.0) -> dict[str, ReceivedSpan]:
        """The ``count`` spans of ``trace_id`` by kind (server, client, ...), once they all arrived."""
        seen = self.wait_for(lambda spans: sum(s.trace_id == trace_id for s in spans) >= count, limit)
        found = [span for span in seen if span.trace_id == trace_id]
        assert len(found) == count, found
        return {span.kind: span for span in found}
