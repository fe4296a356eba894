"""Many requests at once over many keep-alive connections, for limits that must hold under concurrency."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence


async def _connection(port: int, path: str, count: int, headers: bytes, statuses: Counter[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        request = b"GET " + path.encode() + b" HTTP/1.1\r\nHost: gateway.test\r\n" + headers + b"\r\n"
        writer.write(request * count)  # pipelined: every request is in flight at once
        await writer.drain()
        for _ in range(count):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            statuses[int(lines[0].split(b" ")[1])] += 1
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
    finally:
        writer.close()


def hammer(
    ports: Sequence[int], path: str, connections: int, per_connection: int, headers: bytes = b""
) -> Counter[int]:
    """``connections`` connections spread over ``ports``, each sending ``per_connection`` requests;
    the count of each status that came back."""
    statuses: Counter[int] = Counter()

    async def run() -> None:
        await asyncio.wait_for(
            asyncio.gather(
                *(
                    _connection(ports[n % len(ports)], path, per_connection, headers, statuses)
                    for n in range(connections)
                )
            ),
            timeout=60,
        )

    asyncio.run(run())
    return statuses


def most_within(times: list[int], span: int) -> int:
    """The most of ``times`` (sorted) that fall within any ``span`` ms."""
    best, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] >= span:
            first += 1
        best = max(best, last - first + 1)
    return best
