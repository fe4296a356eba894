"""Hybrid counters: decided in this process, merged across processes through Redis (compiled).

A key's state is this process's view of its window: ``b``, the count the cluster had when Redis
last answered for the key plus what this process admitted since; ``c`` (sliding windows), the
same for the previous window. A request is decided on that view by the algorithm's own step, so
it costs what a ``MemoryCounters`` decision costs, plus adding the admitted cost to ``pending``
(not sent yet) and queueing the key once per sync interval.

Every ``sync_interval`` (``limits/sync.py``) each queued key's unsent cost goes to Redis, which
adds it to the window's shared count and answers with the cluster's counts; the view becomes
those counts plus what was admitted here while the answer was on its way. Keys that only
refused are queued too (with nothing to add), so a view also learns when a count was reset.
Only counts that add up can merge this way: fixed windows and the weighted sliding window.

A window's deltas are kept per window: ``pending`` for the key's current window ``a``, ``stale``
for the one before, which is still sent once the window has rolled (other processes weigh it).
A send that fails puts its deltas back, for the next interval.
"""

from __future__ import annotations

from typing import Final, cast

from mypy_extensions import i64

from apigate.policies.limits.algorithms import (
    DEFAULT_MAX_KEYS,
    SWEEP_EVERY,
    Algorithm,
    KeyState,
    MemoryCounters,
)

# A key's state is kept to the end of the window after its own: a sliding window still weighs it,
# and its unsent cost can still be sent.
KEPT_WINDOWS: Final = 2


class HybridState(KeyState):
    """A key's view (``a`` window index, ``b`` its count, ``c`` the previous window's count) and
    this process's admissions not yet sent to Redis."""

    __slots__ = ("pending", "queued", "stale")

    def __init__(self, expires: i64, a: i64) -> None:
        super().__init__(expires, a, 0, 0)
        self.pending: i64 = 0  # admitted here in window ``a``, not sent
        self.stale: i64 = 0  # admitted here in window ``a - 1``, not sent
        self.queued = False  # listed for the next sync


class Delta:
    """What one sync sends for one key: ``added`` to window ``index``, ``before`` to the one before."""

    def __init__(self, key: str, state: HybridState, index: i64, added: i64, before: i64) -> None:
        self.key = key
        self.state = state
        self.index: i64 = index
        self.added: i64 = added
        self.before: i64 = before


class HybridCounters(MemoryCounters):
    def __init__(self, algorithm: Algorithm, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        super().__init__(algorithm, max_keys)
        self.sliding = algorithm.name == "sliding_window"
        self.queue: list[str] = []  # keys whose state is ``queued``

    def take(self, key: str, now: i64, cost: i64) -> bool:
        found = self.entries.get(key)
        window = self.algorithm.window_ms
        index = now // window
        if found is None or found.a != index:
            state = self._roll(key, found, index, now)
        else:
            state = cast(HybridState, found)
        algorithm = self.algorithm
        algorithm.step(state, now, cost)  # the state is of this window: the step keeps it
        if algorithm.admitted:
            state.pending += cost
        if not state.queued:
            state.queued = True
            self.queue.append(key)
        return algorithm.admitted

    def _roll(self, key: str, found: KeyState | None, index: i64, now: i64) -> HybridState:
        """The key's state moved to window ``index`` (once per key and window)."""
        expires = (index + KEPT_WINDOWS) * self.algorithm.window_ms
        if found is None:
            state = HybridState(expires, index)
            self.added += 1
            if self.added >= SWEEP_EVERY or len(self.entries) >= self.max_keys:
                self.sweep(now)
            self.entries[key] = state
            return state
        state = cast(HybridState, found)
        if state.a == index - 1:
            # The window just ended becomes the previous one, its unsent cost still to be sent.
            state.c = state.b if self.sliding else 0
            state.stale = state.pending
        else:  # two windows on or more (or a clock set back): nothing of it counts any more
            state.c = 0
            state.stale = 0
        state.a = index
        state.b = 0
        state.pending = 0
        state.expires = expires
        return state

    # -- what the sync does -------------------------------------------------------------------------
    def collect(self) -> list[Delta]:
        """The queued keys' unsent costs, taken out of their states (the sync sends them)."""
        keys = self.queue
        self.queue = []
        batch: list[Delta] = []
        entries = self.entries
        for key in keys:
            found = entries.get(key)
            if found is None:
                continue  # expired or dropped: nothing of it counts any more
            state = cast(HybridState, found)
            if not state.queued:
                continue  # listed twice (dropped and made again): taken already
            state.queued = False
            batch.append(Delta(key, state, state.a, state.pending, state.stale))
            state.pending = 0
            state.stale = 0
        return batch

    def apply(self, delta: Delta, index: i64, current: i64, previous: i64) -> None:
        """Redis's counts after ``delta``: ``current`` of window ``index``, ``previous`` of the one before."""
        state = delta.state
        if self.entries.get(delta.key) is not state:
            return
        if index == state.a:
            # What was admitted here while the answer was on its way is not in it yet.
            state.b = current + state.pending
            if self.sliding:
                state.c = previous + state.stale
        elif index == state.a - 1 and self.sliding:
            state.c = current + state.stale  # the window rolled here meanwhile

    def restore(self, delta: Delta) -> None:
        """``delta`` was not counted (Redis did not answer): send it again next time."""
        state = delta.state
        if self.entries.get(delta.key) is not state:
            return
        if delta.index == state.a:
            state.pending += delta.added
            state.stale += delta.before
        elif delta.index == state.a - 1:
            state.stale += delta.added
        if not state.queued:
            state.queued = True
            self.queue.append(delta.key)

    def unsent(self) -> i64:
        """The cost admitted here and not yet in Redis, over every key (for tests: it reads them all)."""
        total: i64 = 0
        for found in self.entries.values():
            state = cast(HybridState, found)
            total += state.pending + state.stale
        return total
