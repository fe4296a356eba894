"""The node's view of every worker's counts: merged, then shown as JSON and Prometheus text.

Each worker exports its meters (engine/metrics.py) when the node asks; ``merge`` adds them up
(counts, histogram buckets and sketch buckets add; a latency window keeps the slots of the last
minute). The Prometheus text is rendered by the official client library from a custom
collector over the merged counts, so its format is the library's, not ours.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from apigate.engine.breakers import STATE_NAMES
from apigate.engine.metrics import (
    LATENCY_BOUNDS,
    RELATIVE_ERROR,
    SIZE_BOUNDS,
    TOP_SLOT,
    TOP_SLOTS,
    WINDOW_SLOT,
    WINDOW_SLOTS,
    sketch_value,
)

PERCENTILES = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))
_CIRCUIT_CODES = {name: code for code, name in enumerate(STATE_NAMES)}  # closed 0, half_open 1, open 2
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_WEBHOOK_FIELDS = ("received", "duplicates", "delivered", "failed", "backlog", "dead_letters")


@dataclass
class MergedHistogram:
    counts: list[int]
    total: float = 0.0

    def add(self, exported: dict[str, Any]) -> None:
        for index, count in enumerate(exported["counts"]):
            self.counts[index] += count
        self.total += exported["sum"]


@dataclass
class MergedSketch:
    total: dict[int, int] = field(default_factory=dict)
    recent: dict[int, int] = field(default_factory=dict)  # the last minute's slots

    def add(self, exported: dict[str, Any], current_epoch: int) -> None:
        _add_pairs(self.total, exported["total"])
        for epoch, pairs in exported["slots"]:
            if current_epoch - WINDOW_SLOTS < epoch <= current_epoch:
                _add_pairs(self.recent, pairs)

    def view(self) -> dict[str, dict[str, Any]]:
        return {"since_start": _percentiles(self.total), "last_minute": _percentiles(self.recent)}


@dataclass
class MergedRoute:
    counts: dict[tuple[int, str], int] = field(default_factory=dict)  # (status, method) -> requests
    duration: MergedHistogram = field(
        default_factory=lambda: MergedHistogram([0] * (len(LATENCY_BOUNDS) + 1))
    )
    request_size: MergedHistogram = field(
        default_factory=lambda: MergedHistogram([0] * (len(SIZE_BOUNDS) + 1))
    )
    response_size: MergedHistogram = field(
        default_factory=lambda: MergedHistogram([0] * (len(SIZE_BOUNDS) + 1))
    )
    latency: MergedSketch = field(default_factory=MergedSketch)
    rate_limited: int = 0
    retries: int = 0
    auth_failures: dict[str, int] = field(default_factory=dict)

    def add(self, exported: dict[str, Any], current_epoch: int) -> None:
        for status, method, count in exported["counts"]:
            self.counts[(status, method)] = self.counts.get((status, method), 0) + count
        self.duration.add(exported["duration"])
        self.request_size.add(exported["request_size"])
        self.response_size.add(exported["response_size"])
        self.latency.add(exported["latency"], current_epoch)
        self.rate_limited += exported["rate_limited"]
        self.retries += exported["retries"]
        _add_counts(self.auth_failures, exported["auth_failures"])

    @property
    def requests(self) -> int:
        return sum(self.counts.values())

    def responses(self) -> dict[str, int]:
        classes: dict[str, int] = {}
        for (status, _method), count in self.counts.items():
            name = f"{status // 100}xx"
            classes[name] = classes.get(name, 0) + count
        return dict(sorted(classes.items()))

    def view(self) -> dict[str, Any]:
        responses = self.responses()
        return {
            "requests": self.requests,
            "requests_last_minute": sum(self.latency.recent.values()),
            "responses": responses,
            "errors": responses.get("5xx", 0),
            "rate_limited": self.rate_limited,
            "auth_failures": sum(self.auth_failures.values()),
            "retries": self.retries,
            "latency_ms": self.latency.view(),
        }


@dataclass
class MergedTarget:
    seconds: MergedHistogram = field(default_factory=lambda: MergedHistogram([0] * (len(LATENCY_BOUNDS) + 1)))
    latency: MergedSketch = field(default_factory=MergedSketch)

    def add(self, exported: dict[str, Any], current_epoch: int) -> None:
        self.seconds.add(exported["seconds"])
        self.latency.add(exported["latency"], current_epoch)


@dataclass
class MergedWebhooks:
    received: dict[tuple[str, str], int] = field(default_factory=dict)  # (source, outcome)
    deliveries: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (source, dest., outcome)
    backlog: list[list[Any]] = field(default_factory=list)  # [source, destination, state, count]
    counted_at: float = -1.0

    def add(self, exported: dict[str, Any]) -> None:
        for source, outcome, count in exported["received"]:
            self.received[(source, outcome)] = self.received.get((source, outcome), 0) + count
        for source, destination, outcome, count in exported["deliveries"]:
            key = (source, destination, outcome)
            self.deliveries[key] = self.deliveries.get(key, 0) + count
        # Every worker counts the same store: the latest count is the one shown, never a sum.
        if exported["counted_at"] > self.counted_at:
            self.backlog, self.counted_at = exported["backlog"], exported["counted_at"]

    def view(self) -> dict[str, Any]:
        sources: dict[str, dict[str, int]] = {}

        def source(name: str) -> dict[str, int]:
            return sources.setdefault(name, dict.fromkeys(_WEBHOOK_FIELDS, 0))

        for (name, outcome), count in self.received.items():
            source(name)["received" if outcome == "accepted" else "duplicates"] += count
        for (name, _destination, outcome), count in self.deliveries.items():
            source(name)[outcome] += count
        for name, _destination, state, count in self.backlog:
            source(name)["backlog" if state == "pending" else "dead_letters"] += count
        return {
            "received": sum(s["received"] + s["duplicates"] for s in sources.values()),
            "sources": dict(sorted(sources.items())),
        }


@dataclass
class Merged:
    """Every worker's counts added up, as the node saw them at ``taken_at``."""

    workers: int = 0
    started_at: float = 0.0
    requests_total: int = 0
    timeouts: int = 0
    connections_open: int = 0
    requests_in_flight: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    routes: dict[str, MergedRoute] = field(default_factory=dict)
    unrouted: MergedRoute = field(default_factory=MergedRoute)
    targets: dict[tuple[str, str], MergedTarget] = field(default_factory=dict)
    top: dict[str, dict[str, int]] = field(default_factory=lambda: {"ip": {}, "consumer": {}})
    consumers: dict[str, int] = field(default_factory=dict)
    upstreams: list[dict[str, Any]] = field(default_factory=list)  # merged states (node/agent.py)
    counters: dict[str, int] = field(default_factory=dict)  # observers' counts (lines dropped, ...)
    gauges: dict[str, int] = field(default_factory=dict)  # what services hold now (limit keys, ...)
    # What the transform policy did with bodies: (route, direction, outcome) -> bodies.
    transform_bodies: dict[tuple[str, str, str], int] = field(default_factory=dict)
    webhooks: MergedWebhooks = field(default_factory=MergedWebhooks)
    taken_at: float = field(default_factory=time.time)

    def all_routes(self) -> Iterator[tuple[str, MergedRoute]]:
        yield from self.routes.items()
        if self.unrouted.counts:
            yield "", self.unrouted


