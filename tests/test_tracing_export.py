"""Span export over OTLP/HTTP (``tracing.export``) from a real gateway process to a real receiver:
the exported ids are the ones the client and the upstream were told, parents link up, attributes
follow the HTTP semantic conventions, unsampled requests export nothing, and webhook deliveries
are spans of the sender's trace. Export needs nothing of the OpenTelemetry SDK."""

from __future__ import annotations

import array
import fcntl
import os
import re
import signal
import subprocess
import sys
import termios
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import yaml

from apigate.config.loader import ConfigError, load_config
from tests.support.cli import seconds_until
from tests.support.errors_helpers import Response, request
from tests.support.gateway import GatewayProcess, free_port
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.support.upstream import UpstreamServer
from tests.support.webhook_handler import WebhookHandler
from tests.support.webhook_sender import Sender, github_source, signed_headers

TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])")
CLIENT_SPAN = "00f067aa0ba902b7"


def new_trace_id() -> str:
    return os.urandom(16).hex()


def ids_of(value: str | None) -> tuple[str, str, str]:
    """(trace id, span id, flags) of a traceparent or traceresponse."""
    found = TRACEPARENT.fullmatch(value or "")
    assert found, value
    return found[1], found[2], found[3]


def export_config(receiver: OtlpReceiver) -> dict:
    return {
        "endpoint": receiver.endpoint,
        "headers": {"X-Collector-Key": "team-a"},
        "service_name": "edge-gateway",
        "batch": {"schedule_delay": "50ms"},
    }


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    server = UpstreamServer().start()
    yield server
    server.stop()


def _gateway(
    tmp: Path, receiver: OtlpReceiver, upstream: UpstreamServer, ratio: float
) -> Iterator[GatewayProcess]:
    closed = free_port()  # nothing listens there: connecting is refused
    config = {
        "tracing": {"sample_ratio": ratio, "export": export_config(receiver)},
        "routes": [
            {"name": "echo", "path": "/echo/*", "target": upstream.url},
            {
                "name": "retried",
                "path": "/status/503",
                "target": upstream.url,
                "retries": {"attempts": 1, "retry_on": [503]},
            },
            {"name": "status", "path": "/status/{code}", "target": upstream.url},
            {"name": "down", "path": "/down", "target": f"http://127.0.0.1:{closed}"},
        ],
    }
    gateway = GatewayProcess(tmp, config).start()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, receiver: OtlpReceiver, upstream: UpstreamServer
) -> Iterator[GatewayProcess]:
    yield from _gateway(tmp_path_factory.mktemp("traced"), receiver, upstream, 1.0)


def send(gateway: GatewayProcess, path: str, traceparent: str | None = None) -> Response:
    headers = [("traceparent", traceparent)] if traceparent is not None else []
    return request(gateway.port, "GET", path, headers=headers)


def marker(gateway: GatewayProcess, receiver: OtlpReceiver) -> None:
    """A sampled request whose spans are waited for: a worker exports in order, so a span queued
    before them has arrived once they did."""
    trace_id = new_trace_id()
    assert send(gateway, "/echo/marker", f"00-{trace_id}-{CLIENT_SPAN}-01").status == 200
    receiver.trace(trace_id, 2)


