"""What the counting policies share (`rate-limit`, `spike-arrest`, `quota`): building their limits
into compiled rules, deciding from memory or on Redis, the 429, and Redis outages.

A subclass says which limits apply (``limit_sets``), how a refusal is worded and its name, and
may build its limits its own way (``rule``: the compiled rule; ``script_call``: the Redis call);
the decision itself is ``limits/hotpath.py``'s ``Limiter`` (compiled), with this class's methods
as the callables it hands anything unusual to.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeVar

from apigate.engine.replies import Reply, json_reply
from apigate.policies.base import Policy
from apigate.policies.limits import clock
from apigate.policies.limits.algorithms import ALGORITHMS, Algorithm
from apigate.policies.limits.config import KeyedLimitsConfig, LimitConfig, TiersConfig
from apigate.policies.limits.hotpath import TIER_GROUP, TIER_PART, TIER_TENANT, Limiter, Rule, RuleSet
from apigate.policies.limits.keys import KeyBuilder
from apigate.policies.limits.local import counters_for
from apigate.policies.limits.scripts import SCRIPTS
from apigate.policies.services import unavailable
from apigate.state import StateUnavailable
from apigate.state.base import Script, same_slot

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange

log = logging.getLogger("apigate.limits")

_TIER_KINDS: Final = {"group": TIER_GROUP, "tenant": TIER_TENANT}
CountingConfig = TypeVar("CountingConfig", bound=KeyedLimitsConfig)


class CountingPolicy(Policy[CountingConfig]):
    phases = frozenset({"request"})
    needs = frozenset({"state"})
    refusal: ClassVar[tuple[str, str]] = ("rate limit exceeded", "rate_limited")
    """The error message and reason of a refusal."""

    def limit_sets(self) -> tuple[Sequence[Any], TiersConfig | None, str, int]:
        """The limits that apply, the plans (if any), the limits' default algorithm and a request's cost."""
        raise NotImplementedError

    def prepare(self) -> None:
        config = self.config
        if config.backend == "memory":
            self.needs = frozenset()
        limits, tiers, self.algorithm, cost = self.limit_sets()
        self.scope = self.route if config.scope == "route" else ""  # whose counters these are
        self.outage = False  # Redis has not answered since the last logged failure
        self.redis_errors = 0
        self.limiter = Limiter(
            keys=KeyBuilder(config.key),
            fallback=KeyBuilder(config.fallback_key),
            rules=self._rule_set(limits),
            cost=cost,
            families=frozenset(config.headers),
            clock=clock.source(),
            local=self._counts_locally,
            remote=self._decide_remotely,
            refuse=self._refuse,
            wait=self._wait,
        )
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

    def _rule_set(self, limits: Sequence[Any]) -> RuleSet:
        return RuleSet([self.rule(limit) for limit in limits])

    def rule(self, limit: LimitConfig) -> Rule:
        """One limit as the hot path meets it, on this process's counters (kept across reloads)."""
        count, window = limit.amount()
        algorithm_class = ALGORITHMS[limit.algorithm or self.algorithm]
        wanted = algorithm_class(
            count, round(window * 1000), limit.burst or 0, round((limit.max_delay or 0) * 1000)
        )
        label = self.name + ":" + limit.label()  # a spike arrest never shares a rate limit's counters
        counters = counters_for(self.scope, label, wanted, self.config.max_keys)
        return Rule(limit.label(), counters.algorithm, counters, max(round(window), 1))

    def counter_tag(self, label: str, key: str) -> str:
        """The hash tag of one key's counter under one limit: its Redis keys share a slot, and
        counters spread over a cluster."""
        return self.scope + "\x1f" + self.name + ":" + label + "\x1f" + key

    def counter_keys(self, label: str, algorithm: Algorithm, key: str, now: int) -> list[str]:
        """The Redis keys of one key's counter under one limit, at ``now`` (ms)."""
        return same_slot(self.counter_tag(label, key), "rl", "rl-seq")

    def script_call(self, rule: Rule, key: str, now: int) -> tuple[Script, list[str], list[Any]]:
        """What deciding ``rule`` for ``key`` on Redis runs: the script, its keys and its arguments."""
        algorithm = rule.algorithm
        keys = self.counter_keys(rule.label, algorithm, key, now)
        args = [
            now,
            algorithm.limit,
            algorithm.window_ms,
            algorithm.burst,
            algorithm.max_delay_ms,
            self.limiter.cost,
        ]
        return SCRIPTS[algorithm.name], keys, args

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
        message, reason = self.refusal
        payload = {
            "error": message,
            "reason": reason,
            "request_id": exchange.request_id,
            "retry_after": retry_after,
        }
        return json_reply(429, payload, [(b"retry-after", b"%d" % retry_after)])

    async def _wait(self, delay_ms: int) -> None:
        await asyncio.sleep(delay_ms / 1000)

    async def _decide_remotely(self, exchange: Exchange, rules: RuleSet, key: str) -> Reply | None:
        state = self.services.state
        if state is None:
            return unavailable(exchange, f"the {self.name} state backend is not running")
        limiter = self.limiter
        now = limiter.clock() // 1_000_000
        tightest: tuple[Rule, int, int] | None = None
        delay_ms = 0
        for rule in rules.rules:
            script, keys, args = self.script_call(rule, key, now)
            try:
                admitted, remaining, reset_ms, retry_ms, wait_ms = await state.run(script, keys, args)
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
            log.warning("%s: %s; %s requests until it answers (on_redis_error)", self.name, exc, verdict)
        if self.config.on_redis_error == "allow":
            return None
        return unavailable(exchange, "rate limits cannot be checked now")

    def _redis_answered(self) -> None:
        if self.outage:
            self.outage = False
            log.warning("%s: Redis answers again; limits are enforced", self.name)

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        state = self.services.state
        local = self.config.backend == "memory" or state is None or not state.shared
        described["counters"] = "this process" if local else "shared (Redis)"
        return described