def merge(answers: list[dict[str, Any]], now: float | None = None) -> Merged:
    """Add up the workers' answers to the node's ``metrics`` question; ``now`` is monotonic time
    (the windows' clock, the same in every process of the machine)."""
    now = time.monotonic() if now is None else now
    epoch = int(now / WINDOW_SLOT)
    top_epoch = int(now / TOP_SLOT)
    merged = Merged()
    starts = []
    answers = [answer for answer in answers if "meters" in answer]  # (a worker that failed to answer)
    merged.workers = len(answers)
    for answer in answers:
        meters = answer["meters"]
        starts.append(meters["started_at"])
        merged.requests_total += meters["requests_total"]
        merged.timeouts += meters["timeouts"]
        merged.connections_open += answer.get("connections_open", 0)
        merged.requests_in_flight += answer.get("requests_in_flight", 0)
        _add_counts(merged.errors, meters["errors"])
        _add_counts(merged.consumers, meters["consumers"])
        _add_counts(merged.counters, answer.get("counters", {}))
        _add_counts(merged.gauges, answer.get("gauges", {}))
        for route, direction, outcome, count in answer.get("transform_bodies", ()):
            key = (route, direction, outcome)
            merged.transform_bodies[key] = merged.transform_bodies.get(key, 0) + count
        if "webhooks" in answer:
            merged.webhooks.add(answer["webhooks"])
        for name, route in meters["routes"].items():
            merged.routes.setdefault(name, MergedRoute()).add(route, epoch)
        merged.unrouted.add(meters["unrouted"], epoch)
        for upstream, address, target in meters["targets"]:
            merged.targets.setdefault((upstream, address), MergedTarget()).add(target, epoch)
        for kind, slots in meters["top"].items():
            for slot_epoch, counts in slots:
                if top_epoch - TOP_SLOTS < slot_epoch <= top_epoch:
                    _add_counts(merged.top.setdefault(kind, {}), counts)
    merged.started_at = min(starts, default=time.time())
    return merged