def test_a_new_trace_exports_the_server_and_client_spans_with_the_ids_that_were_sent(
    gateway: GatewayProcess, receiver: OtlpReceiver, upstream: UpstreamServer
) -> None:
    before = len(upstream.requests)
    sent_at = time.time_ns()
    response = send(gateway, "/echo/new?api_key=not-for-traces")
    assert response.status == 200
    trace_id, server_id, flags = ids_of(response.header("traceresponse"))
    assert flags == "01"
    upstream_trace, upstream_parent, _ = ids_of(upstream.requests[before].header("traceparent"))
    assert upstream_trace == trace_id

    spans = receiver.trace(trace_id, 2)
    server, client = spans["server"], spans["client"]
    assert server.span_id == server_id and server.parent_span_id == ""
    assert client.span_id == upstream_parent and client.parent_span_id == server_id
    assert server.name == "GET /echo/*" and client.name == "GET"
    assert server.attributes == {
        "http.request.method": "GET",
        "url.scheme": "http",
        "url.path": "/echo/new",
        "client.address": "127.0.0.1",
        "network.protocol.version": "1.1",
        "apigate.request_id": trace_id,  # a new trace's id is the request id the gateway made
        "http.response.status_code": 200,
        "http.route": "/echo/*",
        "apigate.route": "echo",
    }
    assert client.attributes == {
        "http.request.method": "GET",
        "server.address": "127.0.0.1",
        "server.port": upstream.port,
        "http.response.status_code": 200,
    }
    assert not server.error and not client.error
    assert server.start_ns <= client.start_ns <= client.end_ns <= server.end_ns
    assert abs(server.start_ns - sent_at) < 30e9  # monotonic times moved to the epoch
    assert (server.service_name, server.scope) == ("edge-gateway", "apigate")
    assert receiver.headers[-1]["x-collector-key"] == "team-a"


def test_the_clients_trace_continues_with_its_span_as_the_parent(
    gateway: GatewayProcess, receiver: OtlpReceiver, upstream: UpstreamServer
) -> None:
    trace_id = new_trace_id()
    before = len(upstream.requests)
    response = send(gateway, "/echo/child", f"00-{trace_id}-{CLIENT_SPAN}-01")
    answered_trace, server_id, _ = ids_of(response.header("traceresponse"))
    _, upstream_parent, flags = ids_of(upstream.requests[before].header("traceparent"))
    assert answered_trace == trace_id and flags == "01"

    spans = receiver.trace(trace_id, 2)
    assert (spans["server"].span_id, spans["server"].parent_span_id) == (server_id, CLIENT_SPAN)
    assert (spans["client"].span_id, spans["client"].parent_span_id) == (upstream_parent, server_id)
    assert spans["server"].attributes["apigate.request_id"] != trace_id


def test_unsampled_requests_export_nothing(
    gateway: GatewayProcess,
    receiver: OtlpReceiver,
    upstream: UpstreamServer,
    tmp_path: Path,
) -> None:
    unsampled = new_trace_id()
    assert send(gateway, "/echo/quiet", f"00-{unsampled}-{CLIENT_SPAN}-00").status == 200
    marker(gateway, receiver)
    # A gateway sampling no new trace: its requests export nothing; a client's sampled flag stands.
    for quiet in _gateway(tmp_path, receiver, upstream, 0.0):
        response = send(quiet, "/echo/new")
        new_trace, _, flags = ids_of(response.header("traceresponse"))
        assert flags == "00"
        marker(quiet, receiver)
    traces = {span.trace_id for span in receiver.snapshot()}
    assert unsampled not in traces and new_trace not in traces


def test_a_gateway_error_is_an_error_span_without_an_upstream_span(
    gateway: GatewayProcess, receiver: OtlpReceiver
) -> None:
    response = send(gateway, "/down")
    assert response.status == 502
    trace_id, server_id, _ = ids_of(response.header("traceresponse"))
    receiver.trace(trace_id, 1)
    marker(gateway, receiver)  # a CLIENT span would have been queued with it
    [server] = [span for span in receiver.snapshot() if span.trace_id == trace_id]
    assert server.kind == "server" and server.span_id == server_id
    assert server.error and server.attributes["error.type"] == "connect_failed"
    assert server.attributes["http.response.status_code"] == 502


