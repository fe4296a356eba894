#!/usr/bin/env python3
"""Webhook intake throughput: verified, durably committed events per second and acknowledgement
latency for one gateway worker, on SQLite and on PostgreSQL, side by side in one run.

    python bench/webhooks.py [--events 10000] [--connections 64] [--postgres postgresql://postgres@127.0.0.1:5432]

Each event is a distinct GitHub-signed POST (HMAC-SHA256 checked by the gateway), sent over
``--connections`` keep-alive connections that each wait for the answer before sending the next
request; the requests are built before the clock starts. Every store is measured twice, on a
fresh database each time:

- ``ingest``: delivery is held back (the destination's ``rate_limit: 1/h`` lets one attempt
  through), so the worker only takes in events, as while a handler is down;
- ``delivery``: a handler in its own process takes every delivery while the events arrive;
  ``delivered/s`` is the events divided by the time from the first request to the last delivery.

``cpu µs/event`` is the gateway's CPU time (all its threads, delivery included) per accepted event,
steadier than the wall-clock figures on a shared machine. The output ends with one line per
store: events/s and p99 acknowledgement latency, for both modes.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

import asyncpg
import uvloop
import yaml

SECRET = b"bench-webhook-secret-0123456789"
MODES = ("ingest", "delivery")
DRAIN_LIMIT = 300.0  # seconds to wait for the deliveries of a run


@dataclass
class Row:
    store: str
    mode: str
    accepted: int
    per_second: float
    p50_ms: float
    p99_ms: float
    delivered_per_second: float | None
    cpu_us_per_event: float  # the gateway's CPU time (all threads) per accepted event, delivery included


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads (steadier than wall time on a busy machine)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request_bytes(port: int, number: int) -> bytes:
    body = b'{"action":"opened","number":%d,"padding":"%s"}' % (number, b"x" * 400)
    signature = hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    return (
        b"POST /webhooks/github HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n"
        b"x-github-event: pull_request\r\nx-github-delivery: %s\r\nx-hub-signature-256: sha256=%s\r\n"
        b"content-length: %d\r\n\r\n%s"
    ) % (port, uuid.uuid4().hex.encode(), signature.encode(), len(body), body)


# -- the handler: its own process, so it takes no CPU time from the load generator's loop ------------
def serve_handler(port: int, delivered: Synchronized, last_at: Synchronized, ready: object) -> None:
    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Reads requests (Content-Length framed) and answers each 200."""
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                delivered.value += 1
                last_at.value = time.time()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        await asyncio.start_server(connection, "127.0.0.1", port, backlog=1024)
        ready.set()  # type: ignore[attr-defined]
        await asyncio.Event().wait()

    uvloop.run(main())


class Handler:
    def __init__(self) -> None:
        self.port = free_port()
        self.delivered: Synchronized = multiprocessing.Value("q", 0, lock=False)  # type: ignore[assignment]
        self.last_at: Synchronized = multiprocessing.Value("d", 0.0, lock=False)  # type: ignore[assignment]
        ready = multiprocessing.Event()
        self.process = multiprocessing.Process(
            target=serve_handler, args=(self.port, self.delivered, self.last_at, ready), daemon=True
        )
        self.process.start()
        if not ready.wait(10):
            raise RuntimeError("the handler did not start")

    def reset(self) -> None:
        self.delivered.value = 0
        self.last_at.value = 0.0

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(5)


# -- the load generator ----------------------------------------------------------------------------
async def drive(port: int, requests: list[bytes], connections: int) -> tuple[int, list[float], float]:
    pending = list(reversed(requests))
    latencies: list[float] = []
    accepted = 0

    async def connection() -> None:
        nonlocal accepted
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while pending:
            payload = pending.pop()
            started = time.perf_counter()
            writer.write(payload)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if head.startswith(b"HTTP/1.1 2"):
                accepted += 1
        writer.close()

    began = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(connections)))
    return accepted, latencies, time.perf_counter() - began


