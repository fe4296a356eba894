"""What one worker counts, in plain native structures: no lock, no label dicts built and no string
formatted per request. The node merges every worker's ``export()`` (observe/metrics.py) and
renders the merged view as Prometheus text and JSON, so whichever process answers shows the
same numbers.

Per request, ``RouteMeter.observe`` adds one to a status count, three fixed-bucket histograms and
a latency sketch; ``TargetMeter.observe`` does the same for an upstream response's latency. Every
count that grows per request is a ``Tally``: a native 64-bit integer that grows in place, where
an element of a list of ints would be a new int object on every step past 256.

Percentiles come from a sketch with relative buckets (as DDSketch, Masson et al., VLDB 2019): a
value v falls in bucket ceil(log_gamma(v)) with gamma = (1 + a) / (1 - a), and each bucket's
estimate is within the relative error a = ``RELATIVE_ERROR`` of every value in it. Sketches merge
by adding bucket counts, which a list of samples could not do in bounded memory. The last minute
is kept as ``WINDOW_SLOTS`` sketches of ``WINDOW_SLOT`` seconds each, by monotonic time (one
clock for every process of a machine), so merged windows line up.
"""

from __future__ import annotations

import math
import time
from typing import Any, Final

from mypy_extensions import i64

RELATIVE_ERROR: Final = 0.01
GAMMA: Final = (1.0 + RELATIVE_ERROR) / (1.0 - RELATIVE_ERROR)
_INV_LOG_GAMMA: Final = 1.0 / math.log(GAMMA)
_SMALLEST: Final = 1e-6  # a second's millionth: anything quicker counts as this
WINDOW_SLOT: Final = 10.0
WINDOW_SLOTS: Final = 6  # 6 x 10 s: "the last minute"
SKETCH_OFFSET: Final = 576  # list position of sketch index 0: index -576 is about 10 µs
SKETCH_BUCKETS: Final = 1000  # up to index 423, about an hour

# Histogram bounds (Prometheus ``le``): seconds, and bytes.
LATENCY_BOUNDS: Final[tuple[float, ...]] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
SIZE_BOUNDS: Final[tuple[float, ...]] = (100.0, 1_000.0, 10_000.0, 100_000.0, 1_000_000.0, 10_000_000.0)

# Methods get a small code; any other method counts as OTHER. Statuses are 0 (no answer) to 999.
METHODS: Final[tuple[str, ...]] = (
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "OTHER",
)  # fmt: skip
_METHOD_CODES: Final[dict[str, int]] = {name: code for code, name in enumerate(METHODS)}
_OTHER: Final = len(METHODS) - 1
STATUSES: Final = 1000
# Consumers named in per-consumer counts, at most; the rest count together under this name.
OTHER_CONSUMERS: Final = "_other"
TOP_CAPACITY: Final = 200  # counters per heavy-hitters summary
TOP_SLOT: Final = 60.0  # top clients are kept per minute ...
TOP_SLOTS: Final = 5  # ... for the last five


def sketch_index(value: float) -> int:
    """The sketch bucket of ``value`` (seconds, or any positive quantity)."""
    if value < _SMALLEST:
        value = _SMALLEST
    return math.ceil(math.log(value) * _INV_LOG_GAMMA)


def sketch_value(index: int) -> float:
    """The estimate for every value in bucket ``index``: within RELATIVE_ERROR of each."""
    return 2.0 * GAMMA**index / (GAMMA + 1.0)


