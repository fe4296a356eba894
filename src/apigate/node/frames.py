"""Messages between the node and its workers: JSON objects, each framed by a 4-byte length.

A Unix stream socket carries them (one connection per worker); a worker asks nothing of the
node but sends its hello, and answers what the node asks (``id`` pairs a reply with its request).
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any, Final

import orjson

MAX_FRAME: Final = 16 * 1024 * 1024  # a snapshot of a very large config stays far below this
_LENGTH: Final = struct.Struct(">I")


class FrameError(Exception):
    """The peer sent something that is not a frame of ours: the link is dropped."""


def encode(message: dict[str, Any]) -> bytes:
    data = orjson.dumps(message)
    return _LENGTH.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None at the end of the stream."""
    try:
        head = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError:
        return None
    (size,) = _LENGTH.unpack(head)
    if size > MAX_FRAME:
        raise FrameError(f"a frame of {size} bytes is over the limit")
    try:
        data = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        return None
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError:
        # A FrameError, so the reader drops this link and connects again rather than dying.
        raise FrameError("a frame must hold JSON") from None
    if not isinstance(message, dict):
        raise FrameError("a frame must hold a JSON object")
    return message