def json_view(merged: Merged, top_clients: int = 10) -> dict[str, Any]:
    """The JSON document of /metrics and /api/metrics (docs/observability.md shows it)."""
    responses: dict[str, int] = {}
    rate_limited = auth_failures = retries = 0
    for _name, route in merged.all_routes():
        _add_counts(responses, route.responses())
        rate_limited += route.rate_limited
        auth_failures += sum(route.auth_failures.values())
        retries += route.retries
    upstreams: dict[str, dict[str, Any]] = {}
    for (upstream, address), target in sorted(merged.targets.items()):
        item = upstreams.setdefault(upstream, {"latency": MergedSketch(), "targets": {}})
        for part in ("total", "recent"):
            _add_counts(getattr(item["latency"], part), getattr(target.latency, part))
        item["targets"][address] = {
            "requests": sum(target.seconds.counts),
            "latency_ms": target.latency.view(),
        }
    return {
        "started_at": datetime.fromtimestamp(merged.started_at, UTC).isoformat(),
        "uptime_seconds": round(merged.taken_at - merged.started_at, 3),
        "workers": merged.workers,
        "window_seconds": WINDOW_SLOT * WINDOW_SLOTS,
        "sketch_relative_error": RELATIVE_ERROR,
        "requests_total": merged.requests_total,
        "errors": sum(merged.errors.values()),
        "errors_by_type": dict(sorted(merged.errors.items())),
        "rate_limited": rate_limited,
        "auth_failures": auth_failures,
        "retries": retries,
        "timeouts": merged.timeouts,
        "responses": dict(sorted(responses.items())),
        "connections_open": merged.connections_open,
        "requests_in_flight": merged.requests_in_flight,
        "routes": {name: route.view() for name, route in sorted(merged.routes.items())},
        "unrouted": merged.unrouted.view(),
        "upstreams": {
            name: {"latency_ms": item["latency"].view(), "targets": item["targets"]}
            for name, item in upstreams.items()
        },
        "top_clients": {kind: _top(counts, top_clients) for kind, counts in sorted(merged.top.items())},
        "webhooks": merged.webhooks.view(),
        "counters": dict(sorted(merged.counters.items())),
        "gauges": dict(sorted(merged.gauges.items())),
        "transform_bodies": _transform_bodies(merged.transform_bodies),
    }


def _transform_bodies(counts: dict[tuple[str, str, str], int]) -> dict[str, dict[str, dict[str, int]]]:
    """{route: {direction: {outcome: bodies}}}, sorted."""
    view: dict[str, dict[str, dict[str, int]]] = {}
    for (route, direction, outcome), count in sorted(counts.items()):
        view.setdefault(route, {}).setdefault(direction, {})[outcome] = count
    return view


def pactown_stats(merged: Merged) -> dict[str, Any]:
    """/stats: the fields Pactown gateway users read, merged across workers, and a few more."""
    view = json_view(merged, 0)
    counters = merged.counters
    return {
        "requests_total": merged.requests_total,
        "requests_cached": counters.get("requests_cached", 0),
        "requests_rate_limited": view["rate_limited"],
        "webhooks_received": view["webhooks"]["received"],
        "errors": view["errors"],
        "started_at": view["started_at"],
        "cache_size": merged.gauges.get("cache_size", 0),
        "rate_limit_keys": merged.gauges.get("rate_limit_keys", 0),
        "responses": view["responses"],
        "retries": view["retries"],
        "timeouts": merged.timeouts,
        "routes": {name: route["requests"] for name, route in view["routes"].items()},
        "connections_open": merged.connections_open,
        "requests_in_flight": merged.requests_in_flight,
        "workers": merged.workers,
        "uptime_seconds": view["uptime_seconds"],
    }