class Tally:
    """A count that grows in place (``tally.n += 1`` allocates nothing)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n: i64 = 0


def _counted(tallies: list[Tally | None]) -> list[int]:
    """The counts of a list of tallies, 0 where none was made."""
    return [tally.n if tally is not None else 0 for tally in tallies]


class Period:
    """The slot of ``width`` seconds that the time last given falls in (slot n: [n * width,
    (n + 1) * width)); while the time stays in it, two comparisons tell, and no division."""

    __slots__ = ("end", "epoch", "start", "width")

    def __init__(self, width: float) -> None:
        self.width = width
        self.epoch = -1
        self.start = 0.0
        self.end = 0.0

    def moved(self, now: float) -> bool:
        """Whether ``now`` falls in another slot than the last time (``epoch`` is then its number)."""
        if self.start <= now < self.end:
            return False
        epoch = int(now / self.width)
        if epoch == self.epoch:  # ``now`` rounds into the slot it seemed to be just outside of
            return False
        self.epoch = epoch
        self.start = epoch * self.width
        self.end = (epoch + 1) * self.width
        return True


def _bucket(bounds: tuple[float, ...], value: float) -> int:
    # A scan beats a bisect here: most values fall in the first buckets.
    index = 0
    for bound in bounds:
        if value <= bound:
            return index
        index += 1
    return index


class Histogram:
    """Fixed buckets (counts per ``le`` bound, the last one +Inf) and a sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [Tally() for _ in range(len(bounds) + 1)]
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[_bucket(self.bounds, value)].n += 1
        self.total += value

    def export(self) -> dict[str, Any]:
        return {"counts": [tally.n for tally in self.counts], "sum": self.total}


class Sketch:
    """Relative-error buckets for the current 10 s slot and the five before it; slots that leave
    the window are added to ``retired``, so "since start" is ``retired`` plus the window.

    Buckets are lists indexed from ``SKETCH_OFFSET`` (one list lookup per value, no key to box):
    about 10 µs to an hour at 1 %, anything outside counted in the first or last bucket. A slot's
    tally for a bucket is made when the bucket first counts in it. A request touches the current
    slot only; the slot changes once per 10 s."""

    __slots__ = ("current", "epochs", "period", "retired", "ring")

    def __init__(self) -> None:
        self.period = Period(WINDOW_SLOT)
        self.current: list[Tally | None] = []
        self.ring: list[list[Tally | None]] = [[] for _ in range(WINDOW_SLOTS)]
        self.epochs = [-1] * WINDOW_SLOTS
        self.retired: list[int] = []

    def observe(self, value: float, now: float) -> None:
        if self.period.moved(now):
            self._turn(self.period.epoch)
        index = sketch_index(value) + SKETCH_OFFSET
        if index < 0:
            index = 0
        elif index >= SKETCH_BUCKETS:
            index = SKETCH_BUCKETS - 1
        tally = self.current[index]
        if tally is None:
            tally = self.current[index] = Tally()
        tally.n += 1

    def _turn(self, epoch: int) -> None:
        slot = epoch % WINDOW_SLOTS
        leaving = self.ring[slot]
        if leaving:
            retired = self.retired
            if not retired:
                retired = self.retired = [0] * SKETCH_BUCKETS
            for index, tally in enumerate(leaving):
                if tally is not None:
                    retired[index] += tally.n
        fresh: list[Tally | None] = [None] * SKETCH_BUCKETS
        self.ring[slot] = fresh
        self.epochs[slot] = epoch
        self.current = fresh

    def export(self) -> dict[str, Any]:
        total: dict[int, int] = {}
        for counts in (self.retired, *[_counted(tallies) for tallies in self.ring]):
            for index, count in enumerate(counts):
                if count:
                    total[index - SKETCH_OFFSET] = total.get(index - SKETCH_OFFSET, 0) + count
        return {
            "total": [[index, count] for index, count in total.items()],
            "slots": [
                [epoch, _pairs(_counted(tallies))]
                for epoch, tallies in zip(self.epochs, self.ring, strict=True)
                if epoch >= 0
            ],
        }


def _pairs(counts: list[int]) -> list[list[int]]:
    """(sketch index, count) of the buckets that counted something."""
    return [[index - SKETCH_OFFSET, count] for index, count in enumerate(counts) if count]


