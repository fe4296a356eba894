"""Active health checks: each upstream target is probed with one HTTP request every interval.

A target starts healthy (as Envoy and Kong assume unless told otherwise). ``unhealthy_threshold``
consecutive failed probes make it unhealthy, and ``healthy_threshold`` consecutive good ones make
it healthy again. A probe fails on a connect error, a connection closed or reset before the
response is whole, a timeout, a response that is not HTTP, or a status not in
``expected_statuses``. Each transition is logged once (logger ``apigate``) and reported once to
``on_change``; ``status()`` shows every target's health at any time.

Scheduling: one task per target. Its first probe runs at a random offset within the first
interval, so that the targets of a node are spread over the interval rather than probed all at
once, and later probes keep that phase (first + n x interval). A probe that outlasts its interval
(a timeout longer than it) skips the slots it overran: never more than one probe per target is in
flight.

Probes go through one ``HttpClient`` that does not keep connections alive: each probe opens its
own connection and sends ``Connection: close``, so a dead target shows as a failed connect, not
as a pooled connection that happened to survive. The probe goes to the target's origin (scheme,
host, port) and ``settings.path``; a path in the target's URL is not used, since a health
endpoint is an absolute path, as in Envoy's and Kong's checks.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal
from urllib.parse import urlsplit

from apigate.outbound import HttpClient, OutboundError

log = logging.getLogger("apigate")

MIN_INTERVAL = 0.01  # seconds; a shorter interval would keep the loop busy probing
# A probe reads the whole response; a health endpoint answering more than this fails its check.
MAX_PROBE_BODY = 1 << 20
# Probes never wait for a connection slot (a wait would count against their timeout): one target
# listed by several upstreams is probed once per key, possibly at the same moment.
MAX_PROBES_PER_ORIGIN = 256

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_UNSAFE_VALUE = re.compile(r"[\x00\r\n]")
_UNSAFE_PATH = re.compile(r"[\x00-\x20\x7f#]")
# RFC 9110 §7.2: uri-host [ ":" port ]; names, IPv4 and bracketed IPv6 literals.
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]+)(?::(?P<port>[0-9]{1,5}))?")
# Set by the checker or its client; a copy in ``headers`` would contradict them.
_OWN_HEADERS = frozenset({"host", "connection", "content-length", "transfer-encoding"})


def _seconds(name: str, value: object, least: float) -> float:
    """A positive, finite number of seconds, at least ``least``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number of seconds")
    if value <= 0 or value < least:
        raise ValueError(f"{name} must be at least {least:g} seconds" if least else f"{name} must be above 0")
    return float(value)


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number of probes, at least 1")
    return value


def _statuses(value: object) -> frozenset[int]:
    problem = "expected_statuses must be a non-empty set of HTTP status codes (100 to 599)"
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValueError(problem)
    codes = list(value)
    if not codes or not all(
        isinstance(code, int) and not isinstance(code, bool) and 100 <= code <= 599 for code in codes
    ):
        raise ValueError(problem)
    return frozenset(codes)


def _headers(value: object) -> tuple[tuple[str, str], ...]:
    if isinstance(value, Mapping):
        value = tuple(value.items())
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValueError("headers must be a sequence of (name, value) pairs")
    pairs = []
    for index, pair in enumerate(value):
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise ValueError(f"headers[{index}] must be a (name, value) pair")
        name, text = pair
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise ValueError(f"headers[{index}]: the name must be an HTTP token (RFC 9110 §5.1)")
        if name.lower() == "host":
            raise ValueError(f"headers[{index}]: set the Host header with the host setting")
        if name.lower() in _OWN_HEADERS:
            raise ValueError(f"headers[{index}]: {name} is set by the health checker itself")
        if not isinstance(text, str) or _UNSAFE_VALUE.search(text) or not text.isascii():
            raise ValueError(f"headers[{index}]: the value of {name} must be ASCII text without line breaks")
        pairs.append((name, text))
    return tuple(pairs)


