"""The exporting process's parts (observe/otlpwire.py, observe/otlp.py) against a real OTLP/HTTP
receiver: spans encoded by hand decode with opentelemetry-proto to what was sent; the collector
is retried as the OTLP specification says; batches, the queue's bound and the counts."""

from __future__ import annotations

import io
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from apigate.config.tracing import ExportConfig
from apigate.observe.otlp import Collector, Exporter, resource_attributes
from apigate.observe.otlpwire import SpanEncoder
from tests.support.gateway import free_port
from tests.support.otlp_receiver import OtlpReceiver

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver().start()
    yield server
    server.stop()


def record(span_id: str = "00f067aa0ba902b1", **changes: Any) -> list[Any]:
    """A span record as the worker sends it (spanprocess.py's emit, through JSON)."""
    values = {
        "name": "GET /orders/{id}",
        "kind": "server",
        "ids": [TRACE, span_id, None],
        "remote_parent": True,
        "times": [1_700_000_000_123_456_789, 1_700_000_000_223_456_789],
        "attributes": {"http.request.method": "GET", "http.response.status_code": 200},
        "error": None,
        **changes,
    }
    return list(values.values())


def decoded(data: bytes) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    request.ParseFromString(data)
    return request


def test_a_span_decodes_to_what_the_worker_sent() -> None:
    encoder = SpanEncoder({"service.name": "edge", "deployment.environment": "prod"}, "apigate", "1.2.3")
    attributes = {
        "text": "caf\u00e9",
        "lone": "a\ud800b",  # (a decoded claim may hold one: written as U+FFFD, not refused)
        "count": 7,
        "negative": -3,
        "big": 2**62,
        "flag": True,
        "off": False,
        "ratio": 0.25,
        "tried": ["10.0.0.1:80 502", "10.0.0.2:80"],
    }
    server = record(attributes=attributes, error=None)
    client = record("00f067aa0ba902b2", kind="client", ids=[TRACE, "00f067aa0ba902b2", "00f067aa0ba902b1"],
                    remote_parent=False, error="connect_failed")  # fmt: skip
    remote_child = record("00f067aa0ba902b3", ids=[TRACE, "00f067aa0ba902b3", "1111111111111111"])
    request = decoded(encoder.request([encoder.span(s) for s in (server, client, remote_child)]))
    [resource_spans] = request.resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource == {"service.name": "edge", "deployment.environment": "prod"}
    [scope_spans] = resource_spans.scope_spans
    assert (scope_spans.scope.name, scope_spans.scope.version) == ("apigate", "1.2.3")
    first, second, third = scope_spans.spans
    assert first.trace_id.hex() == TRACE and first.span_id.hex() == "00f067aa0ba902b1"
    assert first.parent_span_id == b"" and first.name == "GET /orders/{id}"
    assert first.kind == Span.SPAN_KIND_SERVER
    assert (first.start_time_unix_nano, first.end_time_unix_nano) == tuple(server[4])
    found = {a.key: a.value for a in first.attributes}
    assert found["text"].string_value == "caf\u00e9" and found["lone"].string_value == "a\ufffdb"
    assert (
        found["count"].int_value == 7
        and found["negative"].int_value == -3
        and found["big"].int_value == 2**62
    )
    assert (
        found["flag"].bool_value is True
        and found["off"].HasField("bool_value")
        and not found["off"].bool_value
    )
    assert found["ratio"].double_value == 0.25
    assert [v.string_value for v in found["tried"].array_value.values] == attributes["tried"]
    assert first.status.code == first.status.STATUS_CODE_UNSET and first.flags == 0x01
    assert second.kind == Span.SPAN_KIND_CLIENT and second.parent_span_id.hex() == "00f067aa0ba902b1"
    assert second.status.code == second.status.STATUS_CODE_ERROR and second.status.message == "connect_failed"
    # W3C sampled flag, and whether the parent is remote (known: 0x100, remote: 0x200).
    assert second.flags == 0x101 and third.flags == 0x301


def test_recurring_attributes_are_encoded_once_and_the_memo_stays_bounded() -> None:
    encoder = SpanEncoder({"service.name": "x"}, "apigate", "1")
    for n in range(10_000):
        encoder.span(record(attributes={"url.path": f"/{n}", "http.request.method": "GET"}))
    assert len(encoder.attributes) <= 4096
    again = decoded(encoder.request([encoder.span(record(attributes={"url.path": "/9999"}))]))
    assert again.resource_spans[0].scope_spans[0].spans[0].attributes[0].value.string_value == "/9999"


