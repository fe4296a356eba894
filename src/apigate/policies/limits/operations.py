"""Reading and resetting the counters of the counting policies where they are shared (Redis).

The logic behind `apigate limits show|reset`, kept apart from the CLI so that the admin API can
call it too. Counters in memory (``state: memory://`` or ``backend: memory``) live inside each
gateway process and cannot be reached from outside it; these functions work on the state
backend's shared counters.

A counter's keys are ``same_slot(scope + US + policy:label + US + key, "rl", "rl-seq")``
(US = ``\\x1f``; scope = the route's name, or "" for ``scope: global``), as
``policy.CountingPolicy`` makes them. Listing reads them back by their hash tag; a tag that had
to be replaced by its digest (a key holding a brace) is found only by naming its key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from apigate.policies.limits.algorithms import Algorithm, KeyState
from apigate.policies.limits.policy import CountingPolicy
from apigate.state.base import same_slot
from apigate.state.redis import RedisState


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

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "route": self.route or None,
            "limit": self.limit,
            "key": self.key,
            "algorithm": self.algorithm,
            "remaining": self.remaining,
            "capacity": self.capacity,
            "reset_seconds": self.reset_seconds,
        }


@dataclass(frozen=True)
class Limit:
    """One limit of one policy as configured: where its counters are and how to read them."""

    policy: CountingPolicy[Any]
    label: str
    algorithm: Algorithm

    @property
    def prefix(self) -> str:
        return self.policy.counter_prefix(self.label)

    def keys(self, key: str) -> list[str]:
        return same_slot(self.prefix + key, "rl", "rl-seq")


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


async def read(state: RedisState, limit: Limit, key: str, now_ms: int) -> Counter | None:
    """The counter of ``key`` under ``limit``; None when it has none (a whole allowance)."""
    counter_key, _ = (state.key(k) for k in limit.keys(key))
    stored = await _stored_state(state, counter_key, limit.algorithm.name)
    if stored is None:
        return None
    algorithm = type(limit.algorithm)(
        limit.algorithm.limit, limit.algorithm.window_ms, limit.algorithm.burst, limit.algorithm.max_delay_ms
    )
    algorithm.step(stored, now_ms, 0)  # a step of no cost reads without spending
    return Counter(
        policy=limit.policy.name,
        route=limit.policy.scope,
        limit=limit.label,
        key=key,
        algorithm=algorithm.name,
        remaining=int(algorithm.remaining),
        capacity=int(algorithm.capacity()),
        reset_seconds=int(-(-algorithm.reset_ms // 1000)),
    )


async def keys_counted(state: RedisState, limit: Limit) -> list[str]:
    """The keys ``limit`` has a counter for (as far as their hash tags can be read back)."""
    pattern = state.key("{" + _glob_escape(limit.prefix) + "*}:rl")
    found = []
    async for raw in state.client.scan_iter(match=pattern, count=1000):
        full = raw.decode("utf-8", "replace")
        tag = full[full.index("{") + 1 : full.rindex("}")]
        found.append(tag[len(limit.prefix) :])
    return sorted(set(found))


async def reset(state: RedisState, limit: Limit, key: str) -> bool:
    """Forget ``key``'s counter under ``limit``: it starts with a whole allowance. True if it had one."""
    deleted: int = await state.client.delete(*(state.key(k) for k in limit.keys(key)))
    return deleted > 0


async def _stored_state(state: RedisState, key: str, algorithm: str) -> KeyState | None:
    if algorithm == "sliding_log":
        stamps = await state.client.zrange(key, 0, -1, withscores=True)
        if not stamps:
            return None
        kept = KeyState(0, 0, 0, 0)
        kept.stamps = [int(score) for _, score in stamps]
        return kept
    fields = await state.client.hgetall(key)
    if not fields:
        return None
    values = {name.decode(): int(value) for name, value in fields.items()}
    if algorithm in ("fixed_window", "sliding_window"):
        return KeyState(0, values.get("i", 0), values.get("c", 0), values.get("p", 0))
    level = values.get("t" if algorithm == "token_bucket" else "v", 0)
    return KeyState(0, level, values.get("l", 0), 0)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
