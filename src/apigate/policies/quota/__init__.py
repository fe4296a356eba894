"""The `quota` policy: units per calendar hour, day, week or month in a time zone, per key.

Quotas count like `rate-limit` (the same ``key``, ``fallback_key``, ``scope``, ``tiers``,
``headers``, ``backend`` and ``on_redis_error``), over periods of the calendar of ``timezone``
(``policies/limits/calendar.py``): a day is local midnight to local midnight (23 or 25 hours when
the clocks change), a month the 1st to the 1st. A refusal is ``429`` with reason
``quota_exceeded`` and ``Retry-After`` until the period ends.

Counters survive restarts. With Redis each decision is one Lua script (``script.py``) on a counter
whose key names the period (``...:quota:2026-03-29``), which expires when the period has ended, so
a new period needs no reset. In memory they count in this process and are written behind to the
store every second (``ledger.py``), from which a restarted process, and the others, read them.
"""

from __future__ import annotations

from typing import Any, ClassVar

from apigate.policies.limits.algorithms import Algorithm
from apigate.policies.limits.calendar import NOMINAL_SECONDS, CalendarQuota
from apigate.policies.limits.config import TiersConfig
from apigate.policies.limits.hotpath import Rule
from apigate.policies.limits.policy import CountingPolicy
from apigate.policies.quota.config import QuotaConfig, QuotaLimitConfig, zone
from apigate.policies.quota.ledger import GRACE_MS, LEDGER
from apigate.policies.quota.script import QUOTA_SCRIPT
from apigate.policies.registry import register
from apigate.state.base import Script
from apigate.state.calls import same_slot


@register
class Quota(CountingPolicy[QuotaConfig]):
    name = "quota"
    order = 2050  # after rate-limit (2000): a request refused for its rate spends no quota
    refusal: ClassVar[tuple[str, str]] = ("quota exceeded", "quota_exceeded")
    outage_message: ClassVar[str] = "quotas cannot be checked now"

    def prepare(self) -> None:
        self.zone = zone(self.config.timezone)
        super().prepare()
        self.needs = self.needs | {"quotas"}

    def limit_sets(self) -> tuple[list[QuotaLimitConfig], TiersConfig | None, str, int]:
        config = self.config
        return config.limits, config.tiers, CalendarQuota.name, config.cost

    def rule(self, limit: QuotaLimitConfig) -> Rule:  # type: ignore[override]
        count, period = limit.amount()
        label = limit.label()
        wanted = CalendarQuota(count, period, self.zone)
        memory = self.config.backend == "memory"
        counters = LEDGER.track(self.scope, label, wanted, self.config.max_keys, memory)
        # No script of one round trip on the rule: a quota's keys name the period of each request.
        prefix = self.counter_prefix(label, wanted.name)
        return Rule(label, counters.algorithm, counters, NOMINAL_SECONDS[period], prefix, None)

    def counter_keys(self, label: str, algorithm: Algorithm, key: str, now: int) -> list[str]:
        assert isinstance(algorithm, CalendarQuota)
        algorithm.at(now)
        tag = self.counter_prefix(label, algorithm.name) + key
        return same_slot(tag, "quota:" + algorithm.ident)  # one counter a period

    def script_call(self, rule: Rule, key: str, now: int) -> tuple[Script, list[str], list[Any]]:
        algorithm = rule.algorithm
        assert isinstance(algorithm, CalendarQuota)
        keys = self.counter_keys(rule.label, algorithm, key, now)
        left = algorithm.end - now
        return QUOTA_SCRIPT, keys, [algorithm.limit, self.limiter.cost, left + GRACE_MS, left]

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        if described["counters"] == "this process":
            described["counters"] = "this process, written behind to the store"
        return described
