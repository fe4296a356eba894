"""Circuit breakers and passive health (outlier detection) for upstream targets.

Everything here is told the time (``now``, monotonic seconds) rather than reading a clock, so the
state machines are tested with explicit times and the hot path reads the clock once per request.

A target's ``TargetState`` keeps what outlives a reload (kept by ``TargetStates``, keyed by
upstream and address, as pools are): requests in flight, a latency average for ``p2c``, the
active checks' verdict, a passive ejection and a circuit breaker. Whether a target may get a
request is one comparison: ``state.usable(now)``; every change recomputes ``blocked_until``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from apigate.engine.retries import RetryBudget
from apigate.engine.window import WindowCounts

log = logging.getLogger("apigate")

CLOSED: Final = 0
OPEN: Final = 1
HALF_OPEN: Final = 2
STATE_NAMES: Final = ("closed", "open", "half_open")
LATENCY_FADE: Final = 5.0  # seconds for an idle target's latency average to fade by e (Finagle's tau)


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """When a circuit opens and how it recovers (see the config reference: ``circuit_breaker``)."""

    failures: int = 5  # consecutive failures that open it; 0: not by count
    error_rate: float = 0.0  # failed share of requests in ``window`` that opens it; 0: not by rate
    window: float = 10.0
    min_requests: int = 20  # the rate is judged only over at least this many requests
    recovery: float = 30.0  # open this long, then half-open
    half_open_requests: int = 1  # probes admitted while half-open; all must succeed to close


class Breaker:
    """closed → open (consecutive failures, or an error rate over a sliding window with a minimum
    volume) → half-open after ``recovery`` (a few probes) → closed when they succeed, open again
    when one fails. A probe that never reports (its client left) stops blocking after
    ``recovery``, and new probes are admitted."""

    __slots__ = (
        "admitted",
        "changed_at",
        "consecutive",
        "name",
        "on_change",
        "open_until",
        "reason",
        "settings",
        "state",
        "succeeded",
        "total_failures",
        "window",
    )

    def __init__(
        self, name: str, settings: BreakerSettings, on_change: Callable[[Breaker], None] | None = None
    ) -> None:
        self.name = name
        self.settings = settings
        self.on_change = on_change
        self.state = CLOSED
        self.consecutive = 0
        self.total_failures = 0
        self.open_until = 0.0  # open: until then; half-open: probes may be admitted again then
        self.admitted = 0
        self.succeeded = 0
        self.changed_at = 0.0
        self.reason = ""
        self.window = WindowCounts(settings.window)  # requests and failures, for the error rate

    def blocked_until(self) -> float:
        """Until when no request may pass (0.0: requests pass now)."""
        if self.state == CLOSED:
            return 0.0
        if self.state == HALF_OPEN and self.admitted < self.settings.half_open_requests:
            return 0.0
        return self.open_until

    def admit(self, now: float) -> bool:
        """May a request pass now? A half-open circuit counts the probe it admits."""
        state = self.state
        if state == CLOSED:
            return True
        if state == OPEN:
            if now < self.open_until:
                return False
            self._change(HALF_OPEN, now, "recovery period over")
            self.admitted = self.succeeded = 0
            state = HALF_OPEN
        if self.admitted >= self.settings.half_open_requests:
            if now < self.open_until:
                return False
            self.admitted = self.succeeded = 0  # the probes never reported: admit new ones
        self.admitted += 1
        self.open_until = now + self.settings.recovery
        return True

    def cancel_probe(self) -> None:
        """A request admitted while half-open did not go after all."""
        if self.state == HALF_OPEN and self.admitted > 0:
            self.admitted -= 1

    def success(self, now: float) -> None:
        self.consecutive = 0
        if self.state == HALF_OPEN:
            self.succeeded += 1
            if self.succeeded >= self.settings.half_open_requests:
                self._change(CLOSED, now, f"{self.succeeded} probe(s) succeeded")
            return
        if self.settings.error_rate > 0.0:
            self.window.add(now, 1, 0)

    def failure(self, now: float) -> None:
        self.consecutive += 1
        self.total_failures += 1
        settings = self.settings
        if self.state == HALF_OPEN:
            self._open(now, "a probe failed")
            return
        if self.state == OPEN:
            return
        if settings.failures and self.consecutive >= settings.failures:
            self._open(now, f"{self.consecutive} consecutive failures")
            return
        if settings.error_rate > 0.0:
            self.window.add(now, 1, 1)
            requests, failed = self.window.totals(now)
            if requests >= settings.min_requests and failed >= settings.error_rate * requests:
                self._open(now, f"{failed} of {requests} requests failed in {settings.window:g}s")

    def hint_open(self, now: float, seconds: float, origin: str) -> bool:
        """Another worker or node saw this circuit open: open it here too for ``seconds`` (at most
        one recovery period), without telling anyone (no echo). False if it was not closed."""
        if self.state != CLOSED:
            return False
        self.open_until = now + min(seconds, self.settings.recovery)
        self.admitted = self.succeeded = 0
        self.state = OPEN
        self.changed_at = now
        self.reason = f"open at {origin}"
        log.warning("circuit %s open (%s)", self.name, self.reason)
        return True

    def reset(self, now: float) -> None:
        """Closed again, its counts cleared (an operator's reset)."""
        self.consecutive = 0
        self.window.clear()
        if self.state != CLOSED:
            self._change(CLOSED, now, "reset")

    def describe(self, now: float) -> dict[str, object]:
        item: dict[str, object] = {
            "state": STATE_NAMES[self.state],
            "consecutive_failures": self.consecutive,
            "failures": self.total_failures,
            "changed_seconds_ago": round(now - self.changed_at, 3) if self.changed_at else None,
            "reason": self.reason or None,
        }
        if self.state == OPEN:
            item["retry_after"] = max(0.0, round(self.open_until - now, 3))
        return item

    def _open(self, now: float, reason: str) -> None:
        self.open_until = now + self.settings.recovery
        self.admitted = self.succeeded = 0
        self.window.clear()
        self._change(OPEN, now, reason)

    def _change(self, state: int, now: float, reason: str) -> None:
        self.state = state
        self.changed_at = now
        self.reason = reason
        if state == CLOSED:
            self.consecutive = 0
        log.warning("circuit %s %s (%s)", self.name, STATE_NAMES[state], reason)
        if self.on_change is not None:
            self.on_change(self)


@dataclass(frozen=True, slots=True)
class EjectionSettings:
    """Passive health: ejection after consecutive failures, for longer on each repeat (as Envoy's
    outlier detection does)."""

    consecutive_failures: int = 5
    base_ejection: float = 30.0
    max_ejection: float = 300.0
    max_ejection_percent: int = 10  # of the upstream's targets; at least one may always be ejected


class TargetState:
    """What one target's requests have shown, kept across reloads (see the module docstring)."""

    __slots__ = (
        "blocked_until",
        "breaker",
        "consecutive_failures",
        "ejected_until",
        "ejections",
        "health_detail",
        "healthy",
        "in_flight",
        "key",
        "latency",
        "latency_at",
        "returned_at",
    )

    def __init__(self, key: str) -> None:
        self.key = key
        self.in_flight = 0
        self.latency = 0.0  # peak-sensitive moving average of time to first byte, seconds
        self.latency_at = 0.0  # when it was last updated (monotonic)
        self.healthy = True  # the active checks' verdict
        self.health_detail: dict[str, object] | None = None
        self.blocked_until = 0.0
        self.ejected_until = 0.0
        self.ejections = 0
        self.returned_at = 0.0
        self.consecutive_failures = 0
        self.breaker: Breaker | None = None

    def usable(self, now: float) -> bool:
        return self.healthy and now >= self.blocked_until

    def retry_after(self, now: float) -> float:
        """Seconds until this target may be tried again (an estimate when checks must pass first)."""
        return max(1.0, self.blocked_until - now)

    def update_blocked(self) -> None:
        breaker = self.breaker
        self.blocked_until = max(self.ejected_until, breaker.blocked_until() if breaker is not None else 0.0)

    def admit(self, now: float) -> None:
        """The balancer chose this target: a half-open breaker counts the probe."""
        breaker = self.breaker
        if breaker is not None and breaker.state != CLOSED:
            breaker.admit(now)
            self.update_blocked()

    def note_latency(self, seconds: float, now: float) -> None:
        # Peak-sensitive (as Finagle's peak EWMA): a slow answer counts at once, a fast one decays it.
        latency = self.latency
        self.latency = seconds if seconds > latency else latency + 0.3 * (seconds - latency)
        self.latency_at = now

    def recent_latency(self, now: float) -> float:
        """The average, faded by the time since its last answer: a target that was slow once and
        got no traffic since is tried again after a while rather than shunned for good."""
        return self.latency * math.exp((self.latency_at - now) / LATENCY_FADE)

    def succeeded(self, now: float) -> None:
        self.consecutive_failures = 0
        breaker = self.breaker
        if breaker is not None:
            state = breaker.state
            breaker.success(now)
            if state != breaker.state:
                self.update_blocked()

    def failed(self, now: float, ejection: EjectionSettings | None, peers: list[TargetState]) -> None:
        self.consecutive_failures += 1
        breaker = self.breaker
        if breaker is not None:
            breaker.failure(now)
        if (
            ejection is not None
            and ejection.consecutive_failures
            and self.consecutive_failures >= ejection.consecutive_failures
            and now >= self.ejected_until
            and _may_eject(now, ejection, peers)
        ):
            self._eject(now, ejection)
        self.update_blocked()

    def _eject(self, now: float, ejection: EjectionSettings) -> None:
        if self.ejections and self.returned_at:
            # Each quiet base period since the last return forgives one earlier ejection.
            quiet = int((now - self.returned_at) / ejection.base_ejection)
            self.ejections = max(0, self.ejections - quiet)
        self.ejections += 1
        period = min(ejection.base_ejection * self.ejections, ejection.max_ejection)
        self.ejected_until = now + period
        self.returned_at = self.ejected_until
        self.consecutive_failures = 0
        log.warning(
            "target %s ejected for %.0fs (%d consecutive failures; ejection %d)",
            self.key,
            period,
            ejection.consecutive_failures,
            self.ejections,
        )

    def return_now(self) -> None:
        """Back in rotation (an operator's reset)."""
        self.ejected_until = 0.0
        self.consecutive_failures = 0
        self.update_blocked()

    def describe(self, now: float) -> dict[str, object]:
        item: dict[str, object] = {
            "usable": self.usable(now),
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "latency_ms": round(self.latency * 1000, 3),
            "consecutive_failures": self.consecutive_failures,
            "ejected": now < self.ejected_until,
            "ejections": self.ejections,
        }
        if now < self.ejected_until:
            item["ejected_for"] = round(self.ejected_until - now, 3)
        if self.health_detail is not None:
            item["active_check"] = self.health_detail
        if self.breaker is not None:
            item["circuit"] = self.breaker.describe(now)
        return item


def _may_eject(now: float, ejection: EjectionSettings, peers: list[TargetState]) -> bool:
    """At most ``max_ejection_percent`` of the targets are out at once (at least one may be)."""
    ejected = sum(1 for peer in peers if now < peer.ejected_until)
    allowed = max(1, math.floor(len(peers) * ejection.max_ejection_percent / 100))
    return ejected < allowed


class TargetStates:
    """What the gateway keeps of its upstreams across reloads, as it keeps their pools: a state per
    (upstream, target address), and each upstream's own circuit and retry budget.

    ``on_open(key, seconds)`` hears of each target circuit that opens here, for those that share
    (the process passes it on to the other workers and nodes, which open theirs as a hint)."""

    def __init__(self) -> None:
        self.states: dict[str, TargetState] = {}
        self.breakers: dict[str, Breaker] = {}
        self.budgets: dict[str, RetryBudget] = {}
        self.on_open: Callable[[str, float], None] | None = None

    def target_breaker(self, state: TargetState, settings: BreakerSettings, share: bool) -> None:
        """Give ``state`` a circuit with ``settings`` (its current one keeps its state)."""
        breaker = state.breaker
        if breaker is None:
            breaker = state.breaker = Breaker(state.key, settings)
        breaker.settings = settings
        breaker.on_change = self._opened if share else None

    def _opened(self, breaker: Breaker) -> None:
        if breaker.state == OPEN and self.on_open is not None:
            self.on_open(breaker.name, breaker.settings.recovery)

    def hint(self, key: str, seconds: float, origin: str, now: float) -> None:
        """A circuit opened elsewhere: open ours for that target, if we have one and it is closed."""
        state = self.states.get(key)
        if state is not None and state.breaker is not None and state.breaker.hint_open(now, seconds, origin):
            state.update_blocked()

    def retain(self, keys: set[str], upstreams: set[str]) -> None:
        """Forget the targets and upstreams a new plan no longer has (a target that comes back
        starts afresh), so targets that come and go by discovery do not pile up."""
        for key in [k for k in self.states if k not in keys]:
            del self.states[key]
        for name in [n for n in self.breakers if n not in upstreams]:
            del self.breakers[name]
        for name in [n for n in self.budgets if n not in upstreams]:
            del self.budgets[name]

    def state_for(self, key: str) -> TargetState:
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = TargetState(key)
        return state

    def upstream_breaker(self, upstream: str, settings: BreakerSettings) -> Breaker:
        breaker = self.breakers.get(upstream)
        if breaker is None:
            breaker = self.breakers[upstream] = Breaker(upstream, settings)
        breaker.settings = settings
        return breaker

    def retry_budget(self, upstream: str, ratio: float, window: float, min_per_second: float) -> RetryBudget:
        budget = self.budgets.get(upstream)
        if budget is None or budget.counts.window != window:
            budget = self.budgets[upstream] = RetryBudget(ratio, window, min_per_second, time.monotonic())
        budget.ratio = ratio
        budget.min_per_second = min_per_second
        return budget
