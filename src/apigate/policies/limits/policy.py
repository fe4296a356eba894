"""What the counting policies share (`rate-limit`, `spike-arrest`): building their limits into
compiled rules, deciding from memory or on Redis, the 429, and Redis outages.

A subclass says which limits apply (``limit_sets``), how a refusal is worded and its name; the
decision itself is ``limits/hotpath.py``'s ``Limiter`` (compiled), with this class's methods as
the callables it hands anything unusual to.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeVar

from apigate.engine.replies import Reply, json_reply
from apigate.policies.base import Policy
from apigate.policies.limits import clock
from apigate.policies.limits.algorithms import ALGORITHMS
from apigate.policies.limits.config import KeyedLimitsConfig, LimitConfig, TiersConfig
from apigate.policies.limits.hotpath import TIER_GROUP, TIER_PART, TIER_TENANT, Limiter, Rule, RuleSet
from apigate.policies.limits.hybrid import HybridCounters
from apigate.policies.limits.keys import KeyBuilder
from apigate.policies.limits.local import counters_for
from apigate.policies.limits.scripts import SCRIPTS
from apigate.policies.limits.sync import SYNCER
from apigate.policies.services import unavailable
from apigate.state import StateUnavailable
from apigate.state.base import same_slot

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

    def limit_sets(self) -> tuple[list[LimitConfig], TiersConfig | None, str, int]:
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

    def _rule_set(self, limits: list[LimitConfig]) -> RuleSet:
        rules = []
        for limit in limits:
            count, window = limit.amount()
            algorithm_class = ALGORITHMS[limit.algorithm or self.algorithm]
            wanted = algorithm_class(
                count, round(window * 1000), limit.burst or 0, round((limit.max_delay or 0) * 1000)
            )
            label = self.name + ":" + limit.label()  # a spike arrest never shares a rate limit's counters
            hybrid = self.config.backend == "hybrid"
            counters = counters_for(self.scope, label, wanted, self.config.max_keys, hybrid)
            if isinstance(counters, HybridCounters):
                self._sync(counters, limit.label())
            rules.append(Rule(limit.label(), counters.algorithm, counters, max(round(window), 1)))
        return RuleSet(rules)

    def counter_prefix(self, label: str) -> str:
        """What the keys of a limit's counters start with (``limits/operations.py`` reads them back)."""
        return self.scope + "\x1f" + self.name + ":" + label + "\x1f"

    def _sync(self, counters: HybridCounters, label: str) -> None:
        """Merge ``counters`` through the state backend every ``sync_interval`` (``limits/sync.py``)."""
        SYNCER.watch(
            counters,
            self.counter_prefix(label),
            self.config.sync_interval,
            lambda: self.services.state,
            self.name,
        )

    # What the compiled hooks do, for callers other than the engine.
    def on_request(self, exchange: Exchange) -> Reply | Awaitable[Reply | None] | None:
        result: Reply | Awaitable[Reply | None] | None = self.limiter.check(exchange)
        return result

    # -- what the compiled path hands back ---------------------------------------------------------
    def _counts_locally(self) -> bool:
        if self.config.backend == "hybrid":
            SYNCER.start()  # asked on the first request: the loop and the state backend run by then
            return True
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
            algorithm = rule.algorithm
            # One hash tag per counter: its keys share a slot, and counters spread over a cluster.
            keys = same_slot(self.counter_prefix(rule.label) + key, "rl", "rl-seq")
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
        if self.config.backend == "hybrid" and (state is None or state.shared):
            # (None: not started yet, as when the first config is compiled: the config's word.)
            described["counters"] = f"hybrid (Redis every {_seconds(self.config.sync_interval)})"
        elif self.config.backend == "memory" or state is None or not state.shared:
            described["counters"] = "this process"
        else:
            described["counters"] = "shared (Redis)"
        return described


def _seconds(seconds: float) -> str:
    """``0.1`` → ``100ms``, ``2.0`` → ``2s``."""
    return f"{round(seconds * 1000)}ms" if seconds < 1 else f"{seconds:g}s"
