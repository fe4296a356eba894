"""The limiting algorithms, in integer milliseconds, as one step each on one key's state.

Each algorithm is a small class whose ``step(state, now, cost)`` reads one key's state (a list
of ints, or None when the key has none), decides, and returns the state to keep. The decision
itself is left on the instance (``admitted``, ``remaining``, ``reset_ms``, ``retry_ms``,
``delay_ms``), which the caller reads right after the call: a decision then allocates nothing
but a new key's list. The same steps run in ``MemoryCounters`` (one process) and, as Lua with
the same arithmetic, on Redis (``scripts.py``); tests run both on the same inputs.

All arithmetic is on integers, native 64-bit ones (``i64``) when compiled: mypyc's arbitrary-size
``int`` takes a slow path for any product with a factor above 2**31, and a millisecond clock
is above that. Time is in milliseconds, and bucket levels scaled by ``window_ms``
so that a rate of ``limit`` per ``window_ms`` adds or drains whole numbers. Floating point would
make "exactly 100 of 500" depend on rounding. Lua's numbers are doubles, exact up to 2**53: the
largest product here is about ``2 x max(limit, burst) x window_ms``, which the config keeps
below ``MAX_PRODUCT``.

A key's state is a ``KeyState``: its expiry (ms) and three integers whose meaning each algorithm
gives (native attributes, so reading and writing them allocates nothing); the sliding log keeps
its stamps in ``stamps``.
"""

from __future__ import annotations

from typing import ClassVar, Final

from mypy_extensions import i64

# What ``MemoryCounters`` keeps at most by default; past it the oldest keys are dropped.
DEFAULT_MAX_KEYS: Final = 1_000_000
# Bound of limit x window_ms (and burst x window_ms): the products stay exact in Lua's doubles.
MAX_PRODUCT: Final = 2**51
# Expired keys are swept after this many new keys (or half the size, if larger).
SWEEP_EVERY: Final = 1024


class KeyState:
    __slots__ = ("a", "b", "c", "expires", "stamps")

    def __init__(self, expires: i64, a: i64, b: i64, c: i64) -> None:
        self.expires: i64 = expires
        self.a: i64 = a
        self.b: i64 = b
        self.c: i64 = c
        self.stamps: list[int] = []

    def copy(self) -> KeyState:
        state = KeyState(self.expires, self.a, self.b, self.c)
        state.stamps = list(self.stamps)
        return state


class Algorithm:
    """One limit: ``limit`` units per ``window_ms``; ``step`` decides one request of ``cost`` units."""

    name: ClassVar[str] = ""

    def __init__(self, limit: i64, window_ms: i64, burst: i64 = 0, max_delay_ms: i64 = 0) -> None:
        self.limit: i64 = limit
        self.window_ms: i64 = window_ms
        self.burst: i64 = burst if burst > 0 else limit
        self.max_delay_ms: i64 = max_delay_ms
        # The last decision (read by the caller right after ``step``).
        self.admitted = False
        self.remaining: i64 = 0
        self.reset_ms: i64 = 0  # until the allowance is whole again (or the window ends)
        self.retry_ms: i64 = 0  # until a refused request could pass
        self.delay_ms: i64 = 0  # how long an admitted request waits first (leaky bucket only)

    def step(self, state: KeyState | None, now: i64, cost: i64) -> KeyState:
        raise NotImplementedError

    def capacity(self) -> i64:
        """The most one key may spend at once (what ``remaining`` is out of)."""
        return self.limit


class FixedWindow(Algorithm):
    """Counts per window aligned to the epoch; a burst may straddle two windows (up to 2xlimit)."""

    name: ClassVar[str] = "fixed_window"

    def step(self, state: KeyState | None, now: i64, cost: i64) -> KeyState:
        index = now // self.window_ms
        return self.count(state, now, cost, index, (index + 1) * self.window_ms)

    def count(self, state: KeyState | None, now: i64, cost: i64, window: i64, end: i64) -> KeyState:
        """Count ``cost`` in the window named ``window`` (its index; a quota's period start), which
        ends at ``end``."""
        if state is None or state.a != window:
            state = KeyState(end, window, 0, 0)
        count = state.b
        self.reset_ms = end - now
        self.delay_ms = 0
        if count + cost > self.limit:
            self.admitted = False
            self.remaining = max(self.limit - count, 0)
            self.retry_ms = end - now
            return state
        state.b = count + cost
        self.admitted = True
        self.remaining = self.limit - count - cost
        self.retry_ms = 0
        return state