class TopCounts:
    """Heavy hitters per minute, for the last few: Misra-Gries summaries of ``TOP_CAPACITY``
    counters. A key counted more than 1/TOP_CAPACITY of a minute's requests is always kept, and
    its count is low by at most that share; a full summary costs one pass per TOP_CAPACITY new
    keys at most (amortised O(1) per request)."""

    __slots__ = ("current", "epochs", "last_key", "last_tally", "period", "slots")

    def __init__(self) -> None:
        self.period = Period(TOP_SLOT)
        self.current: dict[str, Tally] = {}
        self.slots: list[dict[str, Tally]] = [{} for _ in range(TOP_SLOTS)]
        self.epochs = [-1] * TOP_SLOTS
        # The key counted last and its tally in ``current`` (None: none since ``current`` changed):
        # a connection's requests come from one address, so a repeated key costs no dict probe.
        self.last_key = ""
        self.last_tally: Tally | None = None

    def add(self, key: str, now: float) -> None:
        if self.period.moved(now):
            epoch = self.period.epoch
            slot = epoch % TOP_SLOTS
            self.current = self.slots[slot] = {}
            self.epochs[slot] = epoch
            self.last_tally = None
        tally = self.last_tally
        if tally is not None and key == self.last_key:
            tally.n += 1
            return
        counts = self.current
        tally = counts.get(key)
        if tally is not None:
            tally.n += 1
        elif len(counts) < TOP_CAPACITY:
            tally = counts[key] = Tally()
            tally.n = 1
        else:  # full: every counter gives one back, and the new key is not kept
            kept: dict[str, Tally] = {}
            for name, seen in counts.items():
                if seen.n > 1:
                    seen.n -= 1
                    kept[name] = seen
            self.current = self.slots[self.period.epoch % TOP_SLOTS] = kept
            self.last_tally = None
            return
        self.last_key = key
        self.last_tally = tally

    def export(self) -> list[list[Any]]:
        return [
            [epoch, {key: tally.n for key, tally in counts.items()}]
            for epoch, counts in zip(self.epochs, self.slots, strict=True)
            if epoch >= 0
        ]


class RouteMeter:
    """One route's counts (or the requests no route matched): by method and status, duration and
    size histograms, a latency sketch, refusals by rate limits and authentication, retries."""

    __slots__ = (
        "auth_failures",
        "counts",
        "duration",
        "last_counts",
        "last_method",
        "latency",
        "rate_limited",
        "request_size",
        "response_size",
        "retries",
    )

    def __init__(self) -> None:
        # By method code, the tallies by status (a list of STATUSES, made when the method is first
        # seen; a status's tally when it is first counted).
        self.counts: list[list[Tally | None]] = [[] for _ in METHODS]
        # The method counted last and its tallies: a route mostly sees one method, and the engine
        # passes the same str each time, which compares by identity (no dict probe, no int boxed).
        self.last_method = ""
        self.last_counts: list[Tally | None] = []
        self.duration = Histogram(LATENCY_BOUNDS)
        self.request_size = Histogram(SIZE_BOUNDS)
        self.response_size = Histogram(SIZE_BOUNDS)
        self.latency = Sketch()
        self.rate_limited = 0
        self.retries = 0
        self.auth_failures: dict[str, int] = {}

    def observe(
        self, method: str, status: int, seconds: float, size_in: int, size_out: int, now: float
    ) -> None:
        if method == self.last_method and self.last_counts:
            counts = self.last_counts
        else:
            counts = self.counts[_METHOD_CODES.get(method, _OTHER)]
            if not counts:
                counts.extend([None] * STATUSES)
            self.last_method = method
            self.last_counts = counts
        index = status if 0 <= status < STATUSES else 0
        tally = counts[index]
        if tally is None:
            tally = counts[index] = Tally()
        tally.n += 1
        self.duration.observe(seconds)
        self.request_size.observe(float(size_in))
        self.response_size.observe(float(size_out))
        self.latency.observe(seconds, now)

    def refused(self, status: int, reason: str | None) -> None:
        """A policy's own answer: 429 counts as rate limited, 401/403 as an authentication failure."""
        if status == 429:
            self.rate_limited += 1
        elif status == 401 or status == 403:
            name = reason if reason is not None else "denied"
            self.auth_failures[name] = self.auth_failures.get(name, 0) + 1

    def export(self) -> dict[str, Any]:
        return {
            "counts": [
                [status, METHODS[code], tally.n]
                for code, tallies in enumerate(self.counts)
                for status, tally in enumerate(tallies)
                if tally is not None and tally.n
            ],
            "duration": self.duration.export(),
            "request_size": self.request_size.export(),
            "response_size": self.response_size.export(),
            "latency": self.latency.export(),
            "rate_limited": self.rate_limited,
            "retries": self.retries,
            "auth_failures": self.auth_failures,
        }