def gateway_config(port: int, store_url: str, mode: str, handler_port: int) -> dict:
    destination: dict = {"type": "http", "url": f"http://127.0.0.1:{handler_port}/hook", "concurrency": 32}
    if mode == "ingest":
        destination["rate_limit"] = "1/h"
    return {
        "listen": f"127.0.0.1:{port}",
        "store": {"url": store_url},
        "webhooks": {
            "sources": {
                "github": {
                    "verify": {"scheme": "github", "secrets": [SECRET.decode()]},
                    "destinations": ["handler"],
                }
            },
            "destinations": {"handler": destination},
        },
    }


def run_one(
    store: str, store_url: str, mode: str, args: argparse.Namespace, handler: Handler, work: Path
) -> Row:
    """One gateway, one mode; ``work`` holds its config and log (and a SQLite store)."""
    port = free_port()
    (work / "apigate.yaml").write_text(yaml.safe_dump(gateway_config(port, store_url, mode, handler.port)))
    requests = [request_bytes(port, number) for number in range(args.events)]
    handler.reset()
    log = open(work / "gateway.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "apigate", "run", "-c", str(work / "apigate.yaml"), "--workers", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "APIGATE_LOG_LEVEL": "WARNING"},
    )
    delivered_per_second = None
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(
                        f"gateway did not start: {(work / 'gateway.log').read_text()}"
                    ) from None
                time.sleep(0.05)
        began, cpu_before = time.time(), cpu_seconds(proc.pid)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            accepted, latencies, seconds = runner.run(drive(port, requests, args.connections))
        if mode == "delivery":
            deadline = time.monotonic() + DRAIN_LIMIT
            while handler.delivered.value < accepted and time.monotonic() < deadline:
                time.sleep(0.05)
            if handler.delivered.value >= accepted:
                delivered_per_second = accepted / (handler.last_at.value - began)
        cpu_used = cpu_seconds(proc.pid) - cpu_before
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
    latencies.sort()
    return Row(
        store,
        mode,
        accepted,
        accepted / seconds,
        latencies[len(latencies) // 2] * 1000,
        latencies[int(len(latencies) * 0.99)] * 1000,
        delivered_per_second,
        cpu_used / max(accepted, 1) * 1e6,
    )


async def create_database(server: str, name: str) -> None:
    admin = await asyncpg.connect(f"{server}/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()


async def drop_database(server: str, name: str) -> None:
    admin = await asyncpg.connect(f"{server}/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def run_store(store: str, args: argparse.Namespace, handler: Handler) -> list[Row]:
    rows = []
    for mode in MODES:
        with tempfile.TemporaryDirectory(prefix="apigate-bench-webhooks-") as scratch:
            work = Path(scratch)
            if store == "sqlite":
                rows.append(run_one(store, f"sqlite:///{work}/store.db", mode, args, handler, work))
                continue
            name = f"apigate_bench_{uuid.uuid4().hex[:12]}"
            asyncio.run(create_database(args.postgres, name))
            try:
                rows.append(run_one(store, f"{args.postgres}/{name}", mode, args, handler, work))
            finally:
                asyncio.run(drop_database(args.postgres, name))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=10000)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--postgres", default="postgresql://postgres@127.0.0.1:5432", help="server, no database"
    )
    parser.add_argument("--stores", default="sqlite,postgresql", help="which stores, comma-separated")
    args = parser.parse_args()

    handler = Handler()
    try:
        rows = [row for store in args.stores.split(",") for row in run_store(store, args, handler)]
    finally:
        handler.stop()
    print(
        f"{'store':<12}{'mode':<10}{'accepted':>9}{'events/s':>10}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'delivered/s':>13}{'cpu µs/event':>14}"
    )
    for r in rows:
        drained = "-" if r.delivered_per_second is None else f"{r.delivered_per_second:.0f}"
        print(
            f"{r.store:<12}{r.mode:<10}{r.accepted:>9}{r.per_second:>10.0f}{r.p50_ms:>8.1f}{r.p99_ms:>8.1f}"
            f"{drained:>13}{r.cpu_us_per_event:>14.0f}"
        )
    for store in dict.fromkeys(r.store for r in rows):
        print(
            f"{store}: "
            + "; ".join(
                f"{r.mode} {r.per_second:.0f} events/s p99 {r.p99_ms:.1f} ms"
                for r in rows
                if r.store == store
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