def settings(endpoint: str, **batch: Any) -> ExportConfig:
    return ExportConfig.model_validate({"endpoint": endpoint, "timeout": "10s", "batch": batch})


class Clock:
    """Time that passes only when the collector's client sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def test_retryable_answers_are_retried_with_backoff_and_retry_after(receiver: OtlpReceiver) -> None:
    clock = Clock()
    collector = Collector(settings(receiver.endpoint), {}, clock.sleep, clock)
    encoder = SpanEncoder({"service.name": "x"}, "apigate", "1")
    body = encoder.request([encoder.span(record())])
    receiver.refuse(503, times=2)
    receiver.refuse(429, retry_after="3")
    assert collector.send(body)
    assert clock.slept == [1.0, 2.0, 3.0] and receiver.posts == 4
    assert [span.trace_id for span in receiver.snapshot()] == [TRACE]


def test_other_answers_fail_the_batch_at_once(receiver: OtlpReceiver) -> None:
    clock = Clock()
    collector = Collector(settings(receiver.endpoint), {}, clock.sleep, clock)
    receiver.refuse(400)
    assert not collector.send(b"")
    assert clock.slept == [] and receiver.posts == 1


def test_a_collector_that_stays_down_fails_the_batch_within_the_timeout() -> None:
    clock = Clock()
    collector = Collector(settings(f"http://127.0.0.1:{free_port()}/v1/traces"), {}, clock.sleep, clock)
    assert not collector.send(b"")
    assert clock.slept == [1.0, 2.0, 4.0] and sum(clock.slept) < 10.0  # the next wait (8 s) passes it


def test_gzip_and_resource_attributes_come_from_the_otlp_environment(receiver: OtlpReceiver) -> None:
    environ = {
        "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
        "OTEL_RESOURCE_ATTRIBUTES": "service.name=ignored, team=edge%20ops,bad",
    }
    config = settings(receiver.endpoint)
    encoder = SpanEncoder(resource_attributes(config, environ), "apigate", "1")
    assert Collector(config, environ).send(encoder.request([encoder.span(record())]))
    [span] = receiver.snapshot()
    assert receiver.headers[0]["content-encoding"] == "gzip" and span.service_name == "apigate"
    assert resource_attributes(config, environ) == {"service.name": "apigate", "team": "edge ops"}


def test_batches_the_queue_bound_and_the_counts(receiver: OtlpReceiver) -> None:
    config = settings(receiver.endpoint, max_queue_size=5, max_export_batch_size=2, schedule_delay="60s")
    encoder = SpanEncoder({"service.name": "x"}, "apigate", "1")
    sent: list[int] = []

    def send(body: bytes) -> bool:
        spans = decoded(body).resource_spans[0].scope_spans[0].spans
        sent.append(len(spans))
        return len(sent) != 2  # the second batch fails

    report = io.BytesIO()
    exporter = Exporter(config, encoder, send, report)
    for n in range(7):  # two more than the queue holds, with nothing sent yet
        exporter.add(record(f"{n + 1:016x}"))
    exporter.close()
    exporter.run()
    assert sent == [2, 2, 1]
    assert (exporter.exported, exporter.failed, exporter.dropped) == (3, 2, 2)
    assert report.getvalue().splitlines()[-1] == b"3 2 2"


def test_a_kept_alive_connection_the_collector_closed_is_replaced_at_once() -> None:
    """A collector that closes an idle kept-alive connection: the next batch goes on a new one,
    without a backoff."""
    listener = socket.create_server(("127.0.0.1", 0))
    requests: list[bytes] = []
    closed = threading.Event()

    def serve() -> None:
        for _ in range(2):  # each connection answers one request, then is closed without a word
            conn, _ = listener.accept()
            with conn:
                received = b""
                while b"\r\n\r\n" not in received:
                    received += conn.recv(65536)
                head, _, body = received.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
                while len(body) < length:
                    body += conn.recv(65536)
                requests.append(body)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            closed.set()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    clock = Clock()
    collector = Collector(
        settings(f"http://127.0.0.1:{listener.getsockname()[1]}/v1/traces"), {}, clock.sleep, clock
    )
    try:
        assert collector.send(b"first") and collector.connection is not None  # kept alive
        assert closed.wait(10.0)  # the collector closed it
        assert collector.send(b"second")
        assert requests == [b"first", b"second"] and clock.slept == []
    finally:
        collector.close()
        listener.close()
        server.join(5)