@dataclass(frozen=True)
class CheckSettings:
    """How one target is probed. Invalid values raise ValueError naming the field."""

    path: str = "/health"  # may carry a query: /health?deep=1
    interval: float = 10.0  # seconds from one probe's start to the next one's
    timeout: float = 2.0  # seconds for the whole probe: connect, send, whole response
    healthy_threshold: int = 2  # consecutive good probes that make an unhealthy target healthy
    unhealthy_threshold: int = 3  # consecutive failed probes that make a healthy target unhealthy
    expected_statuses: frozenset[int] = frozenset(range(200, 400))
    host: str | None = None  # the Host header; None: the target's host:port
    method: Literal["GET", "HEAD"] = "GET"
    headers: tuple[tuple[str, str], ...] = ()  # sent with every probe, e.g. an Authorization

    def __post_init__(self) -> None:
        path = self.path
        if not isinstance(path, str) or not path.startswith("/") or not path.isascii():
            raise ValueError("path must be an ASCII path starting with /")
        if _UNSAFE_PATH.search(path):
            raise ValueError("path must not hold spaces, control characters or a fragment (#)")
        # Frozen: normalised values (ints as floats, any iterable as a frozenset) are set directly.
        object.__setattr__(self, "interval", _seconds("interval", self.interval, MIN_INTERVAL))
        object.__setattr__(self, "timeout", _seconds("timeout", self.timeout, 0.0))
        _count("healthy_threshold", self.healthy_threshold)
        _count("unhealthy_threshold", self.unhealthy_threshold)
        object.__setattr__(self, "expected_statuses", _statuses(self.expected_statuses))
        host = self.host
        if host is not None:
            matched = _HOST.fullmatch(host) if isinstance(host, str) else None
            if matched is None or int(matched["port"] or 0) > 65535:
                raise ValueError("host must be a host name or address with an optional :port")
        if self.method not in ("GET", "HEAD"):
            raise ValueError("method must be GET or HEAD")
        object.__setattr__(self, "headers", _headers(self.headers))


