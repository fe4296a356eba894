"""The heads the proxy writes and how each message is framed, as pure functions of plain values.

The request head sent upstream, the response head sent back to the client (with the framing
decision: re-chunked, read until the upstream closes, connection closed after it), the head of
a 101 switch and the whole message of an answer the gateway makes itself. Each takes the values
it depends on and returns bytes (and the decision); the exchange applies the result to its own
state, so every rule here can be checked without a connection.
"""

from __future__ import annotations

from typing import Any, Final, cast

from apigate.engine import wire
from apigate.httpspec import HOP_BY_HOP

# Request headers the proxy regenerates or consumes itself, besides the hop-by-hop ones.
_REQUEST_OWN: Final = HOP_BY_HOP | {
    b"host",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-request-id",
    b"expect",
    b"traceparent",
}
# A buffered body is sent with its own Content-Length (a body hook may have replaced it).
_REQUEST_OWN_BUFFERED: Final = _REQUEST_OWN | {b"content-length"}
# Response headers the proxy owns: hop-by-hop ones, and X-Request-ID (it sends its own).
_RESPONSE_OWN: Final = HOP_BY_HOP | {b"x-request-id", b"traceresponse"}
_STATUS_101: Final = wire.status_line(101)


def upstream_head(
    *,
    method: str,
    raw_path: bytes,
    rewritten_path: str | None,
    query: bytes,
    client_host: str | None,
    target_host: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes | None,
    xff: bytes | None,
    peer: bytes,
    forwarded_proto: bytes,
    forwarded_host: bytes | None,
    rid: bytes,
    traceparent: bytes,
    upgrade_to: bytes | None,
    chunked: bool,
) -> bytes:
    """The request head sent upstream.

    The client's path goes as it came unless the route rewrote it (``rewritten_path``). Host is
    ``client_host`` (given where the route preserves the client's Host), else ``target_host``.
    The client's fields the gateway owns are dropped and its own written instead:
    X-Forwarded-For (``xff``, the client's chain, with ``peer`` appended), -Proto, -Host, Via,
    X-Request-ID and traceparent (engine/tracing.py). A buffered ``body`` goes with its own
    Content-Length; ``upgrade_to`` (the protocols offered) asks the upstream to switch, and
    ``chunked`` says the body follows in chunks.
    """
    path = raw_path if rewritten_path is None else rewritten_path.encode("latin-1")
    if query:
        path += b"?" + query
    host = client_host.encode("latin-1") if client_host else target_host
    # Pieces joined once at the end: cheaper than formatting each line.
    out = [method.encode(), b" ", path, b" HTTP/1.1\r\nhost: ", host, b"\r\n"]
    own = _REQUEST_OWN if body is None else _REQUEST_OWN_BUFFERED
    for name, value in headers:
        if name in own:
            continue
        out.append(name)
        out.append(b": ")
        out.append(value)
        out.append(b"\r\n")
    if body is not None:
        out.append(b"content-length: %d\r\n" % len(body))
    out += (
        b"x-forwarded-for: ",
        xff + b", " + peer if xff else peer,
        b"\r\nx-forwarded-proto: ",
        forwarded_proto,
        b"\r\nvia: 1.1 apigate\r\nx-request-id: ",
        rid,
        b"\r\ntraceparent: ",
        traceparent,
        b"\r\n",
    )
    if forwarded_host is not None:
        out += (b"x-forwarded-host: ", forwarded_host, b"\r\n")
    if upgrade_to is not None:
        out.append(b"connection: upgrade\r\nupgrade: %s\r\n" % upgrade_to)
    elif chunked:
        out.append(b"transfer-encoding: chunked\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def response_fields(
    headers: list[tuple[bytes, bytes]], rid: bytes
) -> tuple[list[tuple[bytes, bytes]], bool, bool]:
    """The upstream's response fields the client gets, and what they say of the body:
    ``(fields, length_known, chunked)``.

    Hop-by-hop fields, those the upstream's Connection field names (RFC 9110 §7.6.1), its
    X-Request-ID and its traceresponse are dropped; the gateway's X-Request-ID (``rid``) is added last.
    """
    tokens: set[bytes] | None = None
    length_known = False
    chunked = False
    kept: list[tuple[bytes, bytes]] = []
    # Each field is read through a cast and kept as the tuple it came in: compiled, a loop over
    # typed tuples would unpack each one and build it anew to keep it.
    fields: list[Any] = headers
    for pair in fields:
        name, value = cast("tuple[bytes, bytes]", pair)
        if name in _RESPONSE_OWN:
            if name == b"transfer-encoding":
                chunked = True
            elif name == b"connection" and value not in wire.PLAIN_CONNECTION:
                tokens = wire.connection_tokens(value)
            continue
        if name == b"content-length":
            length_known = True
        kept.append(pair)
    if tokens:
        kept = [pair for pair in kept if pair[0] not in tokens]
    kept.append((b"x-request-id", rid))
    return kept, length_known, chunked