@pytest.mark.parametrize(("code", "server_error", "client_error"), [(404, False, True), (500, True, True)])
def test_upstream_error_statuses(
    gateway: GatewayProcess, receiver: OtlpReceiver, code: int, server_error: bool, client_error: bool
) -> None:
    """A 4xx is an error of the CLIENT span only, a 5xx of both (HTTP semantic conventions)."""
    response = send(gateway, f"/status/{code}")
    assert response.status == code
    spans = receiver.trace(ids_of(response.header("traceresponse"))[0], 2)
    server, client = spans["server"], spans["client"]
    assert server.name == "GET /status/{code}"
    assert (server.error, client.error) == (server_error, client_error)
    assert client.attributes["http.response.status_code"] == code
    assert client.attributes["error.type"] == str(code)
    assert ("error.type" in server.attributes) == server_error


def test_retries_share_the_client_span_and_are_listed_on_it(
    gateway: GatewayProcess, receiver: OtlpReceiver, upstream: UpstreamServer
) -> None:
    before = len(upstream.requests)
    response = send(gateway, "/status/503")
    assert response.status == 503
    parents = {ids_of(seen.header("traceparent"))[1] for seen in upstream.requests[before:]}
    assert len(upstream.requests) - before == 2 and len(parents) == 1  # one upstream span, two attempts
    spans = receiver.trace(ids_of(response.header("traceresponse"))[0], 2)
    client = spans["client"]
    assert client.span_id == parents.pop()
    assert client.attributes["http.request.resend_count"] == 1
    assert client.attributes["apigate.upstream.tried"] == [f"127.0.0.1:{upstream.port} 503"] * 2
    assert client.error and client.attributes["error.type"] == "503"
    assert spans["server"].attributes["apigate.route"] == "retried"


def test_exported_spans_are_counted(gateway: GatewayProcess, receiver: OtlpReceiver) -> None:
    marker(gateway, receiver)

    def exported() -> int:
        counters = orjson.loads(request(gateway.port, "GET", "/metrics").body)["counters"]
        return counters["trace_spans_exported"]

    seconds_until(lambda: exported() >= 2, 20.0)
    counters = orjson.loads(request(gateway.port, "GET", "/metrics").body)["counters"]
    assert counters["trace_spans_failed"] == counters["trace_spans_dropped"] == 0


@pytest.mark.parametrize("stop", ["worker", "process group"])
def test_spans_queued_at_stop_are_sent_before_the_worker_exits(
    receiver: OtlpReceiver, upstream: UpstreamServer, tmp_path: Path, stop: str
) -> None:
    export = {**export_config(receiver), "batch": {"schedule_delay": "5m"}}  # no send on its own
    config = {
        "tracing": {"sample_ratio": 1.0, "export": export},
        "routes": [{"path": "/echo/*", "target": upstream.url}],
    }
    gateway = GatewayProcess(tmp_path, config).start()
    try:
        trace_id = ids_of(send(gateway, "/echo/last").header("traceresponse"))[0]
        if stop == "process group":  # the exporting process gets the signal too, and sends
            seconds_until(lambda: gateway.helpers("apigate-spans") != [], 10.0)
            gateway.signal_group(signal.SIGTERM)
    finally:
        assert gateway.stop() == 0
    assert set(receiver.trace(trace_id, 2, limit=0.0)) == {"server", "client"}


def test_a_reload_turns_export_on_and_off(
    receiver: OtlpReceiver, upstream: UpstreamServer, tmp_path: Path
) -> None:
    routes = [{"path": "/echo/*", "target": upstream.url}]
    gateway = GatewayProcess(tmp_path, {"tracing": {"sample_ratio": 1.0}, "routes": routes}).start()
    try:
        quiet = ids_of(send(gateway, "/echo/before").header("traceresponse"))[0]
        gateway.write_config(
            {"tracing": {"sample_ratio": 1.0, "export": export_config(receiver)}, "routes": routes}
        )
        gateway.signal(signal.SIGHUP)
        traced: list[str] = []

        def exported_after_reload(spans: list[ReceivedSpan]) -> bool:
            traced.append(ids_of(send(gateway, "/echo/after").header("traceresponse"))[0])
            return any(span.trace_id in traced for span in spans)

        receiver.wait_for(exported_after_reload)
        gateway.write_config({"tracing": {"sample_ratio": 1.0}, "routes": routes})
        gateway.signal(signal.SIGHUP)
        seconds_until(lambda: gateway.output().count("reloaded config (SIGHUP)") == 2, 20.0)
        unexported = ids_of(send(gateway, "/echo/off").header("traceresponse"))[0]
    finally:
        assert gateway.stop() == 0
    traces = {span.trace_id for span in receiver.snapshot()}
    assert quiet not in traces and unexported not in traces


