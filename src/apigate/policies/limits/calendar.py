"""Quotas on a calendar: periods of a time zone's wall clock, the quota's step, and counters that
note which keys changed (compiled with the engine).

A period is an hour, a day, an ISO week (from Monday) or a month of the wall clock in a time zone
(``zoneinfo``). A day runs from local midnight to the next local midnight, so it lasts 23 or 25
hours on the days the clocks change; a month from the 1st at 00:00 to the next 1st; an hour from
the moment the local clock shows HH:00 until it next does (an hour long, also when the clocks
change: 02:00-03:00 happens twice on the night they go back, and those are two hours). A period
has an id (``2026-03-29``, ``2026-W13``, ``2026-03``, ``2026-10-25T02:00+01:00``) that names its
counters, so a new period starts with new counters and nothing has to be reset.

The step is a counter per key and period, in integer milliseconds like the other algorithms;
only a step whose clock left the cached period computes the next one (a few microseconds, once
per period).
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, tzinfo
from typing import ClassVar, Final

from mypy_extensions import i64

from apigate.policies.limits.algorithms import Algorithm, FixedWindow, KeyState, MemoryCounters

PERIODS: Final = ("hour", "day", "week", "month")
# What a period counts as in RateLimit-Policy's ``w`` (a month as 30 days: the field has one number).
NOMINAL_SECONDS: Final[dict[str, int]] = {"hour": 3600, "day": 86400, "week": 7 * 86400, "month": 30 * 86400}


def period_at(kind: str, zone: tzinfo, now_ms: int) -> tuple[int, int, str]:
    """(start ms, end ms, id) of the ``kind`` period of ``zone`` that holds the instant ``now_ms``."""
    now_s = now_ms // 1000  # period edges fall on whole seconds
    local = datetime.fromtimestamp(now_s, zone)
    if kind == "hour":
        start_s = now_s - local.minute * 60 - local.second
        ident = datetime.fromtimestamp(start_s, zone).isoformat(timespec="minutes")
        return start_s * 1000, (start_s + 3600) * 1000, ident
    day = local.date()
    if kind == "day":
        first, following = day, day + timedelta(days=1)
        ident = day.isoformat()
    elif kind == "week":
        first = day - timedelta(days=day.weekday())
        following = first + timedelta(days=7)
        year, week, _ = first.isocalendar()
        ident = f"{year}-W{week:02d}"
    elif kind == "month":
        first = date(day.year, day.month, 1)
        following = date(day.year + day.month // 12, day.month % 12 + 1, 1)
        ident = f"{day.year:04d}-{day.month:02d}"
    else:
        raise ValueError(f"unknown period {kind!r}; periods are {', '.join(PERIODS)}")
    return first_instant(zone, first) * 1000, first_instant(zone, following) * 1000, ident


def first_instant(zone: tzinfo, day: date) -> int:
    """The first second (since the epoch) whose wall clock in ``zone`` shows ``day``: its midnight,
    or, where the clocks jump over midnight, the moment they land after it."""
    wall = datetime(day.year, day.month, day.day)
    # fold=0 reads a wall time with the offset before a change, fold=1 with the one after it.
    before = int(wall.replace(tzinfo=zone).timestamp())
    after = int(wall.replace(tzinfo=zone, fold=1).timestamp())
    if before <= after:
        return before  # an ordinary midnight, or the first of two
    # The clocks jump over midnight: the day starts at the jump, which lies between the two readings.
    low, high = after, before  # the wall clock shows the day before at ``low``, this day at ``high``
    while high - low > 1:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, zone).replace(tzinfo=None) >= wall:
            high = middle
        else:
            low = middle
    return high


class CalendarQuota(FixedWindow):
    """``limit`` units per calendar period; a key's count starts again with each period (a fixed
    window whose edges are the calendar's).

    State: ``a`` the period's start (ms), ``b`` the count, ``c`` how much of the count the store
    holds (memory-backed quotas write the rest behind, see ``QuotaCounters``); expires at the
    period's end.
    """

    name: ClassVar[str] = "quota"

    def __init__(self, limit: i64, period: str, zone: tzinfo) -> None:
        super().__init__(limit, NOMINAL_SECONDS[period] * 1000)
        self.period = period
        self.zone = zone
        # The period of the last step (start > end: none yet).
        self.start: i64 = 1
        self.end: i64 = 0
        self.ident = ""

    def at(self, now: i64) -> None:
        """Make ``start``, ``end`` and ``ident`` those of the period holding ``now``."""
        if now < self.start or now >= self.end:
            start, end, ident = period_at(self.period, self.zone, now)
            self.start = start
            self.end = end
            self.ident = ident

    def ident_of(self, start: i64) -> str:
        """The id of the period that starts at ``start`` (ms)."""
        if start == self.start:
            return self.ident
        return period_at(self.period, self.zone, start)[2]

    def step(self, state: KeyState | None, now: i64, cost: i64) -> KeyState:
        self.at(now)
        return self.count(state, now, cost, self.start, self.end)


class QuotaCounters(MemoryCounters):
    """A quota's counters in this process, noting the keys whose count grew (``changed``), so that
    only those are written to the store."""

    def __init__(self, algorithm: Algorithm, max_keys: int) -> None:
        super().__init__(algorithm, max_keys)
        self.changed: set[str] = set()

    def take(self, key: str, now: i64, cost: i64) -> bool:
        if super().take(key, now, cost):
            self.changed.add(key)
            return True
        return False

    def settle(self, key: str, stored: i64, now: i64) -> None:
        """The store holds ``stored`` for ``key`` in the current period: count that, plus what this
        process admitted and has not written yet."""
        algorithm = self.algorithm
        assert isinstance(algorithm, CalendarQuota)
        algorithm.at(now)
        state = self.peek(key, now)
        if state is None or state.a != algorithm.start:
            state = KeyState(algorithm.end, algorithm.start, 0, 0)
            if key not in self.entries and len(self.entries) >= self.max_keys:
                self.sweep(now)  # the store may hold more keys than memory keeps
            self.entries[key] = state
        state.b = stored + state.b - state.c
        state.c = stored