def response_head(
    *,
    status: int,
    headers: list[tuple[bytes, bytes]],
    length_known: bool,
    chunked: bool,
    method: str,
    version: str,
    keep_alive: bool,
    upgrade: bool,
    closing: bool,
    lines: bytes = b"",
) -> tuple[bytes, bool, bool, bool]:
    """The response head sent to the client, and how its body goes: ``(head, rechunk, until_eof,
    close)``.

    ``length_known`` and ``chunked`` say how the upstream framed the body; ``method`` and
    ``version`` are the client's request's, ``keep_alive`` whether the client asked to keep the
    connection; ``upgrade``: the client asked to switch protocols and the upstream answered
    without switching; ``closing``: the connection ends after this response whatever its
    framing (the exchange asked for it, or the gateway is draining); ``lines``: header lines
    (``name: value\r\n``...) added after ``headers`` (``Exchange.response_lines``).

    ``rechunk``: the body is sent to the client in chunks; ``until_eof``: the body ends when the
    upstream closes; ``close``: the client's connection ends after this response (``closing``,
    a client that did not ask to keep it, or an HTTP/1.0 client that learns the body's end by
    the close).
    """
    head = [wire.STATUS_LINES.get(status) or wire.status_line(status)]
    wire.add_headers(head, headers)
    if lines:
        head.append(lines)
    if length_known and keep_alive and version == "1.1" and not (upgrade or closing):
        head.append(b"\r\n")  # the common case: nothing to add
        return b"".join(head), False, False, False
    no_body = method == "HEAD" or status in (204, 304)
    until_eof = not length_known and not chunked and not no_body
    rechunk = False
    close = closing or not keep_alive
    trailer = b""
    if (chunked or until_eof) and not no_body:
        if version == "1.1":
            rechunk = True
            trailer = b"transfer-encoding: chunked\r\n"
        else:
            close = True  # an HTTP/1.0 client learns the end by the close
    if close:
        trailer += b"connection: close\r\n"
    elif version == "1.0":
        trailer += b"connection: keep-alive\r\n"
    head.append(trailer + b"\r\n")
    return b"".join(head), rechunk, until_eof, close


def has_length(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether ``headers`` (lowercase names) hold a Content-Length field."""
    return any(name == b"content-length" for name, _ in headers)


def switch_head(headers: list[tuple[bytes, bytes]], upgrade_to: bytes) -> bytes:
    """The head of a 101 answer that switches the client to ``upgrade_to``."""
    return (
        _STATUS_101
        + wire.serialize_headers(headers)
        + b"connection: upgrade\r\nupgrade: %s\r\n\r\n" % upgrade_to
    )


def reply_message(
    *,
    status: int,
    content_type: bytes,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    method: str,
    closing: bool,
    lines: bytes = b"",
) -> bytes:
    """An answer the gateway makes itself, as written to the client: the head declares the
    body's type (none when ``content_type`` is empty) and length (a HEAD request gets the head
    alone, RFC 9110 §9.3.2), and ``connection: close`` when the connection ends after it; ``lines``
    as for ``response_head``. A 204 or 304 has neither body nor Content-Length (RFC 9110 §8.6)."""
    if status == 204 or status == 304:
        described = b""
        body = b""
    elif content_type:
        described = b"content-type: %s\r\ncontent-length: %d\r\n" % (content_type, len(body))
    else:
        described = b"content-length: %d\r\n" % len(body)
    head = (
        wire.status_line(status)
        + described
        + wire.serialize_headers(headers)
        + lines
        + (b"connection: close\r\n\r\n" if closing else b"\r\n")
    )
    return head if method == "HEAD" else head + body