# -- the exporting process ----------------------------------------------------------------------------
def counters(gateway: GatewayProcess) -> dict[str, int]:
    """The node's counters, asked for in an unsampled trace (the request makes no span)."""
    unsampled = [("traceparent", f"00-{new_trace_id()}-{CLIENT_SPAN}-00")]
    found: dict[str, int] = orjson.loads(request(gateway.port, "GET", "/metrics", headers=unsampled).body)[
        "counters"
    ]
    return found


def settled(gateway: GatewayProcess, spans: int) -> dict[str, int]:
    """The counters once every one of ``spans`` spans was counted exported, failed or dropped."""

    def counted() -> int:
        found = counters(gateway)
        return found["trace_spans_exported"] + found["trace_spans_failed"] + found["trace_spans_dropped"]

    seconds_until(lambda: counted() >= spans, 20.0)
    found = counters(gateway)
    assert counted() == spans, found
    return found


@pytest.fixture
def own_gateway(tmp_path: Path, receiver: OtlpReceiver, upstream: UpstreamServer) -> Iterator[GatewayProcess]:
    """A gateway tracing every request, whose small span queue fills fast."""
    export = {
        **export_config(receiver),
        "batch": {"schedule_delay": "50ms", "max_queue_size": 16, "max_export_batch_size": 8},
    }
    config = {
        "tracing": {"sample_ratio": 1.0, "export": export},
        "metrics": {"enabled": True},
        "routes": [{"path": "/echo/*", "target": upstream.url}],
    }
    gateway = GatewayProcess(tmp_path, config).start()
    yield gateway
    gateway.stop()


def test_spans_are_encoded_by_a_process_of_the_workers_own(
    gateway: GatewayProcess, receiver: OtlpReceiver
) -> None:
    marker(gateway, receiver)
    [process] = gateway.helpers("apigate-spans")
    assert os.sched_getscheduler(process) == os.SCHED_IDLE  # it takes only idle CPU time


def until_exported(gateway: GatewayProcess, receiver: OtlpReceiver) -> int:
    """Send sampled requests until the spans of one arrive (earlier ones may be dropped while
    the queue is full or no exporting process runs); how many were sent."""
    sent: list[str] = []

    def exported(spans: list[ReceivedSpan]) -> bool:
        sent.append(ids_of(send(gateway, "/echo/again").header("traceresponse"))[0])
        return any(span.trace_id in sent for span in spans)

    receiver.wait_for(exported)
    return len(sent)


def unread_bytes(pid: int) -> int:
    """What waits in the pipe that is ``pid``'s standard input (opened again through /proc)."""
    fd = os.open(f"/proc/{pid}/fd/0", os.O_RDONLY | os.O_NONBLOCK)
    try:
        found = array.array("i", [0])
        fcntl.ioctl(fd, termios.FIONREAD, found)
        return found[0]
    finally:
        os.close(fd)


def stopped_exporting_process(gateway: GatewayProcess, receiver: OtlpReceiver) -> int:
    """The pid of the gateway's exporting process, stopped (SIGSTOP) once it exported a trace."""
    marker(gateway, receiver)
    [process] = gateway.helpers("apigate-spans")
    os.kill(process, signal.SIGSTOP)  # what it is sent now waits in its pipe, unread
    return process


