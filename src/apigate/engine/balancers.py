"""Balancers: which of an upstream's targets serves a request.

Each is a small class behind one method, ``pick(exchange, exclude, now)``, chosen by name when the
plan is compiled. ``exclude`` is the target the previous attempt failed on (a retry goes elsewhere
when it can); a target that is not ``usable`` (unhealthy, ejected, circuit open) is never picked.
``None`` means no target can take the request: the exchange answers 503 at once.
Compiled with the engine: a pick runs once per request.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from typing import TYPE_CHECKING, ClassVar, Final

from apigate.httpspec import cookie_value

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange
    from apigate.engine.plan import Target

HASH_POINTS_PER_TARGET: Final = 160  # ring points per target of average weight (as ketama)
SCHEDULE_LIMIT: Final = 1024  # the longest round robin period worked out in advance


def stable_hash(data: bytes) -> int:
    """A hash that is the same in every process and machine (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class Balancer:
    """Smooth weighted round robin (as nginx does): with equal weights, plain round robin.

    One period of the sequence is worked out in advance, so while its target can take the request
    a pick is one step along a list; otherwise the usable targets are weighed as they stand."""

    name: ClassVar[str] = "round_robin"

    def __init__(self, targets: list[Target]) -> None:
        self.targets = targets
        self._current = [0] * len(targets)
        self.schedule = _smooth_schedule(targets)
        self._position = 0

    def pick(self, exchange: Exchange, exclude: Target | None, now: float) -> Target | None:
        schedule = self.schedule
        if schedule:
            position = self._position
            target = schedule[position]
            position += 1
            self._position = 0 if position == len(schedule) else position
            if target is not exclude and target.state.usable(now):
                return target
        return self.weigh(exclude, now)

    def weigh(self, exclude: Target | None, now: float) -> Target | None:
        """Smooth weighted round robin over the targets that can take a request now."""
        total = 0
        best = -1
        current = self._current
        targets = self.targets
        for index in range(len(targets)):
            target = targets[index]
            if target is exclude or not target.state.usable(now):
                continue
            current[index] += target.weight
            total += target.weight
            if best < 0 or current[index] > current[best]:
                best = index
        if best < 0:
            return _fallback(exclude, now)
        current[best] -= total
        return targets[best]


class LeastConnections(Balancer):
    """The usable target with the fewest requests in flight for its weight; ties rotate."""

    name: ClassVar[str] = "least_connections"

    def __init__(self, targets: list[Target]) -> None:
        super().__init__(targets)
        self._start = 0

    def pick(self, exchange: Exchange, exclude: Target | None, now: float) -> Target | None:
        targets = self.targets
        count = len(targets)
        if not count:  # a discovered upstream with nothing found yet
            return None
        self._start = start = (self._start + 1) % count
        best: Target | None = None
        best_load = 0.0
        for step in range(count):
            target = targets[(start + step) % count]
            if target is exclude or target.weight <= 0 or not target.state.usable(now):
                continue
            load = target.state.in_flight / target.weight
            if best is None or load < best_load:
                best = target
                best_load = load
        return best if best is not None else _fallback(exclude, now)


class PowerOfTwoChoices(Balancer):
    """Two usable targets drawn at random; the one with the lower cost, (in flight + 1) x recent
    latency, wins (as Finagle's and Envoy's P2C with peak EWMA): the cost of a full scan is avoided
    and a slow or loaded target gets less traffic, without herding onto one target.

    The draw is Marsaglia's xorshift32 kept here, compiled on small integers: two draws from
    ``random`` cost more than the rest of the pick, and choosing targets needs no better randomness."""

    name: ClassVar[str] = "p2c"

    def __init__(self, targets: list[Target]) -> None:
        super().__init__(targets)
        self._bits = random.getrandbits(32) | 1  # xorshift never leaves 0

    def pick(self, exchange: Exchange, exclude: Target | None, now: float) -> Target | None:
        targets = self.targets
        count = len(targets)
        if count < 2:
            return super().pick(exchange, exclude, now)
        bits = _xorshift(self._bits)
        first_index = bits % count
        bits = _xorshift(bits)
        self._bits = bits
        second_index = (first_index + 1 + bits % (count - 1)) % count
        first = targets[first_index]
        second = targets[second_index]
        first_ok = first is not exclude and first.state.usable(now)
        second_ok = second is not exclude and second.state.usable(now)
        if first_ok and second_ok:
            return second if _cost(second, now) < _cost(first, now) else first
        if first_ok:
            return first
        if second_ok:
            return second
        return super().pick(exchange, exclude, now)


def _xorshift(x: int) -> int:
    """The next of Marsaglia's xorshift32 sequence (32-bit values, masked: no big integers)."""
    x ^= (x << 13) & 0xFFFFFFFF
    x ^= x >> 17
    return x ^ ((x << 5) & 0xFFFFFFFF)


def _cost(target: Target, now: float) -> float:
    state = target.state
    return (state.in_flight + 1) * (state.recent_latency(now) + 0.0001) / max(target.weight, 1)


class ConsistentHash(Balancer):
    """A consistent hash ring (about 160 points per target, more for heavier ones): a key keeps its
    target, and a target joining or leaving moves only about 1/N of the keys. A key whose target is
    not usable goes to the next usable target on the ring. The key is the client's IP, a header, a
    cookie or a path parameter; a request without it is balanced round robin."""

    name: ClassVar[str] = "hash"

    def __init__(self, targets: list[Target], source: str = "ip", key: str = "") -> None:
        super().__init__(targets)
        self.source = source
        self.key = key.lower()
        self.key_bytes = self.key.encode("latin-1")
        weights = [max(t.weight, 0) for t in targets]
        total = sum(weights)
        if not total:
            weights = [1] * len(targets)
            total = len(targets)
        points: list[tuple[int, int]] = []
        for index, target in enumerate(targets):
            if not weights[index]:
                continue
            count = max(1, round(HASH_POINTS_PER_TARGET * len(targets) * weights[index] / total))
            for point in range(count):
                points.append((stable_hash(f"{target.id}-{point}".encode()), index))
        points.sort()
        self.hashes = [h for h, _ in points]
        self.owners = [i for _, i in points]

    def key_of(self, exchange: Exchange) -> bytes | None:
        source = self.source
        if source == "ip":
            return exchange.client_ip.encode()
        if source == "header":
            return exchange.header(self.key_bytes)
        if source == "cookie":
            return cookie_value(exchange.headers, self.key_bytes)
        value = exchange.params.get(self.key)
        return value.encode() if value is not None else None

    def pick(self, exchange: Exchange, exclude: Target | None, now: float) -> Target | None:
        key = self.key_of(exchange)
        if key is None:
            return super().pick(exchange, exclude, now)
        hashes = self.hashes
        count = len(hashes)
        if not count:
            return _fallback(exclude, now)
        start = bisect.bisect_left(hashes, stable_hash(key))
        targets = self.targets
        owners = self.owners
        for step in range(count):
            target = targets[owners[(start + step) % count]]
            if target is not exclude and target.state.usable(now):
                return target
        return _fallback(exclude, now)


class Sticky(Balancer):
    """A cookie pins a client to the target that first served it; when that target cannot take the
    request (unhealthy, ejected, gone), another is picked by the fallback balancer and the cookie
    moves to it. The cookie names a target by an opaque id, never its address."""

    name: ClassVar[str] = "sticky"

    def __init__(self, targets: list[Target], fallback: Balancer, cookie: str, attributes: bytes) -> None:
        super().__init__(targets)
        self.fallback = fallback
        self.cookie = cookie.encode("latin-1")
        self.set_prefix = b"set-cookie: " + self.cookie + b"="
        self.attributes = attributes  # b"; Path=/; HttpOnly; SameSite=Lax..." (compiled once)
        self.by_id = {t.id.encode(): t for t in targets}

    def pick(self, exchange: Exchange, exclude: Target | None, now: float) -> Target | None:
        pinned_id = cookie_value(exchange.headers, self.cookie)
        if pinned_id is not None:
            pinned = self.by_id.get(pinned_id)
            if pinned is not None and pinned is not exclude and pinned.state.usable(now):
                return pinned
        target = self.fallback.pick(exchange, exclude, now)
        if target is not None:
            if exclude is not None:  # a retry: the cookie set for the failed attempt goes
                exchange.response_lines = exchange.response_lines.replace(self._line(exclude), b"")
            exchange.response_lines += self._line(target)
        return target

    def _line(self, target: Target) -> bytes:
        return self.set_prefix + target.id.encode() + self.attributes + b"\r\n"


def _smooth_schedule(targets: list[Target]) -> list[Target]:
    """One period of smooth weighted round robin with every target up (empty when the weights
    add up to more than SCHEDULE_LIMIT: then each pick is weighed)."""
    weights = [max(t.weight, 0) for t in targets]
    total = sum(weights)
    if not total or total > SCHEDULE_LIMIT:
        return []
    current = [0] * len(targets)
    schedule = []
    for _ in range(total):
        best = 0
        for index, weight in enumerate(weights):
            current[index] += weight
            if current[index] > current[best]:
                best = index
        current[best] -= total
        schedule.append(targets[best])
    return schedule


def _fallback(exclude: Target | None, now: float) -> Target | None:
    """Only the excluded target is left: it gets the retry if it can take it."""
    if exclude is not None and exclude.state.usable(now):
        return exclude
    return None
