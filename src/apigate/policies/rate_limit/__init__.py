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

from typing import Any, ClassVar

from apigate.policies.limits.config import RATE_FORMS, LimitConfig, RateLimitConfig, TiersConfig, parse_rate
from apigate.policies.limits.policy import CountingPolicy
from apigate.policies.registry import register


@register
class RateLimit(CountingPolicy[RateLimitConfig]):
    name = "rate-limit"
    order = 2000  # after authentication (~1000): limits may count per consumer
    shorthand: ClassVar[str | None] = "rate_limit"
    shorthand_forms: ClassVar[str] = RATE_FORMS

    @classmethod
    def expand_shorthand(cls, value: str) -> dict[str, Any] | None:
        try:
            parse_rate(value)
        except ValueError:
            return None
        return {"limits": [{"rate": value}], "key": ["ip"]}

    def limit_sets(self) -> tuple[list[LimitConfig], TiersConfig | None, str, int]:
        config = self.config
        return config.limits, config.tiers, config.algorithm, config.cost