def test_an_exporting_process_that_ends_is_replaced_and_what_it_held_is_counted_dropped(
    own_gateway: GatewayProcess, receiver: OtlpReceiver
) -> None:
    process = stopped_exporting_process(own_gateway, receiver)
    held = [ids_of(send(own_gateway, f"/echo/held-{n}").header("traceresponse"))[0] for n in range(3)]
    seconds_until(lambda: unread_bytes(process) > 0, 10.0)
    os.kill(process, signal.SIGKILL)  # with at least one span that it never read
    requests = 1 + len(held) + until_exported(own_gateway, receiver)
    assert own_gateway.helpers("apigate-spans") not in ([], [process])
    # Every span is accounted for: exported, or counted dropped (those the ended process held,
    # and those that came while no process ran).
    found = settled(own_gateway, 2 * requests)
    assert found["trace_spans_dropped"] >= 1 and found["trace_spans_failed"] == 0
    exported = sum(span.trace_id in held for span in receiver.snapshot())
    assert exported <= 2 * len(held) - 1


def test_the_exporting_process_is_left_to_its_worker_by_stop_signals(
    own_gateway: GatewayProcess, receiver: OtlpReceiver
) -> None:
    marker(own_gateway, receiver)
    [process] = own_gateway.helpers("apigate-spans")
    os.kill(process, signal.SIGTERM)
    os.kill(process, signal.SIGINT)
    until_exported(own_gateway, receiver)  # (it ran since: the signals were delivered)
    assert own_gateway.helpers("apigate-spans") == [process]


def test_a_stalled_exporting_process_costs_spans_never_requests(
    own_gateway: GatewayProcess, receiver: OtlpReceiver
) -> None:
    process = stopped_exporting_process(own_gateway, receiver)
    try:
        # 2,000 spans: more than the pipe, the frame being written and the queue of 16 hold.
        statuses = {send(own_gateway, f"/echo/stalled-{n}").status for n in range(1000)}
        assert statuses == {200}
        assert counters(own_gateway)["trace_spans_dropped"] > 0
    finally:
        os.kill(process, signal.SIGCONT)
    requests = 1 + 1000 + until_exported(own_gateway, receiver)
    found = settled(own_gateway, 2 * requests)
    assert found["trace_spans_exported"] >= 4 and found["trace_spans_failed"] == 0


def test_a_worker_stops_even_when_its_exporting_process_does_not_read(
    own_gateway: GatewayProcess, receiver: OtlpReceiver
) -> None:
    process = stopped_exporting_process(own_gateway, receiver)
    for n in range(300):  # the pipe fills: the sending thread waits in a write
        send(own_gateway, f"/echo/stuck-{n}")
    started = time.monotonic()
    assert own_gateway.stop() == 0
    assert time.monotonic() - started < 30.0
    assert (
        not Path(f"/proc/{process}").exists() or "Z" in Path(f"/proc/{process}/stat").read_text().split()[2]
    )


