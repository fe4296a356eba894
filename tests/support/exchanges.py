"""Real engine exchanges for driving a policy's hook in process, without sockets.

The compiled hot paths take the engine's own ``Exchange`` (mypyc checks the type at run time),
so tests hand them one made the way the engine makes it: a gateway, a client connection on a
transport that only records, and the request's parts.
"""

from __future__ import annotations

import asyncio
from typing import Any

from apigate.config.compile import compile_plan
from apigate.config.loader import load_config
from apigate.engine.client import ClientConnection
from apigate.engine.exchange import Exchange
from apigate.engine.server import Gateway


class RecordingTransport:
    """What a client connection needs of an asyncio transport; writes are kept."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.peer, 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


_gateway: Gateway | None = None


def _shared_gateway() -> Gateway:
    global _gateway
    if _gateway is None:
        config = load_config(text="routes:\n  - path: /*\n    target: http://127.0.0.1:9\n")
        loop = asyncio.new_event_loop()
        _gateway = Gateway(loop=loop)
        _gateway.apply(compile_plan(config, _gateway.pools))
        loop.close()  # nothing is routed or sent, so nothing ever runs on it
    return _gateway


def request_exchange(
    headers: list[tuple[bytes, bytes]],
    path: str = "/",
    query: bytes = b"",
    method: str = "GET",
    peer: str = "127.0.0.1",
) -> Exchange:
    """An exchange for ``method path?query`` with ``headers`` (names lowercase), as the engine
    makes it for a request from ``peer``; nothing is routed or sent."""
    gateway = _shared_gateway()
    client = ClientConnection(gateway)
    client.connection_made(RecordingTransport(peer))
    gateway.connections.discard(client)  # the gateway keeps no list of these
    raw_path = path.encode() + (b"?" + query if query else b"")
    return Exchange(client, method, path, raw_path, query, list(headers), "1.1", True, False)