class TargetMeter:
    """One upstream target's response latency: from picking it to the response's first byte."""

    __slots__ = ("latency", "seconds")

    def __init__(self) -> None:
        self.seconds = Histogram(LATENCY_BOUNDS)
        self.latency = Sketch()

    def observe(self, seconds: float, now: float) -> None:
        self.seconds.observe(seconds)
        self.latency.observe(seconds, now)

    def export(self) -> dict[str, Any]:
        return {"seconds": self.seconds.export(), "latency": self.latency.export()}


class Meters:
    """Every meter of one worker, by name, kept across reloads (a route's counts are since start,
    not since the last reload)."""

    __slots__ = (
        "consumer_limit",
        "consumers",
        "errors",
        "requests_total",
        "routes",
        "started_at",
        "targets",
        "timeouts",
        "top_consumers",
        "top_ips",
        "unrouted",
    )

    def __init__(self) -> None:
        self.started_at = time.time()
        self.requests_total = 0
        self.timeouts = 0
        self.errors: dict[str, int] = {}  # responses the gateway made because something failed
        self.routes: dict[str, RouteMeter] = {}
        self.unrouted = RouteMeter()  # requests no route matched (404s, built-in endpoints)
        self.targets: dict[tuple[str, str], TargetMeter] = {}  # by (upstream, target address)
        self.top_ips = TopCounts()
        self.top_consumers = TopCounts()
        self.consumer_limit = 0  # consumers counted by name (0: none)
        self.consumers: dict[str, int] = {}

    def route(self, name: str) -> RouteMeter:
        meter = self.routes.get(name)
        if meter is None:
            meter = self.routes[name] = RouteMeter()
        return meter

    def target(self, upstream: str, address: str) -> TargetMeter:
        meter = self.targets.get((upstream, address))
        if meter is None:
            meter = self.targets[(upstream, address)] = TargetMeter()
        return meter

    def retain(self, routes: set[str], targets: set[tuple[str, str]]) -> None:
        """Forget routes and targets the config no longer has (their series end)."""
        self.routes = {name: m for name, m in self.routes.items() if name in routes}
        self.targets = {key: m for key, m in self.targets.items() if key in targets}

    def count_error(self, status: int, reason: str | None) -> None:
        kind = reason if reason is not None else f"http_{status}"
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def count_client(self, ip: str, consumer: str | None, now: float) -> None:
        self.top_ips.add(ip, now)
        if consumer is not None:
            self.top_consumers.add(consumer, now)
            if self.consumer_limit:
                consumers = self.consumers
                seen = consumers.get(consumer)
                if seen is not None:
                    consumers[consumer] = seen + 1
                elif len(consumers) < self.consumer_limit:
                    consumers[consumer] = 1
                else:
                    consumers[OTHER_CONSUMERS] = consumers.get(OTHER_CONSUMERS, 0) + 1

    def export(self) -> dict[str, Any]:
        """This worker's counts as plain JSON values, for the node to merge."""
        return {
            "started_at": self.started_at,
            "requests_total": self.requests_total,
            "timeouts": self.timeouts,
            "errors": self.errors,
            "routes": {name: meter.export() for name, meter in self.routes.items()},
            "unrouted": self.unrouted.export(),
            "targets": [[upstream, address, m.export()] for (upstream, address), m in self.targets.items()],
            "top": {"ip": self.top_ips.export(), "consumer": self.top_consumers.export()},
            "consumers": self.consumers,
        }
