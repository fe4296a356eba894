"""Retries at their edges, through a real gateway: a pooled connection the upstream drops as a
request arrives (the free, uncounted retry) must resend the whole request, body included; retries
without backoff still end when the route's timeout passes."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests.support.errors_helpers import Blackhole, Client, assert_error, request
from tests.support.gateway import GatewayProcess
from tests.support.hostile_upstream import HostileUpstream, read_request


class DropsSecondRequest(HostileUpstream):
    """Answers the first request of each connection with the body length it read and keeps the
    connection; the second request on a connection is read, then the connection is closed
    unanswered (an upstream that timed out the idle connection just as the request went)."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []
        self.dropped = 0

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            read = read_request(conn, b"")
            if read is None:
                return
            _, body, rest = read
            self.bodies.append(body)
            answer = str(len(body)).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer))
            if read_request(conn, rest) is not None:
                self.dropped += 1  # read whole, then the connection closes unanswered


@pytest.fixture(scope="module")
def dropping(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, DropsSecondRequest]]:
    with DropsSecondRequest() as upstream:
        config = {
            "upstreams": {"dropping": {"targets": [upstream.url], "timeouts": {"first_byte": "2s"}}},
            "routes": [{"path": "/d/*", "upstream": "dropping"}],
        }
        gateway = GatewayProcess(tmp_path_factory.mktemp("dropping"), config, workers=1).start()
        yield gateway, upstream
        gateway.stop()


def test_a_stale_pooled_connection_is_retried_with_the_whole_body(
    dropping: tuple[GatewayProcess, DropsSecondRequest],
) -> None:
    gateway, upstream = dropping
    with Client(gateway.port) as client:
        first = client.request("PUT", "/d/x", body=b"hello")
        assert first.status == 200 and first.body == b"5"
        # The pooled connection is reused, dropped unanswered, and the PUT goes again on a new one.
        second = client.request("PUT", "/d/x", body=b"world!")
        assert upstream.dropped == 1
        assert second.status == 200, second
        assert second.body == b"6"
    assert upstream.bodies == [b"hello", b"world!"]


@pytest.fixture(scope="module")
def blackholed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    blackhole = Blackhole()
    assert blackhole.fill()
    config = {
        "upstreams": {"blackhole": {"targets": [blackhole.url], "timeouts": {"connect": "1s"}}},
        "routes": [
            {
                "path": "/b/*",
                "upstream": "blackhole",
                "timeout": "1s",
                "retries": {"attempts": 3, "retry_on": ["connect"], "backoff": {"base": 0}},
            }
        ],
    }
    gateway = GatewayProcess(tmp_path_factory.mktemp("blackholed"), config, workers=1).start()
    yield gateway
    gateway.stop()
    blackhole.close()


def test_retries_without_backoff_end_at_the_route_timeout(blackholed: GatewayProcess) -> None:
    started = time.monotonic()
    response = request(blackholed.port, "GET", "/b/x")
    elapsed = time.monotonic() - started
    assert_error(response, 504)
    # Four connect timeouts would take 4 s; the route allows 1 s for everything. The bound sits
    # between the two with room for a loaded machine.
    assert elapsed < 2.5, elapsed