# -- webhook deliveries -------------------------------------------------------------------------------
def test_webhook_deliveries_are_spans_of_the_senders_trace(
    receiver: OtlpReceiver, tmp_path: Path, start_gateway: Callable[..., GatewayProcess]
) -> None:
    handler = WebhookHandler().start()
    config = {
        "store": {"url": f"sqlite:///{tmp_path / 'store.db'}"},
        "tracing": {"sample_ratio": 1.0, "export": export_config(receiver)},
        "webhooks": {
            "poll_interval": "50ms",
            "sources": {"github": github_source(["handler"])},
            "destinations": {"handler": {"url": handler.url, "timeout": "2s"}},
        },
    }
    gateway = start_gateway(config)
    sender = Sender(gateway.port, "/webhooks/github")
    try:
        trace_id = new_trace_id()
        body = orjson.dumps({"id": "with-trace"})
        headers = {**signed_headers(body, "with-trace"), "traceparent": f"00-{trace_id}-{CLIENT_SPAN}-01"}
        assert sender.post(body, headers)[0] == 200
        assert sender.send("without-trace")[0] == 200
        deliveries = handler.wait_for(lambda seen: len(seen) == 2)
        handler.status = 500
        assert sender.send("refused")[0] == 200
        failed = _span_where(receiver, lambda s: s.attributes.get("apigate.webhook.event_id") == "refused")
    finally:
        sender.close()
        handler.stop()
    by_id = {delivery.webhook_id: delivery for delivery in deliveries}
    traced = next(d for d in deliveries if d.headers.get("x-github-delivery") == "with-trace")
    fresh = next(d for d in by_id.values() if d is not traced)

    sent_trace, attempt_span, flags = ids_of(traced.headers.get("traceparent"))
    assert (sent_trace, flags) == (trace_id, "01") and attempt_span != CLIENT_SPAN
    span = _span(receiver, attempt_span)
    assert (span.trace_id, span.parent_span_id, span.kind) == (trace_id, CLIENT_SPAN, "client")
    assert span.name == "deliver handler" and not span.error
    assert span.attributes == {
        "apigate.webhook.source": "github",
        "apigate.webhook.destination": "handler",
        "apigate.webhook.event_id": "with-trace",
        "apigate.webhook.attempt": 1,
        "apigate.webhook.event_type": "push",
        "http.response.status_code": 200,
    }
    assert span.start_ns <= span.end_ns and abs(span.start_ns - time.time_ns()) < 60e9

    new_trace, new_span, flags = ids_of(fresh.headers.get("traceparent"))
    assert flags == "01"  # a new trace, sampled at the ratio (1.0)
    span = _span(receiver, new_span)
    assert (span.trace_id, span.parent_span_id) == (new_trace, "")

    assert failed.error and failed.status_message == "answered 500"
    assert failed.attributes["error.type"] == "500" and failed.attributes["http.response.status_code"] == 500


def _span(receiver: OtlpReceiver, span_id: str) -> ReceivedSpan:
    return _span_where(receiver, lambda span: span.span_id == span_id)


def _span_where(receiver: OtlpReceiver, matches: Callable[[ReceivedSpan], bool]) -> ReceivedSpan:
    found = receiver.wait_for(lambda spans: any(matches(span) for span in spans))
    return next(span for span in found if matches(span))


# -- without the OpenTelemetry SDK ----------------------------------------------------------------------
# Makes the SDK, the exporter and the protobuf types unimportable (as when they are not installed)
# and notes each attempt to import them in the file $OTEL_IMPORT_ATTEMPTS names, with the module
# that tried. Other libraries may try on their own (redis-py looks for the SDK's metrics), so what
# counts is that no module of apigate does.
BLOCKER = textwrap.dedent(
    """
    import os
    import sys

    BLOCKED = ("opentelemetry.sdk", "opentelemetry.exporter", "opentelemetry.proto")

    class NotInstalled:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name not in BLOCKED and not name.startswith(tuple(b + "." for b in BLOCKED)):
                return None
            frame = sys._getframe(1)
            while frame.f_code.co_filename.startswith("<frozen importlib"):
                frame = frame.f_back
            with open(os.environ["OTEL_IMPORT_ATTEMPTS"], "a") as attempts:
                attempts.write(f"{frame.f_globals.get('__name__')} {name}\\n")
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, NotInstalled)
    """
)