class MergedCollector(Collector):
    """The merged counts as Prometheus metric families (names in docs/observability.md)."""

    def __init__(self, merged: Merged, namespace: str) -> None:
        self.merged = merged
        self.prefix = f"{namespace}_"

    def collect(self) -> Iterator[Metric]:
        merged, p = self.merged, self.prefix
        requests = CounterMetricFamily(
            f"{p}requests_total", "Requests answered", labels=["route", "method", "status"]
        )
        duration = HistogramMetricFamily(
            f"{p}request_duration_seconds", "Time from the request head to the last byte", labels=["route"]
        )
        request_size = HistogramMetricFamily(f"{p}request_size_bytes", "Request body bytes", labels=["route"])
        response_size = HistogramMetricFamily(
            f"{p}response_size_bytes", "Response body bytes", labels=["route"]
        )
        rate_limited = CounterMetricFamily(
            f"{p}rate_limited_total", "Requests refused by a limit", labels=["route"]
        )
        auth = CounterMetricFamily(
            f"{p}auth_failures_total", "Requests refused by authentication", labels=["route", "reason"]
        )
        retries = CounterMetricFamily(f"{p}retries_total", "Upstream attempts retried", labels=["route"])
        for name, route in merged.all_routes():
            for (status, method), count in sorted(route.counts.items()):
                requests.add_metric([name, method, str(status)], count)
            duration.add_metric([name], _buckets(LATENCY_BOUNDS, route.duration), route.duration.total)
            request_size.add_metric(
                [name], _buckets(SIZE_BOUNDS, route.request_size), route.request_size.total
            )
            response_size.add_metric(
                [name], _buckets(SIZE_BOUNDS, route.response_size), route.response_size.total
            )
            rate_limited.add_metric([name], route.rate_limited)
            retries.add_metric([name], route.retries)
            for reason, count in sorted(route.auth_failures.items()):
                auth.add_metric([name, reason], count)
        yield from (requests, duration, request_size, response_size, rate_limited, auth, retries)
        upstream_latency = HistogramMetricFamily(
            f"{p}upstream_latency_seconds",
            "Time from choosing a target to its response's first byte",
            labels=["upstream", "target"],
        )
        for (upstream, address), target in sorted(merged.targets.items()):
            upstream_latency.add_metric(
                [upstream, address], _buckets(LATENCY_BOUNDS, target.seconds), target.seconds.total
            )
        yield upstream_latency
        errors = CounterMetricFamily(
            f"{p}errors_total", "Errors the gateway answered itself", labels=["type"]
        )
        for kind, count in sorted(merged.errors.items()):
            errors.add_metric([kind], count)
        yield errors
        yield from self._states()
        yield from self._webhooks()
        yield _labelled_counter(
            f"{p}transform_bodies",
            "Bodies the transform policy mapped, converted or let through, by outcome",
            ["route", "direction", "outcome"],
            merged.transform_bodies,
        )
        yield GaugeMetricFamily(
            f"{p}connections_open", "Client connections open", value=merged.connections_open
        )
        yield GaugeMetricFamily(
            f"{p}requests_in_flight", "Requests being served", value=merged.requests_in_flight
        )
        yield GaugeMetricFamily(f"{p}workers", "Worker processes that answered", value=merged.workers)
        if merged.consumers:
            consumers = CounterMetricFamily(
                f"{p}consumer_requests_total", "Requests by consumer", labels=["consumer"]
            )
            for consumer, count in sorted(merged.consumers.items()):
                consumers.add_metric([consumer], count)
            yield consumers
        for name, count in sorted(merged.counters.items()):
            yield CounterMetricFamily(f"{p}{name}_total", name.replace("_", " ").capitalize(), value=count)
        for name, value in sorted(merged.gauges.items()):
            yield GaugeMetricFamily(f"{p}{name}", name.replace("_", " ").capitalize(), value=value)

    def _webhooks(self) -> Iterator[Metric]:
        p, webhooks = self.prefix, self.merged.webhooks
        received = CounterMetricFamily(
            f"{p}webhooks_received_total", "Webhook events taken in", labels=["source", "outcome"]
        )
        for (source, outcome), count in sorted(webhooks.received.items()):
            received.add_metric([source, outcome], count)
        deliveries = _labelled_counter(
            f"{p}webhook_deliveries_total",
            "Webhook delivery attempts",
            ["source", "destination", "outcome"],
            webhooks.deliveries,
        )
        labels = ["source", "destination"]
        backlog = GaugeMetricFamily(f"{p}webhook_backlog", "Webhook deliveries waiting", labels=labels)
        dead = GaugeMetricFamily(f"{p}webhook_dead_letters", "Webhook deliveries given up", labels=labels)
        for source, destination, state, count in webhooks.backlog:
            (backlog if state == "pending" else dead).add_metric([source, destination], count)
        yield from (received, deliveries, backlog, dead)

    def _states(self) -> Iterator[Metric]:
        p = self.prefix
        circuits = GaugeMetricFamily(
            f"{p}circuit_state", "Circuit state: 0 closed, 1 half-open, 2 open", labels=["upstream", "target"]
        )
        healthy = GaugeMetricFamily(
            f"{p}target_healthy",
            "1 if the target takes requests (healthy, not ejected)",
            labels=["upstream", "target"],
        )
        for upstream in self.merged.upstreams:
            name = upstream["name"]
            if upstream.get("circuit") is not None:
                circuits.add_metric([name, ""], _CIRCUIT_CODES.get(upstream["circuit"]["state"], 0))
            for target in upstream["targets"]:
                usable = target.get("healthy", True) and not target.get("ejected", False)
                if target.get("circuit") is not None:
                    state = target["circuit"]["state"]
                    circuits.add_metric([name, target["address"]], _CIRCUIT_CODES.get(state, 0))
                    usable = usable and state != "open"
                healthy.add_metric([name, target["address"]], 1 if usable else 0)
        yield circuits
        yield healthy


