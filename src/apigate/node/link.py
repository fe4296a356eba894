"""A worker's side of the node: it applies what the node pushes (target health from the active
checks, discovered targets) and answers what the node asks (its view of upstreams and circuits, a
circuit reset, a cache purge), so that the admin listener answers for every worker.

The link reconnects when the node restarts; until it is up again the worker serves with the
health it last heard.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from apigate.engine.plan import UpstreamGroup
from apigate.engine.server import Gateway
from apigate.node.frames import FrameError, encode, read_frame

log = logging.getLogger("apigate")

Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
# Discovered targets, by upstream, as (url, weight): the worker compiles its plan again with them.
OnTargets = Callable[[dict[str, list[tuple[str, int]]]], None]
# What the process counts outside the engine: {"counters": {name: n}, "gauges": {name: n},
# "webhooks": ..., "transform_bodies": [[route, direction, outcome, n]...]} (observe/metrics.py
# merges them).
Counts = Callable[[], dict[str, Any]]
# The node says whether it wants request events (someone listens, or a Redis stream takes them).
OnEventsWanted = Callable[[bool], None]
RECONNECT_MAX = 2.0
VIEW_TIMEOUT = 5.0  # the node asks every worker (ASK_TIMEOUT each) before it answers


class WorkerLink:
    def __init__(
        self,
        gateway: Gateway,
        connect: Connect,
        on_targets: OnTargets,
        counts: Counts | None = None,
        on_events_wanted: OnEventsWanted | None = None,
    ) -> None:
        self.gateway = gateway
        self.connect = connect
        self.on_targets = on_targets
        self.counts = counts
        self.on_events_wanted = on_events_wanted
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._asked: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        gateway.target_states.on_open = self.report_open
        gateway.node_view = self.view

    async def view(self, name: str) -> tuple[int, bytes, bytes]:
        """The node's merged view ``name`` (stats, metrics, prometheus): status, content type, body."""
        if not self.connected.is_set():  # just started, or the node restarts: wait a little
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.connected.wait(), VIEW_TIMEOUT)
        writer = self._writer
        if writer is None or writer.is_closing():
            return 503, b"application/json", b'{"error": "the node is not reachable; try again"}'
        ask = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = self.gateway.loop.create_future()
        self._asked[ask] = future
        writer.write(encode({"op": "view", "view": name, "ask": ask}))
        try:
            answer = await asyncio.wait_for(future, VIEW_TIMEOUT)
        except (TimeoutError, asyncio.CancelledError):
            return 503, b"application/json", b'{"error": "the node did not answer in time; try again"}'
        finally:
            self._asked.pop(ask, None)
        return int(answer["status"]), str(answer["type"]).encode(), str(answer["body"]).encode()

    def send_events(self, events: list[dict[str, Any]]) -> None:
        """A batch of request events for the node (lost if the link is down: they are a live view)."""
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(encode({"op": "events", "events": events}))

    def report_open(self, key: str, seconds: float) -> None:
        """A target circuit opened in this worker: the node tells the others (a hint, bounded)."""
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(encode({"op": "circuit", "key": key, "seconds": seconds}))

    def start(self) -> None:
        self._task = self.gateway.loop.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        delay = 0.05
        while True:
            try:
                reader, writer = await self.connect()
            except OSError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            delay = 0.05
            try:
                writer.write(encode({"op": "hello", "pid": os.getpid()}))
                self._writer = writer
                self.connected.set()
                await self._serve(reader, writer)
            except (OSError, FrameError) as exc:
                log.warning("the link to the node broke (%s); reconnecting", exc)
            finally:
                self._writer = None
                self.connected.clear()
                writer.close()
                for future in self._asked.values():
                    future.cancel()
            await asyncio.sleep(delay)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            message = await read_frame(reader)
            if message is None:
                return
            if "answer" in message:  # the node's answer to a view this worker asked for
                future = self._asked.get(message["answer"])
                if future is not None and not future.done():
                    future.set_result(message)
                continue
            try:
                reply = self.handle(message)
            except Exception:
                log.exception("a message from the node failed: %s", message.get("op"))
                reply = {"error": "failed"}
            if "id" in message:
                writer.write(encode({"id": message["id"], **reply}))

    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        op = message.get("op")
        if op == "health":
            self.apply_health(message["states"])
            return {}
        if op == "targets":
            upstreams = message["upstreams"]
            self.on_targets({name: [(str(u), int(w)) for u, w in found] for name, found in upstreams.items()})
            return {}
        if op == "circuit":
            self.gateway.target_states.hint(
                str(message["key"]), float(message["seconds"]), str(message["origin"]), time.monotonic()
            )
            return {}
        if op == "snapshot":
            return {"pid": os.getpid(), "upstreams": upstreams_view(self.gateway)}
        if op == "metrics":
            return self.metrics()
        if op == "events_wanted":
            if self.on_events_wanted is not None:
                self.on_events_wanted(bool(message["on"]))
            return {}
        if op == "reset":
            return {"reset": reset_circuits(self.gateway, message["upstream"], message.get("target"))}
        if op == "cache-purge":
            from apigate.policies.cache.purge import apply_purge, parse_notice

            return {"purged": apply_purge(parse_notice(message["purge"]))}
        return {"error": f"unknown op {op!r}"}

    def metrics(self) -> dict[str, Any]:
        """This worker's counts, connections and upstream states, for the node to merge."""
        gateway = self.gateway
        answer: dict[str, Any] = {
            "pid": os.getpid(),
            "meters": gateway.meters.export(),
            "connections_open": len(gateway.connections),
            "requests_in_flight": sum(1 for conn in gateway.connections if not conn.idle()),
            "upstreams": upstreams_view(gateway),
        }
        if self.counts is not None:
            answer.update(self.counts())
        return answer

    def apply_health(self, states: dict[str, dict[str, Any]]) -> None:
        """The active checks' verdicts, by target key."""
        target_states = self.gateway.target_states
        for key, verdict in states.items():
            state = target_states.state_for(key)
            state.healthy = bool(verdict["healthy"])
            state.health_detail = verdict.get("detail")


def _groups(gateway: Gateway) -> list[UpstreamGroup]:
    return list(gateway.plan.upstreams)


def upstreams_view(gateway: Gateway) -> list[dict[str, Any]]:
    """This worker's upstreams: balancer, targets with their state, the upstream's circuit."""
    now = time.monotonic()
    view = []
    for group in _groups(gateway):
        item: dict[str, Any] = {
            "name": group.name,
            "balancer": group.balancer.name,
            "targets": [
                {"key": t.state.key, "address": t.address, "weight": t.weight, **t.state.describe(now)}
                for t in group.targets
            ],
        }
        if group.breaker is not None:
            item["circuit"] = group.breaker.describe(now)
        view.append(item)
    return view


def reset_circuits(gateway: Gateway, upstream: str, target: str | None) -> int:
    """Close the circuits (and end the ejections) of ``upstream``, or of one of its targets
    (``target``: its address as /api/services shows it); returns how many were reset."""
    now = time.monotonic()
    count = 0
    for group in _groups(gateway):
        if group.name != upstream:
            continue
        if target is None and group.breaker is not None:
            group.breaker.reset(now)
            count += 1
        for item in group.targets:
            if target is not None and item.address != target:
                continue
            if item.state.breaker is not None:
                item.state.breaker.reset(now)
            item.state.return_now()
            count += 1
    return count