@pytest.fixture
def without_sdk(tmp_path: Path) -> dict[str, str]:
    """The environment of a process in which the OpenTelemetry SDK is not installed."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    environ = {"PYTHONPATH": path, "OTEL_IMPORT_ATTEMPTS": str(tmp_path / "attempts.txt")}
    blocked = subprocess.run(
        [sys.executable, "-c", "import opentelemetry.sdk"], env={**os.environ, **environ}, capture_output=True
    )
    assert blocked.returncode != 0  # the blocker is in force
    return environ


def attempts_by_apigate(environ: dict[str, str]) -> list[str]:
    """The blocked imports that a module of apigate tried: none may."""
    attempts = Path(environ["OTEL_IMPORT_ATTEMPTS"])
    lines = attempts.read_text().splitlines() if attempts.exists() else []
    return [line for line in lines if line.split()[0].startswith("apigate")]


def test_spans_are_exported_without_the_sdk(
    without_sdk: dict[str, str], receiver: OtlpReceiver, upstream: UpstreamServer, tmp_path: Path
) -> None:
    config = {
        "tracing": {"sample_ratio": 1.0, "export": {"endpoint": receiver.endpoint, "service_name": "no-sdk"}},
        "routes": [{"path": "/echo/*", "target": upstream.url}],
    }
    gateway = GatewayProcess(tmp_path, config, env=without_sdk).start()
    try:
        trace_id = ids_of(send(gateway, "/echo/plain").header("traceresponse"))[0]
        spans = receiver.trace(trace_id, 2)
        assert (
            spans["server"].service_name == "no-sdk"
            and spans["client"].parent_span_id == spans["server"].span_id
        )
    finally:
        assert gateway.stop() == 0
    assert attempts_by_apigate(without_sdk) == [], gateway.output()


def test_every_module_imports_without_the_sdk(without_sdk: dict[str, str]) -> None:
    script = textwrap.dedent(
        """
        import importlib, pkgutil
        import apigate

        names = [m.name for m in pkgutil.walk_packages(apigate.__path__, "apigate.")]
        for name in names:
            if name != "apigate.__main__":
                importlib.import_module(name)
        print(len(names))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **without_sdk},
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 150  # every module was walked
    assert attempts_by_apigate(without_sdk) == []


# -- the config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("export", "field", "message"),
    [
        ({"endpoint": "collector:4318"}, "tracing.export.endpoint", "http:// or https://"),
        ({"endpoint": "http://c/v1/traces?x=1"}, "tracing.export.endpoint", "query string"),
        (
            {"endpoint": "http://c/v1/traces", "headers": {"bad name": "v"}},
            "tracing.export.headers",
            "header name",
        ),
        (
            {"endpoint": "http://c/v1/traces", "headers": {"x-key": "a\r\nx-evil: 1"}},
            "tracing.export.headers",
            "control character",
        ),
        ({"endpoint": "http://c/v1/traces", "timeout": "0s"}, "tracing.export.timeout", "greater than 0"),
        ({"endpoint": "http://c/v1/traces", "service_name": ""}, "tracing.export.service_name", "at least 1"),
        (
            {"endpoint": "http://c/v1/traces", "batch": {"max_queue_size": 10, "max_export_batch_size": 20}},
            "tracing.export.batch",
            "must not exceed max_queue_size",
        ),
        ({"endpoint": "http://c/v1/traces", "protocol": "grpc"}, "tracing.export.protocol", "Extra inputs"),
    ],
)
def test_bad_export_settings_are_named(export: dict, field: str, message: str) -> None:
    text = yaml.safe_dump({"tracing": {"export": export}, "routes": [{"path": "/x", "target": "http://a:1"}]})
    with pytest.raises(ConfigError) as raised:
        load_config(text=text, environ={})
    problems = str(raised.value)
    assert field in problems and message in problems, problems
    assert "x-evil" not in problems  # messages about config never print values


def test_export_settings_default_and_header_names_are_lowercased() -> None:
    text = yaml.safe_dump(
        {
            "tracing": {"export": {"endpoint": "https://c:4318/v1/traces", "headers": {"X-Key": "k"}}},
            "routes": [{"path": "/x", "target": "http://a:1"}],
        }
    )
    export = load_config(text=text, environ={}).tracing.export
    assert export is not None
    assert (export.headers, export.timeout, export.service_name) == ({"x-key": "k"}, 10.0, "apigate")
    assert (export.batch.max_queue_size, export.batch.max_export_batch_size) == (2048, 512)
    plain = yaml.safe_dump({"routes": [{"path": "/x", "target": "http://a:1"}]})
    assert load_config(text=plain, environ={}).tracing.export is None  # off unless configured