class SlidingWindow(Algorithm):
    """The weighted two-window estimate: the previous window's count, weighted by how much of it
    still overlaps the sliding window, plus the current one's. O(1) per key."""

    name: ClassVar[str] = "sliding_window"

    def step(self, state: KeyState | None, now: i64, cost: i64) -> KeyState:
        window = self.window_ms
        limit = self.limit
        index = now // window
        start = index * window
        if state is None or state.a < index - 1:
            state = KeyState(start + 2 * window, index, 0, 0)
        elif state.a == index - 1:
            state = KeyState(start + 2 * window, index, 0, state.b)
        current = state.b
        previous = state.c
        left = window - (now - start)  # how much of the previous window still counts, in ms
        # estimate = previous * left / window + current; compared times window, in integers.
        weighted = previous * left + current * window
        self.delay_ms = 0
        if weighted + cost * window > limit * window:
            self.admitted = False
            self.remaining = max((limit * window - weighted) // window, 0)
            self.retry_ms = self._retry(current, previous, left, cost, now - start)
            self.reset_ms = _until_empty(current, previous, start + window - now, window)
            return state
        state.b = current + cost
        self.reset_ms = _until_empty(current + cost, previous, start + window - now, window)
        self.admitted = True
        self.remaining = (limit * window - weighted - cost * window) // window
        self.retry_ms = 0
        return state

    def _retry(self, current: i64, previous: i64, left: i64, cost: i64, elapsed: i64) -> i64:
        """Milliseconds until the estimate leaves room for ``cost``."""
        window = self.window_ms
        room = self.limit - current - cost
        if room >= 0 and previous > 0:
            # previous * (window - e) <= room * window  →  e >= window - room * window / previous
            needed = window - (room * window) // previous
            return max(needed - elapsed, 1)
        # Not before the next window, where this window's count becomes the weighted one.
        to_next = window - elapsed
        room = self.limit - cost
        if current <= 0 or room >= current:
            return to_next
        if room < 0:
            return to_next + window  # more than the limit at once: never, but say a window
        return to_next + window - (room * window) // current


class SlidingLog(Algorithm):
    """The exact sliding window: one timestamp per unit admitted in the last window. Memory grows
    with the limit (at most ``limit`` stamps per key)."""

    name: ClassVar[str] = "sliding_log"

    def step(self, state: KeyState | None, now: i64, cost: i64) -> KeyState:
        window = self.window_ms
        if state is None:
            state = KeyState(now + window, 0, 0, 0)
        stamps = state.stamps  # in time order
        first = 0
        size = len(stamps)
        while first < size and stamps[first] <= now - window:
            first += 1
        if first:
            del stamps[:first]
        count = len(stamps)
        self.delay_ms = 0
        if count + cost > self.limit:
            self.admitted = False
            self.remaining = max(self.limit - count, 0)
            # The oldest stamps must leave until ``cost`` fits.
            must_leave = count + cost - self.limit
            self.retry_ms = (stamps[must_leave - 1] + window - now) if must_leave <= count else window
            self.reset_ms = stamps[count - 1] + window - now if count else 0
            return state
        for _ in range(cost):
            stamps.append(now)
        state.expires = now + window
        self.admitted = True
        self.remaining = self.limit - count - cost
        self.retry_ms = 0
        self.reset_ms = window
        return state


class TokenBucket(Algorithm):
    """``burst`` tokens, refilled at ``limit`` per window; a request takes ``cost`` tokens.

    Tokens are kept scaled by ``window_ms`` (one token = ``window_ms`` units; a millisecond
    refills ``limit`` units), so refills are exact integers.
    """

    name: ClassVar[str] = "token_bucket"

    def capacity(self) -> i64:
        return self.burst

    def step(self, state: KeyState | None, now: i64, cost: i64) -> KeyState:
        window = self.window_ms
        rate = self.limit  # units refilled per millisecond
        full = self.burst * window
        if state is None:
            state = KeyState(0, full, now, 0)
        else:
            elapsed = now - state.b
            if elapsed > 0:
                state.a = min(full, state.a + min(elapsed, full // rate + 1) * rate)
                state.b = now
        tokens = state.a
        need = cost * window
        self.delay_ms = 0
        if need > tokens:
            self.admitted = False
            self.remaining = tokens // window
            self.retry_ms = _ceil_div(need - tokens, rate) if need <= full else self._forever()
            self.reset_ms = _ceil_div(full - tokens, rate)
        else:
            tokens -= need
            state.a = tokens
            self.admitted = True
            self.remaining = tokens // window
            self.retry_ms = 0
            self.reset_ms = _ceil_div(full - tokens, rate)
        state.expires = now + self.reset_ms + window  # a full bucket is the same as no key
        return state

    def _forever(self) -> i64:
        return self.window_ms * self.burst


class LeakyBucket(Algorithm):
    """Shapes instead of refusing: requests leave at ``limit`` per window, each waiting its turn;
    one that would wait longer than ``max_delay_ms`` is refused.

    The level is the queued work in the same units as TokenBucket (a request adds ``window_ms``
    units, a millisecond drains ``limit``), so a request's wait is ``level / limit`` ms.
    """

    name: ClassVar[str] = "leaky_bucket"

    def capacity(self) -> i64:
        # Requests that fit in the queue at once: one leaving now plus those waiting up to max_delay.
        return 1 + (self.max_delay_ms * self.limit) // self.window_ms

    def step(self, state: KeyState | None, now: i64, cost: i64) -> KeyState:
        rate = self.limit
        window = self.window_ms
        if state is None:
            state = KeyState(0, 0, now, 0)
        else:
            elapsed = now - state.b
            if elapsed > 0:
                state.a = max(0, state.a - elapsed * rate)
                state.b = now
        level = state.a
        wait = _ceil_div(level, rate)
        capacity = self.capacity()
        if wait > self.max_delay_ms:
            self.admitted = False
            self.delay_ms = 0
            self.remaining = 0
            self.retry_ms = _ceil_div(level - self.max_delay_ms * rate, rate)
        else:
            level += cost * window
            state.a = level
            self.admitted = True
            self.delay_ms = wait
            self.retry_ms = 0
            self.remaining = max(capacity - _ceil_div(level, window), 0)
        self.reset_ms = _ceil_div(state.a, rate)
        state.expires = now + self.reset_ms + window  # an empty bucket is the same as no key
        return state


ALGORITHMS: Final[dict[str, type[Algorithm]]] = {
    cls.name: cls for cls in (FixedWindow, SlidingWindow, SlidingLog, TokenBucket, LeakyBucket)
}


def _until_empty(current: i64, previous: i64, to_next: i64, window: i64) -> i64:
    """When a sliding window counts nothing any more: this window's count weighs until the end of the
    next one, the previous window's until the end of this one."""
    if current > 0:
        return to_next + window
    return to_next if previous > 0 else 0


def _ceil_div(a: i64, b: i64) -> i64:
    return -(-a // b)


class MemoryCounters:
    """One algorithm's state per key, in this process: exact within it, nothing shared.

    Expired keys are dropped when met and in a sweep every ``SWEEP_EVERY`` new keys; past
    ``max_keys`` the oldest keys are dropped, so a flood of new keys cannot grow memory without
    bound (it can only forget keys, which admits, never refuses, wrongly).
    """

    def __init__(self, algorithm: Algorithm, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.algorithm = algorithm
        self.max_keys = max_keys
        self.entries: dict[str, KeyState] = {}
        self.added = 0

    def take(self, key: str, now: i64, cost: i64) -> bool:
        """Decide for ``key``; the details are on ``self.algorithm`` until the next call."""
        entries = self.entries
        state = entries.get(key)
        if state is not None and state.expires <= now:
            state = None
        kept = self.algorithm.step(state, now, cost)
        if kept is not state:
            if key not in entries:
                self.added += 1
                if self.added >= SWEEP_EVERY or len(entries) >= self.max_keys:
                    self.sweep(now)
            entries[key] = kept
        return self.algorithm.admitted

    def peek(self, key: str, now: i64) -> KeyState | None:
        state = self.entries.get(key)
        return state if state is not None and state.expires > now else None

    def sweep(self, now: i64) -> None:
        self.added = 0
        entries = self.entries
        for key in [k for k, state in entries.items() if state.expires <= now]:
            del entries[key]
        if len(entries) >= self.max_keys:
            # Dicts keep insertion order: the first keys are the oldest. Room for a run of keys.
            for key in list(entries)[: len(entries) - self.max_keys + max(1, self.max_keys // 100)]:
                del entries[key]

    def reset(self, prefix: str) -> int:
        """Forget every key that starts with ``prefix``; how many."""
        gone = [key for key in self.entries if key.startswith(prefix)]
        for key in gone:
            del self.entries[key]
        return len(gone)
