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
from apigate.policies.limits.hotpath import (
    COUNTER_KEYS,
    TIER_GROUP,
    TIER_PART,
    TIER_TENANT,
    Limiter,
    Rule,
    RuleSet,
)
from apigate.policies.limits.hybrid import HybridCounters
from apigate.policies.limits.keys import KeyBuilder
from apigate.policies.limits.local import counters_for
from apigate.policies.limits.scripts import SCRIPTS
from apigate.policies.limits.sync import SYNCER
from apigate.policies.services import unavailable
from apigate.state import StateBackend, StateUnavailable
from apigate.state.base import Script
from apigate.state.calls import same_slot

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange

log = logging.getLogger("apigate.limits")
SEPARATOR: Final = "\x1f"  # between the parts of a counter's hash tag: scope, policy:label:algorithm, key

_TIER_KINDS: Final = {"group": TIER_GROUP, "tenant": TIER_TENANT}
CountingConfig = TypeVar("CountingConfig", bound=KeyedLimitsConfig)


class CountingPolicy(Policy[CountingConfig]):
    phases = frozenset({"request"})
    needs = frozenset({"state"})
    refusal: ClassVar[tuple[str, str]] = ("rate limit exceeded", "rate_limited")
    """The error message and reason of a refusal."""
    outage_message: ClassVar[str] = "rate limits cannot be checked now"
    """The error of a 503 while Redis cannot answer (``on_redis_error: deny``)."""

    def limit_sets(self) -> tuple[Sequence[Any], TiersConfig | None, str, int]:
        """The limits that apply, the plans (if any), the limits' default algorithm and a request's cost."""
        raise NotImplementedError

    def prepare(self) -> None:
        config = self.config
        if config.backend == "memory":
            self.needs = frozenset()
        elif config.state_url is not None:  # counted on a Redis of its own, not on state.url
            self.needs = self.needs - {"state"}
            self.state_urls = frozenset({config.state_url})
        limits, tiers, self.algorithm, cost = self.limit_sets()
        self.scope = self.route if config.scope == "route" else ""  # whose counters these are
        self.redis_errors = 0
        self.limiter = Limiter(
            keys=KeyBuilder(config.key),
            fallback=KeyBuilder(config.fallback_key),
            rules=self._rule_set(limits),
            cost=cost,
            families=frozenset(config.headers),
            clock=clock.source(),
            backend=self._shared_state,
            remote=self._decide_remotely,
            refuse=self._refuse,
            wait=self._wait,
            unanswered=self._redis_failed,
            answered_again=self._redis_answered,
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
        self.engine_hooks = {"request": self.limiter}  # called natively by the engine

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
        hybrid = self.config.backend == "hybrid"
        counters = counters_for(self.scope, label, wanted, self.config.max_keys, hybrid)
        tag_prefix = self.counter_prefix(limit.label(), wanted.name)
        if isinstance(counters, HybridCounters):
            self._sync(counters, tag_prefix)
        # A leaky bucket's admitted requests wait: the policy's path decides those.
        script = SCRIPTS[wanted.name] if wanted.name != "leaky_bucket" else None
        return Rule(limit.label(), counters.algorithm, counters, max(round(window), 1), tag_prefix, script)

    def counter_keys(self, label: str, algorithm: Algorithm, key: str, now: int) -> list[str]:
        """The Redis keys of one key's counter under one limit, at ``now`` (ms)."""
        return same_slot(self.counter_prefix(label, algorithm.name) + key, *COUNTER_KEYS)

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

    def counter_prefix(self, label: str, algorithm: str) -> str:
        """What the hash tags of a limit's counters start with (``limits/operations.py`` reads them
        back). The algorithm is part of the name: a limit whose algorithm changes starts afresh
        instead of reading another algorithm's state."""
        return self.scope + SEPARATOR + self.name + ":" + label + ":" + algorithm + SEPARATOR

    def _sync(self, counters: HybridCounters, prefix: str) -> None:
        """Merge ``counters`` through the state backend every ``sync_interval`` (``limits/sync.py``)."""
        SYNCER.watch(
            counters,
            prefix,
            self.config.sync_interval,
            self._state,
            self.name,
        )

    # What the compiled hooks do, for callers other than the engine.
    def on_request(self, exchange: Exchange) -> Reply | Awaitable[Reply | None] | None:
        result: Reply | Awaitable[Reply | None] | None = self.limiter.run(exchange)
        return result

    # -- what the compiled path hands back ---------------------------------------------------------
    def _state(self) -> StateBackend | None:
        """The state backend the policy counts on: its own ``state_url``'s, or ``state.url``'s."""
        url = self.config.state_url
        return self.services.state_at(url) if url is not None else self.services.state

    def _shared_state(self) -> StateBackend | None:
        """The state backend the counters are shared on; None: they are counted in this process."""
        if self.config.backend == "hybrid":
            SYNCER.start()  # asked on the first request: the loop and the state backend run by then
            return None
        state = self._state()
        if self.config.backend == "memory" or state is None or not state.shared:
            return None
        return state

    def _refuse(self, exchange: Exchange, retry_ms: int) -> Reply:
        """429: the limit's fields are in ``exchange.response_lines`` already."""
        retry_after = max(1, -(-retry_ms // 1000))
        message, reason = self.refusal
        exchange.vars()["limited"] = reason  # for the access log: which limit refused
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
        """Several limits (each in turn: a later one is not counted when an earlier one refuses),
        or a leaky bucket (an admitted request may wait), on Redis."""
        state = self._state()
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
        if not self.limiter.outage:
            self.limiter.outage = True
            verdict = "admitting" if self.config.on_redis_error == "allow" else "refusing"
            log.warning("%s: %s; %s requests until it answers (on_redis_error)", self.name, exc, verdict)
        if self.config.on_redis_error == "allow":
            return None
        return unavailable(exchange, self.outage_message)

    def _redis_answered(self) -> None:
        if self.limiter.outage:
            self.limiter.outage = False
            log.warning("%s: Redis answers again; limits are enforced", self.name)

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        state = self._state()
        if self.config.backend == "hybrid" and (state is None or state.shared):
            # (None: not started yet, as when the first config is compiled: the config's word.)
            described["counters"] = f"hybrid (Redis every {_seconds(self.config.sync_interval)})"
        elif self.config.backend in ("memory", "hybrid") or state is None or not state.shared:
            described["counters"] = "this process"
        else:
            described["counters"] = "shared (Redis)"
        return described


def _seconds(seconds: float) -> str:
    """``0.1`` → ``100ms``, ``2.0`` → ``2s``."""
    return f"{round(seconds * 1000)}ms" if seconds < 1 else f"{seconds:g}s"
