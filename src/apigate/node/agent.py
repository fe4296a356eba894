"""The node agent: runs once per node (in the supervisor's agent process, or inside the only
worker), and does what must not run once per worker.

- Active health checks: each target is probed by this one checker; every verdict is pushed to
  every worker, and a worker that connects (or reconnects) gets the whole table first.
- Discovery: the targets of upstreams that name a ``service`` (registered over the admin API, or
  written to Redis by the services themselves) or a ``dns`` name; every change is pushed to every
  worker, which compiles its plan again (nothing restarts, no connection drops).
- Usage analytics: the periodic rollup, and the store the admin API reads usage from (usage.py).
- The admin listener's answers: it asks every worker for its view (in flight, ejections,
  circuits) and merges them, and sends a circuit reset to every worker.
- Request events: workers send them while someone listens; the node streams them to /api/events
  listeners and to a Redis stream (events.py).
- Metrics: it asks every worker for its counts and merges them (observe/metrics.py), for the
  admin listener and for a worker that serves /stats or /metrics on the proxy listener.

Workers connect over a Unix socket (node/frames.py); a worker that does not answer within
``ASK_TIMEOUT`` is left out of an answer, which says how many workers answered.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Coroutine
from typing import Any, Final

import orjson

from apigate.config.compile import target_key
from apigate.config.models import GatewayConfig
from apigate.config.upstreams import UpstreamConfig
from apigate.discovery.dns import DnsQuery, DnsWatcher, Endpoint
from apigate.discovery.networks import resolve_allowed
from apigate.discovery.registry import Entry, RedisServiceSource, Registration, ServiceRegistry, admit
from apigate.health.active import ActiveChecker, ProbeTarget, TargetHealth
from apigate.node.events import EventHub
from apigate.node.frames import FrameError, encode, read_frame
from apigate.node.usage import NodeUsage
from apigate.observe.metrics import CONTENT_TYPE, Merged, json_view, merge, pactown_stats, prometheus_text
from apigate.state import StateBackend, open_state
from apigate.state.base import Subscription
from apigate.store.roles.usage import UsageStore

log = logging.getLogger("apigate")

ASK_TIMEOUT: Final = 2.0
HINT_EVERY: Final = 1.0  # at most one circuit hint per target this often, from a node or to Redis
CIRCUITS_CHANNEL: Final = "circuits"
EXPIRE_EVERY: Final = 1.0  # registrations whose heartbeats stopped leave within this of their ttl
_STATE_RANK: Final = {"closed": 0, "half_open": 1, "open": 2}


class _Worker:
    def __init__(self, writer: asyncio.StreamWriter, pid: int) -> None:
        self.writer = writer
        self.pid = pid
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}


class NodeAgent:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.workers: set[_Worker] = set()
        self.health: dict[str, dict[str, Any]] = {}  # target key -> {"healthy", "detail"}
        self.checker = ActiveChecker(self._health_changed)
        self._ids = itertools.count(1)
        self.discovered: dict[str, list[tuple[str, int]]] = {}  # upstream -> (url, weight) targets
        self.registry = ServiceRegistry(config.discovery.allowed_networks, on_change=self._service_changed)
        self.redis_source: RedisServiceSource | None = None
        self._redis_entries: dict[str, list[Entry]] = {}
        self._dns: dict[str, DnsWatcher] = {}
        self._expiry: asyncio.Task[None] | None = None
        self._redis_settings: tuple[str, str, float] | None = None  # what the Redis poller reads
        self._redis_poll: asyncio.Task[None] | None = None
        self._hints_url: str | None = None  # where circuit hints are shared (a Redis state.url)
        self.node_id = secrets.token_hex(6)
        self._hinted: dict[str, float] = {}  # target key -> when a hint about it last went out
        self._hints: StateBackend | None = None  # Redis, when other nodes share circuit hints
        self._hints_subscription: Subscription | None = None
        self.usage = NodeUsage(config)
        self.events = EventHub(self._events_wanted)

    # -- config ----------------------------------------------------------------------------------
    def apply(self, config: GatewayConfig) -> None:
        """Probe and discover what ``config`` asks for (probes and DNS names that stay keep their
        state; registrations stay)."""
        self.config = config
        self.registry.set_allowed(config.discovery.allowed_networks)
        if self.redis_source is not None:  # its next poll admits and drops by the new list
            self.redis_source.set_allowed(config.discovery.allowed_networks)
        self._follow_dns(config)
        for name, upstream in config.upstreams.items():
            if upstream.service is not None:
                self._set_targets(name, self._service_targets(upstream))
        for name in [n for n in self.discovered if not getattr(config.upstreams.get(n), "discovered", False)]:
            del self.discovered[name]
        self._probe(config)
        if self._expiry is None:
            self._expiry = asyncio.get_running_loop().create_task(self._expire_registrations())
        self._follow_redis(config)
        self._follow_hints(config)
        self.usage.apply(config)
        self.events.configure(config.events)

    def _follow_redis(self, config: GatewayConfig) -> None:
        """Read registrations from the Redis the config names (a reload may change or drop it:
        what the old one held leaves with it)."""
        redis = config.discovery.redis
        wanted = None if redis is None else (redis.url, redis.prefix, redis.poll_interval)
        if wanted == self._redis_settings:
            return
        self._redis_settings = wanted
        if self._redis_poll is not None:
            self._redis_poll.cancel()
            self._redis_poll = None
        if self.redis_source is not None:
            _in_background(self.redis_source.close())
            self.redis_source = None
        held, self._redis_entries = self._redis_entries, {}
        for service in held:
            self._service_changed(service)
        if redis is not None:
            self.redis_source = RedisServiceSource(redis.url, config.discovery.allowed_networks, redis.prefix)
            self._redis_poll = asyncio.get_running_loop().create_task(self._poll_redis(redis.poll_interval))

    def _follow_hints(self, config: GatewayConfig) -> None:
        """Share circuit hints through the config's Redis state backend, when an upstream shares."""
        sharing = any(
            u.circuit_breaker is not None and u.circuit_breaker.share for u in config.upstreams.values()
        )
        url = config.state.url if sharing and config.state.url.startswith("redis") else None
        if url == self._hints_url:
            return
        self._hints_url = url
        _in_background(self._stop_hints())
        if url is not None:
            _in_background(self._share_hints(url))

    def _probe(self, config: GatewayConfig) -> None:
        probes = []
        for name, upstream in config.upstreams.items():
            active = upstream.health.active
            if active is None:
                continue
            settings = active.settings()
            urls = (
                [u for u, _ in self.discovered.get(name, ())]
                if upstream.discovered
                else [t.url for t in upstream.targets]
            )
            probes.extend(ProbeTarget(target_key(name, url), url, settings) for url in urls)
        self.checker.set_targets(probes)
        known = {probe.key for probe in probes}
        for key in [k for k in self.health if k not in known]:
            del self.health[key]
        if probes and not self.checker.running:
            self.checker.start()

    # -- discovery -------------------------------------------------------------------------------
    def _set_targets(self, upstream: str, targets: list[tuple[str, int]]) -> None:
        targets = sorted(set(targets))
        if self.discovered.get(upstream) == targets:
            return
        self.discovered[upstream] = targets
        log.info("upstream %s: %d discovered target(s)", upstream, len(targets))
        self.broadcast({"op": "targets", "upstreams": {upstream: targets}})
        self._probe(self.config)

    def _follow_dns(self, config: GatewayConfig) -> None:
        wanted: dict[str, DnsQuery] = {
            name: upstream.dns.query()
            for name, upstream in config.upstreams.items()
            if upstream.dns is not None
        }
        for name, watcher in list(self._dns.items()):
            if wanted.get(name) != watcher.query:
                del self._dns[name]
                asyncio.get_running_loop().create_task(watcher.stop())
        for name, query in wanted.items():
            if name not in self._dns:

                def changed(endpoints: list[Endpoint], upstream: str = name) -> None:
                    self._set_targets(upstream, [(_url(e.host, e.port), e.weight) for e in endpoints])

                watcher = self._dns[name] = DnsWatcher(query, changed)
                watcher.start()

    def _service_targets(self, upstream: UpstreamConfig) -> list[tuple[str, int]]:
        entries = self.registry.endpoints(upstream.service or "") + self._redis_entries.get(
            upstream.service or "", []
        )
        return [
            (_url(e.address, e.registration.port, e.registration.scheme), e.registration.weight)
            for e in entries
        ]

    def _service_changed(self, service: str) -> None:
        for name, upstream in self.config.upstreams.items():
            if upstream.service == service:
                self._set_targets(name, self._service_targets(upstream))

    async def register(self, registration: Registration) -> dict[str, Any]:
        """A registration over the admin API: held here, or written to Redis when discovery reads
        registrations from there (every node then sees it). Raises RegistrationError."""
        if self.redis_source is None:
            return (await self.registry.register(registration)).describe()
        loop = asyncio.get_running_loop()
        allowed = self.config.discovery.allowed_networks
        await admit(registration, lambda host, field: resolve_allowed(host, allowed, loop, field))
        await self.redis_source.write(registration)
        await self._read_redis()
        written = [
            e for found in self._redis_entries.values() for e in found if e.id == registration.instance_id
        ]
        return written[0].describe() if written else {"id": registration.instance_id}

    async def heartbeat(self, instance_id: str) -> bool:
        if self.registry.heartbeat(instance_id):
            return True
        if self.redis_source is not None:
            for name, entries in self._redis_entries.items():
                for entry in entries:
                    if entry.id == instance_id:
                        return await self.redis_source.heartbeat(name, instance_id, entry.registration.ttl)
        return False

    async def deregister(self, instance_id: str) -> bool:
        if self.registry.deregister(instance_id):
            return True
        if self.redis_source is not None:
            for name, entries in self._redis_entries.items():
                if any(entry.id == instance_id for entry in entries):
                    found = await self.redis_source.delete(name, instance_id)
                    await self._read_redis()
                    return found
        return False

    def registrations(self) -> list[dict[str, Any]]:
        entries = self.registry.entries() + [e for found in self._redis_entries.values() for e in found]
        return [entry.describe() for entry in entries]

    async def _expire_registrations(self) -> None:
        while True:
            await asyncio.sleep(EXPIRE_EVERY)
            self.registry.expire()

    async def _poll_redis(self, interval: float) -> None:
        while True:
            try:
                await self._read_redis()
            except Exception as exc:  # Redis away: keep what was read last
                log.warning("discovery: reading registrations from Redis failed: %s", exc)
            await asyncio.sleep(interval)

    async def _read_redis(self) -> None:
        assert self.redis_source is not None
        found = await self.redis_source.read()
        changed = {
            name
            for name in found.keys() | self._redis_entries.keys()
            if [e.id for e in found.get(name, [])] != [e.id for e in self._redis_entries.get(name, [])]
        }
        self._redis_entries = found
        for service in changed:
            self._service_changed(service)

    async def stop(self) -> None:
        await self.events.close()
        for task in (self._expiry, self._redis_poll):
            if task is not None:
                task.cancel()
        for watcher in self._dns.values():
            await watcher.stop()
        if self.redis_source is not None:
            await self.redis_source.close()
        await self._stop_hints()
        await self.checker.stop()
        await self.usage.stop()
        for worker in list(self.workers):
            worker.writer.close()

    # -- workers ---------------------------------------------------------------------------------
    async def serve_worker(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One worker's connection, until it closes."""
        worker: _Worker | None = None
        try:
            hello = await read_frame(reader)
            if hello is None or hello.get("op") != "hello":
                return
            worker = _Worker(writer, int(hello.get("pid", 0)))
            self.workers.add(worker)
            if self.discovered:
                writer.write(encode({"op": "targets", "upstreams": self.discovered}))
            if self.health:
                writer.write(encode({"op": "health", "states": self.health}))
            if self.events.wanted:
                writer.write(encode({"op": "events_wanted", "on": True}))
            while True:
                message = await read_frame(reader)
                if message is None:
                    return
                if message.get("op") == "circuit":
                    self._circuit_opened(worker, str(message["key"]), float(message["seconds"]))
                    continue
                if message.get("op") == "events":
                    self.events.publish(message["events"])
                    continue
                if message.get("op") == "view":  # a worker serves /stats or /metrics: merge for it
                    _in_background(self._answer_view(writer, message.get("ask"), str(message.get("view"))))
                    continue
                future = worker.pending.pop(message.get("id", 0), None)
                if future is not None and not future.done():
                    future.set_result(message)
        except (OSError, FrameError, ValueError) as exc:
            log.warning("a worker's link to the node broke: %s", exc)
        finally:
            if worker is not None:
                self.workers.discard(worker)
                for future in worker.pending.values():
                    future.cancel()
            writer.close()

    def broadcast(self, message: dict[str, Any], but: _Worker | None = None) -> None:
        data = encode(message)
        for worker in self.workers:
            if worker is not but:
                worker.writer.write(data)

    def subscribe_events(self) -> asyncio.Queue[dict[str, Any]]:
        return self.events.subscribe()

    def unsubscribe_events(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self.events.unsubscribe(queue)

    def _events_wanted(self, on: bool) -> None:
        """Workers send request events only while someone takes them (observe/events.py)."""
        self.broadcast({"op": "events_wanted", "on": on})

    # -- circuit hints ---------------------------------------------------------------------------
    def _circuit_opened(self, worker: _Worker | None, key: str, seconds: float, origin: str = "") -> None:
        """A target circuit opened in one worker (or, ``origin``, on another node): the others
        open theirs for the rest of its recovery period. At most one hint per target a second
        goes out, so a flapping target cannot flood the workers or Redis."""
        now = time.monotonic()
        if now - self._hinted.get(key, -HINT_EVERY) < HINT_EVERY:
            return
        if len(self._hinted) > 10_000:  # only the last second's matter: keep the table small
            self._hinted = {k: t for k, t in self._hinted.items() if now - t < HINT_EVERY}
        self._hinted[key] = now
        where = origin or f"worker {worker.pid if worker is not None else '?'}"
        self.broadcast({"op": "circuit", "key": key, "seconds": seconds, "origin": where}, but=worker)
        if not origin and self._hints is not None:
            message = orjson.dumps({"node": self.node_id, "key": key, "seconds": seconds})
            _in_background(self._hints.publish(CIRCUITS_CHANNEL, message))

    def _hint_heard(self, message: bytes | None) -> None:
        if message is None:  # (re)subscribed, or the subscription was lost: nothing to do
            return
        try:
            hint = orjson.loads(message)
            if hint["node"] != self.node_id:
                self._circuit_opened(None, str(hint["key"]), float(hint["seconds"]), f"node {hint['node']}")
        except (ValueError, KeyError, TypeError):
            log.warning("a circuit hint from Redis was not understood")

    async def _share_hints(self, url: str) -> None:
        hints = self._hints = open_state(url)
        await hints.open()
        subscription = await hints.subscribe(CIRCUITS_CHANNEL, self._hint_heard)
        if self._hints is hints:
            self._hints_subscription = subscription
        else:  # a reload stopped sharing meanwhile
            await subscription.close()
            await hints.close()

    async def _stop_hints(self) -> None:
        subscription, self._hints_subscription = self._hints_subscription, None
        hints, self._hints = self._hints, None
        if subscription is not None:
            await subscription.close()
        if hints is not None:
            await hints.close()

    async def ask_all(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """Every worker's answer to ``message`` (those that answer within ASK_TIMEOUT)."""
        loop = asyncio.get_running_loop()
        waits = []
        asked: list[tuple[_Worker, int]] = []
        for worker in list(self.workers):
            request_id = next(self._ids)
            future: asyncio.Future[dict[str, Any]] = loop.create_future()
            worker.pending[request_id] = future
            worker.writer.write(encode({**message, "id": request_id}))
            waits.append(future)
            asked.append((worker, request_id))
        if not waits:
            return []
        done, pending = await asyncio.wait(waits, timeout=ASK_TIMEOUT)
        for future in pending:
            future.cancel()
        for worker, request_id in asked:  # a worker that never answered keeps no waiting entry
            worker.pending.pop(request_id, None)
        return [f.result() for f in done if not f.cancelled() and f.exception() is None]

    def _health_changed(self, key: str, health: TargetHealth) -> None:
        verdict = {"healthy": health.healthy, "detail": health.describe()}
        self.health[key] = verdict
        self.broadcast({"op": "health", "states": {key: verdict}})

    # -- what the admin listener shows -------------------------------------------------------------
    async def services(self) -> dict[str, Any]:
        answers = await self.ask_all({"op": "snapshot"})
        return {
            "workers": len(answers),
            "upstreams": merge_upstreams(answers, self.health),
            "registered": self.registrations(),
        }

    async def circuits(self) -> dict[str, Any]:
        upstreams = (await self.services())["upstreams"]
        circuits = []
        for upstream in upstreams:
            if upstream.get("circuit") is not None:
                circuits.append({"upstream": upstream["name"], "target": None, **upstream["circuit"]})
            for target in upstream["targets"]:
                if target.get("circuit") is not None:
                    where = {"upstream": upstream["name"], "target": target["address"]}
                    circuits.append({**where, **target["circuit"]})
        return {"circuits": circuits}

    async def metrics(self) -> Merged:
        """Every worker's counts and upstream states, merged."""
        answers = await self.ask_all({"op": "metrics"})
        merged = merge(answers)
        merged.upstreams = merge_upstreams(answers, self.health)
        return merged

    async def view(self, name: str) -> tuple[str, str]:
        """The merged view ``name`` (stats, metrics or prometheus): its content type and text."""
        merged = await self.metrics()
        settings = self.config.metrics
        if name == "prometheus":
            return CONTENT_TYPE, prometheus_text(merged, settings.namespace).decode()
        if name == "stats":
            return "application/json", orjson.dumps(pactown_stats(merged)).decode()
        return "application/json", orjson.dumps(json_view(merged, settings.top_clients)).decode()

    async def _answer_view(self, writer: asyncio.StreamWriter, ask: Any, name: str) -> None:
        try:
            content_type, body = await self.view(name)
            answer = {"answer": ask, "status": 200, "type": content_type, "body": body}
        except Exception:
            log.exception("merging the workers' metrics failed")
            answer = {"answer": ask, "status": 500, "type": "application/json", "body": '{"error": "failed"}'}
        if not writer.is_closing():
            writer.write(encode(answer))

    async def reset(self, upstream: str, target: str | None) -> dict[str, Any]:
        answers = await self.ask_all({"op": "reset", "upstream": upstream, "target": target})
        return {"workers": len(answers), "reset": sum(int(a.get("reset", 0)) for a in answers)}

    async def cache_purge(self, notice: dict[str, Any]) -> dict[str, Any]:
        """Every worker drops the cache entries ``notice`` names (policies/cache/purge.py) from its
        memory store and its hot copies of Redis."""
        answers = await self.ask_all({"op": "cache-purge", "purge": notice})
        purged = sum(int(a.get("purged", 0)) for a in answers if "error" not in a)
        return {"workers": sum(1 for a in answers if "error" not in a), "purged": purged}

    async def usage_store(self) -> UsageStore:
        return await self.usage.store()

    def upstream_names(self) -> set[str]:
        return set(self.config.upstreams)

    def health_summary(self) -> dict[str, Any]:
        """Each upstream's status and response time from the active checks, and the node's overall."""
        services: dict[str, Any] = {}
        for name, upstream in self.config.upstreams.items():
            verdicts = [self.health.get(target_key(name, t.url)) for t in upstream.targets]
            known = [v for v in verdicts if v is not None]
            if upstream.health.active is None:
                services[name] = {"status": "unchecked"}
                continue
            healthy = sum(1 for v in known if v["healthy"]) + (len(verdicts) - len(known))
            latencies = [v["detail"].get("last_latency") for v in known if v["detail"].get("last_latency")]
            services[name] = {
                "status": "healthy" if healthy == len(verdicts) else "degraded" if healthy else "unhealthy",
                "healthy_targets": healthy,
                "targets": len(verdicts),
                "response_time_ms": round(min(latencies) * 1000, 3) if latencies else None,
            }
        statuses = {s["status"] for s in services.values()}
        overall = next((s for s in ("unhealthy", "degraded") if s in statuses), "healthy")
        return {"status": overall, "checked_at": time.time(), "services": services}


def merge_upstreams(answers: list[dict[str, Any]], health: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One view of every upstream from the workers' own: requests in flight are summed; a target is
    ejected if any worker ejected it; a circuit shows its worst state and each worker's."""
    merged: dict[str, dict[str, Any]] = {}
    for answer in answers:
        pid = answer.get("pid")
        for upstream in answer.get("upstreams", []):
            item = merged.setdefault(
                upstream["name"],
                {"name": upstream["name"], "balancer": upstream["balancer"], "targets": {}, "circuits": []},
            )
            if "circuit" in upstream:
                item["circuits"].append({"worker": pid, **upstream["circuit"]})
            for target in upstream["targets"]:
                _merge_target(item["targets"], target, pid)
    result = []
    for item in merged.values():
        targets = list(item.pop("targets").values())
        for target in targets:
            verdict = health.get(target["key"])
            target["healthy"] = verdict["healthy"] if verdict is not None else True
            if verdict is not None:
                target["active_check"] = verdict["detail"]
            if target["circuits"]:
                target["circuit"] = _worst(target["circuits"])
            else:
                del target["circuits"]
        circuits = item.pop("circuits")
        if circuits:
            item["circuit"] = _worst(circuits)
        item["targets"] = targets
        result.append(item)
    return result


def _merge_target(targets: dict[str, dict[str, Any]], target: dict[str, Any], pid: Any) -> None:
    seen = targets.get(target["key"])
    if seen is None:
        seen = targets[target["key"]] = {
            "key": target["key"],
            "address": target["address"],
            "weight": target["weight"],
            "in_flight": 0,
            "ejected": False,
            "ejections": 0,
            "consecutive_failures": 0,
            "circuits": [],
        }
    seen["in_flight"] += target["in_flight"]
    seen["ejected"] = seen["ejected"] or target["ejected"]
    seen["ejections"] = max(seen["ejections"], target["ejections"])
    seen["consecutive_failures"] = max(seen["consecutive_failures"], target["consecutive_failures"])
    if target.get("latency_ms"):
        seen["latency_ms"] = max(seen.get("latency_ms", 0.0), target["latency_ms"])
    if "circuit" in target:
        seen["circuits"].append({"worker": pid, **target["circuit"]})


def _worst(circuits: list[dict[str, Any]]) -> dict[str, Any]:
    worst = max(circuits, key=lambda c: _STATE_RANK.get(c["state"], 0))
    return {
        "state": worst["state"],
        "failures": sum(c["failures"] for c in circuits),
        "reason": worst.get("reason"),
        "changed_seconds_ago": worst.get("changed_seconds_ago"),
        "workers": circuits,
    }


def _url(host: str, port: int, scheme: str = "http") -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _in_background(work: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(work)
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)
    task.add_done_callback(_log_failure)


_RUNNING: set[asyncio.Task[None]] = set()  # background work of the agent, kept until it ends


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("the node's work with Redis failed: %s", task.exception())
