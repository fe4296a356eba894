"""The clock every limit reads: wall-clock nanoseconds, one source for the whole process.

Windows are aligned to the epoch and decisions on Redis are shared by every node, so limits read
the wall clock (nodes keep it in sync with NTP; a node whose clock is off by d seconds moves its
window edges by d). Tests and plugins replace the source with ``use()`` before the policies are
built (``plugins:`` modules are imported first); each policy reads it once, when it is built.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# An integer clock: the algorithms count in integer milliseconds, and a builtin is the cheapest call.
_source: Callable[[], int] = time.time_ns


def use(source: Callable[[], int]) -> None:
    """Make ``source`` (nanoseconds since the epoch) the clock of the limits built from now on."""
    global _source
    _source = source


def source() -> Callable[[], int]:
    return _source
