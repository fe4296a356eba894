"""The worker's link to its node, over a real Unix socket: a frame it cannot read drops the link,
and the worker connects again (it never stays cut off from health and discovered targets)."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

from apigate.engine.server import Gateway
from apigate.node.frames import encode, read_frame
from apigate.node.link import WorkerLink


async def _malformed_frame_then_reconnect(path: Path) -> int:
    hellos: asyncio.Queue[int] = asyncio.Queue()
    links = 0

    async def node(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal links
        links += 1
        first = links == 1
        hello = await read_frame(reader)
        assert hello is not None and hello["op"] == "hello"
        await hellos.put(int(hello["pid"]))
        if first:
            body = b"{not json"
            writer.write(struct.pack(">I", len(body)) + body)
        else:
            writer.write(encode({"op": "snapshot", "id": 7}))
            reply = await read_frame(reader)
            assert reply is not None and reply["id"] == 7
            await hellos.put(-1)
        await reader.read()  # until the worker closes
        writer.close()

    server = await asyncio.start_unix_server(node, path=str(path))
    link = WorkerLink(Gateway(), lambda: asyncio.open_unix_connection(str(path)), lambda _: None)
    link.start()
    try:
        await asyncio.wait_for(hellos.get(), 5)
        await asyncio.wait_for(hellos.get(), 5)  # connected again after the bad frame
        return await asyncio.wait_for(hellos.get(), 5)  # and it answers on the new link
    finally:
        await link.stop()
        server.close()


def test_a_malformed_frame_from_the_node_drops_the_link_and_it_reconnects(tmp_path: Path) -> None:
    assert asyncio.run(_malformed_frame_then_reconnect(tmp_path / "node.sock")) == -1