def _labelled_counter(
    name: str, documentation: str, labels: list[str], counts: dict[Any, int]
) -> CounterMetricFamily:
    """A counter family with one sample per key of ``counts`` (a tuple of label values), sorted."""
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, count in sorted(counts.items()):
        family.add_metric(list(key), count)
    return family


def prometheus_text(merged: Merged, namespace: str) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MergedCollector(merged, namespace))
    return generate_latest(registry)


# -- helpers ---------------------------------------------------------------------------------------
def _add_counts(into: dict[Any, int], counts: dict[Any, int]) -> None:
    for key, count in counts.items():
        into[key] = into.get(key, 0) + count


def _add_pairs(into: dict[int, int], pairs: list[list[int]]) -> None:
    for index, count in pairs:
        into[index] = into.get(index, 0) + count


def _percentiles(counts: dict[int, int]) -> dict[str, Any]:
    """p50/p95/p99 in milliseconds, each the value of rank floor(q x (count - 1)) in ascending
    order, within the sketch's relative error (null when nothing was counted)."""
    total = sum(counts.values())
    view: dict[str, Any] = {"count": total}
    ordered = sorted(counts.items())
    for name, q in PERCENTILES:
        if not total:
            view[name] = None
            continue
        rank = math.floor(q * (total - 1))
        seen = 0
        for index, count in ordered:
            seen += count
            if seen > rank:
                view[name] = round(sketch_value(index) * 1000, 3)
                break
    return view


def _buckets(bounds: tuple[float, ...], histogram: MergedHistogram) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs, +Inf last, as Prometheus histograms count."""
    pairs = []
    running = 0
    for bound, count in zip((*[_le(b) for b in bounds], "+Inf"), histogram.counts, strict=True):
        running += count
        pairs.append((bound, float(running)))
    return pairs


def _le(bound: float) -> str:
    return repr(bound) if bound != int(bound) or bound < 1 else f"{bound:.1f}"


def _top(counts: dict[str, int], limit: int) -> list[dict[str, Any]]:
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit]
    return [{"key": key, "requests": count} for key, count in ranked]
