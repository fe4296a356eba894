"""This process's counters, kept across config reloads.

Policies are rebuilt on every reload; their counters must not be, or a reload would hand every
client a fresh allowance. Counters are found by what defines them (the route they count for, or
"" for limits shared by every route; the limit's name, algorithm and numbers; whether they are
hybrid), so an unchanged limit keeps counting and a changed one starts afresh. A hybrid limit's
counters keep the deltas not yet sent to Redis, so a reload loses none.
"""

from __future__ import annotations

from apigate.policies.limits.algorithms import Algorithm, MemoryCounters
from apigate.policies.limits.hybrid import HybridCounters

_counters: dict[tuple[str, str, str, int, int, int, int, bool], MemoryCounters] = {}


def counters_for(
    scope: str, label: str, algorithm: Algorithm, max_keys: int, hybrid: bool = False
) -> MemoryCounters:
    identity = (
        scope,
        label,
        algorithm.name,
        algorithm.limit,
        algorithm.window_ms,
        algorithm.burst,
        algorithm.max_delay_ms,
        hybrid,
    )
    counters = _counters.get(identity)
    if counters is None:
        kind = HybridCounters if hybrid else MemoryCounters
        counters = _counters[identity] = kind(algorithm, max_keys)
    counters.max_keys = max_keys
    return counters


def all_counters() -> dict[tuple[str, str, str, int, int, int, int, bool], MemoryCounters]:
    """Every limit's counters in this process (for `limits show`/`reset` and tests)."""
    return _counters
