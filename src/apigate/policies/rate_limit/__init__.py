"""The `rate-limit` policy: requests per window per key, exact in one process and across a cluster.

Each limit counts with its algorithm (``policies/limits/algorithms.py``): the weighted sliding
window (default), the exact sliding log, fixed windows, a token bucket (rate plus burst) or a
leaky bucket that delays requests up to ``max_delay`` instead of refusing them. Several limits
apply in order and the first that refuses answers: ``429`` with ``Retry-After`` and the rate
limit fields; passed requests carry the tightest limit's remaining allowance.

Counters live where the state backend does. With ``memory://`` (or ``backend: memory``) each
process counts alone, from memory, at the cost of a dict probe. With Redis each decision is one
Lua script, atomic on the server, so every process and node shares the count exactly; the Redis
backend sends the decisions of one loop turn in one pipelined round trip. When Redis cannot
answer, ``on_redis_error`` decides (allow, as Kong's ``fault_tolerant``, or deny) and the outage
is logged once.

The route shorthand of Pactown gateway files, ``rate_limit: 100/min``, is this policy per client IP.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, ClassVar, Final

from apigate.engine.replies import Reply, json_reply
from apigate.policies.base import Policy
from apigate.policies.limits import clock
from apigate.policies.limits.algorithms import ALGORITHMS
from apigate.policies.limits.config import RATE_FORMS, LimitConfig, RateLimitConfig, parse_rate
from apigate.policies.limits.keys import KeyBuilder
from apigate.policies.limits.local import counters_for
from apigate.policies.limits.scripts import SCRIPTS
from apigate.policies.rate_limit.hotpath import (
    TIER_GROUP,
    TIER_PART,
    TIER_TENANT,
    Limiter,
    Rule,
    RuleSet,
)
from apigate.policies.registry import register
from apigate.policies.services import unavailable
from apigate.state import StateUnavailable
from apigate.state.base import same_slot

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange

log = logging.getLogger("apigate.limits")

_TIER_KINDS: Final = {"group": TIER_GROUP, "tenant": TIER_TENANT}


@register
class RateLimit(Policy[RateLimitConfig]):
    name = "rate-limit"
    order = 2000  # after authentication (~1000): limits may count per consumer
    phases = frozenset({"request"})
    needs = frozenset({"state"})
    shorthand: ClassVar[str | None] = "rate_limit"
    shorthand_forms: ClassVar[str] = RATE_FORMS

    @classmethod
    def expand_shorthand(cls, value: str) -> dict[str, Any] | None:
        try:
            parse_rate(value)
        except ValueError:
            return None
        return {"limits": [{"rate": value}], "key": ["ip"]}

    def prepare(self) -> None:
        config = self.config
        if config.backend == "memory":
            self.needs = frozenset()
        self.scope = self.route if config.scope == "route" else ""  # whose counters these are
        self.outage = False  # Redis has not answered since the last logged failure
        self.redis_errors = 0
        self.limiter = Limiter(
            keys=KeyBuilder(config.key),
            fallback=KeyBuilder(config.fallback_key),
            rules=self._rule_set(config.limits),
            cost=config.cost,
            families=frozenset(config.headers),
            clock=clock.source(),
            local=self._counts_locally,
            remote=self._decide_remotely,
            refuse=self._refuse,
            wait=self._wait,
        )
        tiers = config.tiers
        if tiers is not None:
            plans = {name: self._rule_set(limits) for name, limits in tiers.plans.items()}
            kind = _TIER_KINDS.get(tiers.by, TIER_PART)
            self.limiter.use_tiers(
                kind,
                KeyBuilder([tiers.by]) if kind == TIER_PART else None,
                plans,
                plans[tiers.default] if tiers.default is not None else None,
            )
        self.engine_hooks = {"request": self.limiter.check}

    def _rule_set(self, limits: list[LimitConfig]) -> RuleSet:
        rules = []
        for limit in limits:
            count, window = limit.amount()
            algorithm_class = ALGORITHMS[limit.algorithm or self.config.algorithm]
            wanted = algorithm_class(
                count, round(window * 1000), limit.burst or 0, round((limit.max_delay or 0) * 1000)
            )
            counters = counters_for(self.scope, limit.label(), wanted, self.config.max_keys)
            rules.append(Rule(limit.label(), counters.algorithm, counters, max(round(window), 1)))
        return RuleSet(rules)

    # What the compiled hooks do, for callers other than the engine.
    def on_request(self, exchange: Exchange) -> Reply | Awaitable[Reply | None] | None:
        result: Reply | Awaitable[Reply | None] | None = self.limiter.check(exchange)
        return result

    # -- what the compiled path hands back ---------------------------------------------------------
    def _counts_locally(self) -> bool:
        state = self.services.state
        return self.config.backend == "memory" or state is None or not state.shared

    def _refuse(self, exchange: Exchange, retry_ms: int) -> Reply:
        """429: the limit's fields are in ``exchange.response_lines`` already."""
        retry_after = max(1, -(-retry_ms // 1000))
        payload = {
            "error": "rate limit exceeded",
            "reason": "rate_limited",
            "request_id": exchange.request_id,
            "retry_after": retry_after,
        }
        return json_reply(429, payload, [(b"retry-after", b"%d" % retry_after)])

    async def _wait(self, delay_ms: int) -> None:
        await asyncio.sleep(delay_ms / 1000)

    async def _decide_remotely(self, exchange: Exchange, rules: RuleSet, key: str) -> Reply | None:
        state = self.services.state
        if state is None:
            return unavailable(exchange, "the rate limit's state backend is not running")
        limiter = self.limiter
        now = limiter.clock() // 1_000_000
        tightest: tuple[Rule, int, int] | None = None
        delay_ms = 0
        for rule in rules.rules:
            algorithm = rule.algorithm
            # One hash tag per counter: its keys share a slot, and counters spread over a cluster.
            keys = same_slot(self.scope + "\x1f" + rule.label + "\x1f" + key, "rl", "rl-seq")
            args = [
                now,
                algorithm.limit,
                algorithm.window_ms,
                algorithm.burst,
                algorithm.max_delay_ms,
                limiter.cost,
            ]
            try:
                admitted, remaining, reset_ms, retry_ms, wait_ms = await state.run(
                    SCRIPTS[algorithm.name], keys, args
                )
            except StateUnavailable as exc:
                return self._redis_failed(exchange, exc)
            if not admitted:
                self._redis_answered()
                if limiter.report:
                    limiter.add_lines(exchange, rule, remaining, reset_ms)
                return self._refuse(exchange, retry_ms)
            if tightest is None or remaining < tightest[1]:
                tightest = (rule, remaining, reset_ms)
            delay_ms = max(delay_ms, wait_ms)
        self._redis_answered()
        if limiter.report and tightest is not None:
            limiter.add_lines(exchange, *tightest)
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)
        return None

    def _redis_failed(self, exchange: Exchange, exc: StateUnavailable) -> Reply | None:
        self.redis_errors += 1
        if not self.outage:
            self.outage = True
            verdict = "admitting" if self.config.on_redis_error == "allow" else "refusing"
            log.warning("rate-limit: %s; %s requests until it answers (on_redis_error)", exc, verdict)
        if self.config.on_redis_error == "allow":
            return None
        return unavailable(exchange, "rate limits cannot be checked now")

    def _redis_answered(self) -> None:
        if self.outage:
            self.outage = False
            log.warning("rate-limit: Redis answers again; limits are enforced")

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        state = self.services.state
        local = self.config.backend == "memory" or state is None or not state.shared
        described["counters"] = "this process" if local else "shared (Redis)"
        return described
