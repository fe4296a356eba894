"""The `spike-arrest` policy: a rate turned into a ceiling on every second, against bursts.

``rate: 600/min`` admits at most 10 requests in any one second (an exact sliding log over one
second), so a client cannot spend a minute's allowance in a burst; a rate below one a second
admits one request per interval (``30/min``: one in any two seconds). It counts like
`rate-limit` (the same keys, backends and Redis behaviour) and runs just before it, so a route
may have both: a steady allowance per minute or day and no spikes. A refusal is ``429`` with
reason ``spike_arrested`` and ``Retry-After``; it sends no rate-limit fields unless ``headers``
names them.
"""

from __future__ import annotations

from typing import ClassVar

from apigate.policies.limits.config import LimitConfig, SpikeArrestConfig, TiersConfig
from apigate.policies.limits.policy import CountingPolicy
from apigate.policies.registry import register


@register
class SpikeArrest(CountingPolicy[SpikeArrestConfig]):
    name = "spike-arrest"
    order = 1990  # after authentication, before rate-limit
    refusal: ClassVar[tuple[str, str]] = ("too many requests at once", "spike_arrested")

    def limit_sets(self) -> tuple[list[LimitConfig], TiersConfig | None, str, int]:
        return [self.config.ceiling()], None, "sliding_log", 1
