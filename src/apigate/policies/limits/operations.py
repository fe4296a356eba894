"""Reading and resetting the counters of the counting policies where they can be reached from
outside a gateway: on Redis, and (memory-backed quotas) in the store.

The logic behind `apigate limits show|reset`, kept apart from the CLI so that the admin API can
call it too. Counters in memory (``state: memory://`` or ``backend: memory``) live inside each
gateway process and cannot be reached from outside it, except those of quotas, which every
process writes behind to the store (``policies/quota/ledger.py``); ``SharedCounters`` works on
Redis, ``StoredQuotas`` on the store, with the same three methods.

On Redis a counter's keys are ``policy.counter_keys(label, algorithm, key, now)``: one hash tag,
``scope + US + policy:label:algorithm + US + key`` (US = ``\\x1f``; scope = the route's name, or ""
for ``scope: global``), as ``policy.CountingPolicy`` makes them; a quota's key also names the
current period. Listing reads keys back by their hash tag; a tag that had to be replaced by its digest (a
key holding a brace) is found only by naming its key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from apigate.policies.limits.algorithms import Algorithm, KeyState
from apigate.policies.limits.calendar import CalendarQuota
from apigate.policies.limits.policy import CountingPolicy
from apigate.state.redis import RedisState
from apigate.store.roles.quotas import QuotaStore


@dataclass(frozen=True)
class Counter:
    policy: str
    route: str  # "" for limits shared by every route
    limit: str
    key: str
    algorithm: str
    remaining: int
    capacity: int
    reset_seconds: int
    period: str | None = None  # a quota's period (2026-03-29)

    def as_dict(self) -> dict[str, Any]:
        shown = {
            "policy": self.policy,
            "route": self.route or None,
            "limit": self.limit,
            "key": self.key,
            "algorithm": self.algorithm,
            "remaining": self.remaining,
            "capacity": self.capacity,
            "reset_seconds": self.reset_seconds,
        }
        return shown if self.period is None else {**shown, "period": self.period}


@dataclass(frozen=True)
class Limit:
    """One limit of one policy as configured: where its counters are and how to read them."""

    policy: CountingPolicy[Any]
    label: str
    algorithm: Algorithm

    @property
    def quota(self) -> CalendarQuota | None:
        return self.algorithm if isinstance(self.algorithm, CalendarQuota) else None

    def keys(self, key: str, now_ms: int) -> list[str]:
        return self.policy.counter_keys(self.label, self.algorithm, key, now_ms)

    def counter(self, key: str, stored: KeyState | None, now_ms: int) -> Counter | None:
        """What ``stored`` (a key's state as its counters keep it) leaves ``key``; None for no state."""
        if stored is None:
            return None
        algorithm = _fresh(self.algorithm)
        algorithm.step(stored, now_ms, 0)  # a step of no cost reads without spending
        quota = self.quota
        return Counter(
            policy=self.policy.name,
            route=self.policy.scope,
            limit=self.label,
            key=key,
            algorithm=algorithm.name,
            remaining=int(algorithm.remaining),
            capacity=int(algorithm.capacity()),
            reset_seconds=int(-(-algorithm.reset_ms // 1000)),
            period=quota.ident if quota is not None else None,
        )


def limits_of(policies: list[CountingPolicy[Any]]) -> list[Limit]:
    """Every limit of ``policies`` (a route's plans included)."""
    found: list[Limit] = []
    for policy in policies:
        limiter = policy.limiter
        for rules in [limiter.rules, *limiter.plans.values()]:
            for rule in rules.rules:
                if all(other.label != rule.label or other.policy is not policy for other in found):
                    found.append(Limit(policy, rule.label, rule.algorithm))
    return found


class SharedCounters:
    """Counters on the state backend (Redis)."""

    def __init__(self, state: RedisState) -> None:
        self.state = state

    async def read(self, limit: Limit, key: str, now_ms: int) -> Counter | None:
        """The counter of ``key`` under ``limit``; None when it has none (a whole allowance)."""
        counter_key = self.state.key(limit.keys(key, now_ms)[0])
        return limit.counter(key, await self._stored_state(counter_key, limit, now_ms), now_ms)

    async def keys_counted(self, limit: Limit, now_ms: int) -> list[str]:
        """The keys ``limit`` has a counter for (as far as their hash tags can be read back)."""
        prefix = limit.policy.counter_prefix(limit.label, limit.algorithm.name)
        name = limit.keys("", now_ms)[0]
        pattern = self.state.key("{" + _glob_escape(prefix) + "*}" + name[name.rindex("}") + 1 :])
        found = []
        async for raw in self.state.client.scan_iter(match=pattern, count=1000):
            full = raw.decode("utf-8", "replace")
            tag = full[full.index("{") + 1 : full.rindex("}")]
            found.append(tag[len(prefix) :])
        return sorted(set(found))

    async def reset(self, limit: Limit, key: str, now_ms: int) -> bool:
        """Forget ``key``'s counter under ``limit``: it starts with a whole allowance. True if it had one."""
        deleted: int = await self.state.client.delete(*(self.state.key(k) for k in limit.keys(key, now_ms)))
        return deleted > 0

    async def _stored_state(self, key: str, limit: Limit, now_ms: int) -> KeyState | None:
        algorithm = limit.algorithm.name
        quota = limit.quota
        if quota is not None:
            used = await self.state.client.get(key)
            return None if used is None else KeyState(quota.end, quota.start, int(used), 0)
        if algorithm == "sliding_log":
            stamps = await self.state.client.zrange(key, 0, -1, withscores=True)
            if not stamps:
                return None
            kept = KeyState(0, 0, 0, 0)
            kept.stamps = [int(score) for _, score in stamps]
            return kept
        fields = await self.state.client.hgetall(key)
        if not fields:
            return None
        values = {name.decode(): int(value) for name, value in fields.items()}
        if algorithm in ("fixed_window", "sliding_window"):
            return KeyState(0, values.get("i", 0), values.get("c", 0), values.get("p", 0))
        level = values.get("t" if algorithm == "token_bucket" else "v", 0)
        return KeyState(0, level, values.get("l", 0), 0)


class StoredQuotas:
    """The counters of memory-backed quotas, as the gateways wrote them to the store (up to about a
    second behind); a reset reaches the running gateways within about a second."""

    def __init__(self, store: QuotaStore) -> None:
        self.store = store

    async def read(self, limit: Limit, key: str, now_ms: int) -> Counter | None:
        quota = _quota(limit, now_ms)
        for usage in await self.store.list_quota_usage(limit.policy.scope, key, now_ms / 1000):
            if (usage.quota, usage.period) == (limit.label, quota.ident):
                return limit.counter(key, KeyState(quota.end, quota.start, usage.used, 0), now_ms)
        return None

    async def keys_counted(self, limit: Limit, now_ms: int) -> list[str]:
        quota = _quota(limit, now_ms)
        found = await self.store.list_quota_usage(limit.policy.scope, None, now_ms / 1000)
        return [usage.key for usage in found if (usage.quota, usage.period) == (limit.label, quota.ident)]

    async def reset(self, limit: Limit, key: str, now_ms: int) -> bool:
        quota = _quota(limit, now_ms)
        return await self.store.reset_quota_usage(limit.policy.scope, limit.label, quota.ident, key) > 0


def _quota(limit: Limit, now_ms: int) -> CalendarQuota:
    quota = limit.quota
    if quota is None:
        raise ValueError(f"{limit.policy.name} {limit.label!r} is not a quota: the store keeps quotas only")
    quota.at(now_ms)
    return quota


def _fresh(algorithm: Algorithm) -> Algorithm:
    """A new algorithm with the same numbers, to read a counter without touching the policy's own."""
    if isinstance(algorithm, CalendarQuota):
        return CalendarQuota(algorithm.limit, algorithm.period, algorithm.zone)
    return type(algorithm)(algorithm.limit, algorithm.window_ms, algorithm.burst, algorithm.max_delay_ms)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