@dataclass(frozen=True)
class ProbeTarget:
    """One target to probe. ``key`` is the caller's id for it (for example
    ``"users/http://10.0.0.1:8080"``); ``url`` is the target's ``scheme://host:port``."""

    key: str
    url: str
    settings: CheckSettings = CheckSettings()
    probe_url: str = field(init=False, repr=False, compare=False)
    probe_headers: tuple[tuple[bytes, bytes], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ValueError("key must be a non-empty string")
        if not isinstance(self.settings, CheckSettings):
            raise ValueError("settings must be a CheckSettings")
        try:
            parts = urlsplit(self.url) if isinstance(self.url, str) else None
        except ValueError:  # an unclosed IPv6 bracket
            parts = None
        if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be an http:// or https:// URL naming a host")
        try:
            parts.port  # noqa: B018 - raises ValueError on a malformed port
        except ValueError:
            raise ValueError("url has an invalid port") from None
        if parts.username is not None or parts.password is not None:
            raise ValueError("url must not carry credentials; send them with the settings' headers")
        if parts.query or parts.fragment:
            raise ValueError("url must not carry a query string or fragment")
        settings = self.settings
        headers = [(name.encode(), value.encode()) for name, value in settings.headers]
        if settings.host is not None:
            headers.insert(0, (b"Host", settings.host.encode()))
        object.__setattr__(self, "probe_url", f"{parts.scheme.lower()}://{parts.netloc}{settings.path}")
        object.__setattr__(self, "probe_headers", tuple(headers))


@dataclass
class TargetHealth:
    """A target's health as shown and shared: the verdict and what the last probe found."""

    healthy: bool = True
    last_status: int | None = None  # None: the last probe got no response
    last_error: str | None = None  # why the last probe failed; None when it passed
    last_latency: float | None = None  # seconds the last probe took, passed or failed
    last_checked: float | None = None  # wall time (time.time) of the last probe's end
    changed_at: float | None = None  # wall time of the last transition; None: never changed
    successes: int = 0  # consecutive good probes
    failures: int = 0  # consecutive failed probes

    def describe(self) -> dict[str, Any]:
        """JSON-ready values, by field name."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class _Outcome:
    status: int | None
    error: str | None
    latency: float


def _failure_reason(error: OutboundError, timeout: float) -> str:
    if error.kind == "timeout":
        return f"timeout after {timeout}s"
    # The client raises its own error with the OS's one as its context; a refused connect, the
    # commonest failure of a dead target, is worth saying plainly on either event loop.
    if isinstance(error.__context__, ConnectionRefusedError):
        return "connect refused"
    return error.message


def next_slot(last: float, interval: float, now: float) -> float:
    """The first slot of the schedule ``last + n x interval`` after ``now`` (n >= 1): a probe that
    overran its interval skips the slots it missed instead of probing again at once."""
    missed = max(0, math.floor((now - last) / interval))
    return last + (missed + 1) * interval


class ActiveChecker:
    """Probes targets and keeps their health; see the module docstring.

    ``on_change(key, health)`` is called once per transition with a copy of the target's health.
    ``clock`` (seconds, monotonic) times probes and schedules; ``wall`` stamps ``last_checked``
    and ``changed_at``. Nothing raises out of the checker's tasks: errors are logged.
    """

    def __init__(
        self,
        on_change: Callable[[str, TargetHealth], None],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._on_change = on_change
        self._clock = clock
        self._wall = wall
        self._targets: dict[str, ProbeTarget] = {}
        self._health: dict[str, TargetHealth] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._ending: set[asyncio.Task[None]] = set()  # cancelled, not yet finished
        self._client: HttpClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._offsets = random.Random()  # where in the interval each target's probes fall

    @property
    def running(self) -> bool:
        """Between ``start()`` and ``stop()``."""
        return self._client is not None

    def set_targets(self, targets: Iterable[ProbeTarget]) -> None:
        """Probe exactly these targets from now on. A key that stays with the same target keeps its
        health and schedule; a key whose URL or settings changed keeps its health and starts a new
        schedule; a new key starts healthy; a key no longer listed is forgotten (its probe in
        flight, if any, is abandoned)."""
        wanted: dict[str, ProbeTarget] = {}
        for index, target in enumerate(targets):
            if not isinstance(target, ProbeTarget):
                raise TypeError(f"targets[{index}] must be a ProbeTarget")
            if target.key in wanted:
                raise ValueError(f"targets[{index}]: the key {target.key!r} is listed twice")
            wanted[target.key] = target
        for key in [key for key in self._targets if key not in wanted]:
            del self._targets[key]
            del self._health[key]
            self._cancel(key)
        for key, target in wanted.items():
            if self._targets.get(key) == target:
                continue
            self._targets[key] = target
            self._health.setdefault(key, TargetHealth())
            if self._client is not None:
                self._schedule(target)

    def status(self) -> dict[str, TargetHealth]:
        """Every target's health, by key (copies: they do not change afterwards)."""
        return {key: replace(health) for key, health in self._health.items()}

    def start(self) -> None:
        """Start probing on the running event loop (again after ``stop()``; idempotent)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("ActiveChecker.start() must be called on a running event loop") from None
        if self._client is not None:
            return
        self._loop = loop
        self._client = HttpClient(max_connections_per_origin=MAX_PROBES_PER_ORIGIN, keep_alive=False)
        for target in self._targets.values():
            self._schedule(target)

    async def stop(self) -> None:
        """Stop probing: abandon probes in flight and close the client. Targets and their health
        are kept for a later ``start()``."""
        client, self._client = self._client, None
        for key in list(self._tasks):
            self._cancel(key)
        if self._ending:
            await asyncio.wait(list(self._ending))
        if client is not None:
            await client.close()

    # -- the probing -----------------------------------------------------------------------------------
    def _schedule(self, target: ProbeTarget) -> None:
        previous = self._cancel(target.key)
        assert self._loop is not None
        self._tasks[target.key] = self._loop.create_task(
            self._run(target, previous), name=f"health check {target.key}"
        )

    def _cancel(self, key: str) -> asyncio.Task[None] | None:
        task = self._tasks.pop(key, None)
        if task is not None and not task.done():
            task.cancel()
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)
        return task

    async def _run(self, target: ProbeTarget, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.wait([previous])  # its probe ends first: one in flight per target
        interval = target.settings.interval
        due: float | None = None
        while True:
            try:
                if due is None:
                    due = self._clock() + self._offsets.uniform(0.0, interval)
                await asyncio.sleep(max(due - self._clock(), 0.0))
                self._record(target, await self._probe(target))
                due = next_slot(due, interval, self._clock())
            except Exception:  # a bug must not end this target's checks for good
                log.exception("the health check of %s failed unexpectedly; retrying", target.key)
                due = None
                await asyncio.sleep(interval)

    async def _probe(self, target: ProbeTarget) -> _Outcome:
        client = self._client
        if client is None:
            raise RuntimeError("the health checker is stopped")
        settings = target.settings
        started = self._clock()
        try:
            response = await client.request(
                settings.method,
                target.probe_url,
                headers=list(target.probe_headers),
                timeout=settings.timeout,
                max_body=MAX_PROBE_BODY,
            )
        except OutboundError as exc:
            return _Outcome(None, _failure_reason(exc, settings.timeout), self._clock() - started)
        latency = self._clock() - started
        if response.status not in settings.expected_statuses:
            return _Outcome(response.status, f"status {response.status} not expected", latency)
        return _Outcome(response.status, None, latency)

    def _record(self, target: ProbeTarget, outcome: _Outcome) -> None:
        health = self._health.get(target.key)
        if health is None:  # forgotten while its probe ran
            return
        settings = target.settings
        health.last_status = outcome.status
        health.last_error = outcome.error
        health.last_latency = outcome.latency
        health.last_checked = self._wall()
        if outcome.error is None:
            health.successes += 1
            health.failures = 0
            turns = not health.healthy and health.successes >= settings.healthy_threshold
        else:
            health.failures += 1
            health.successes = 0
            turns = health.healthy and health.failures >= settings.unhealthy_threshold
        if not turns:
            return
        health.healthy = not health.healthy
        health.changed_at = health.last_checked
        if health.healthy:
            log.info(
                "upstream target %s is healthy again (consecutive good health checks: %d, status %s)",
                target.key,
                health.successes,
                outcome.status,
            )
        else:
            log.warning(
                "upstream target %s is unhealthy (consecutive failed health checks: %d, the last: %s)",
                target.key,
                health.failures,
                outcome.error,
            )
        try:
            self._on_change(target.key, replace(health))
        except Exception:
            log.exception("on_change failed for the health of %s", target.key)
