"""Time windows for API keys: when a key may be used, in UTC.

Grammar (case-insensitive, spaces around ``-`` between the times allowed)::

    window  := [days " "] time "-" time
    days    := dayspec ("," dayspec)*
    dayspec := day | day "-" day          a range may wrap: "fri-mon" is fri, sat, sun, mon
    day     := mon | tue | wed | thu | fri | sat | sun
    time    := HH:MM                      00:00 to 23:59; 24:00 only as an end

Examples: ``08:00-18:00`` (every day), ``mon-fri 08:00-18:00``, ``sat,sun 10:00-14:00``,
``mon-fri 22:00-06:00`` (overnight: from 22:00 on the named day to 06:00 the next morning).
The start is included, the end is not. A key with several windows may be used in any of them.
"""

from __future__ import annotations

import re

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY_INDEX = {name: i for i, name in enumerate(DAYS)}
_MINUTES_PER_DAY = 1440
_MINUTES_PER_WEEK = 7 * _MINUTES_PER_DAY
# 1970-01-01 (unix time 0) was a Thursday; Monday is day 0 here.
_EPOCH_WEEKDAY = 3

_WINDOW = re.compile(r"^(?:(?P<days>[a-z][a-z,\-\s]*?)\s+)?(?P<start>[0-9:]+)\s*-\s*(?P<end>[0-9:]+)$")
_TIME = re.compile(r"^(\d{1,2}):(\d{2})$")
EXAMPLE = "expected [DAYS ]HH:MM-HH:MM, for example 'mon-fri 08:00-18:00' or '08:00-18:00' (UTC)"


class WindowError(ValueError):
    """A time window that does not follow the grammar; the message says what is wrong."""


def _minutes(text: str, window: str) -> int:
    match = _TIME.match(text)
    if not match:
        raise WindowError(f"time window {window!r}: {text!r} is not a time; {EXAMPLE}")
    hours, minutes = int(match.group(1)), int(match.group(2))
    if minutes > 59 or hours > 24 or (hours == 24 and minutes):
        raise WindowError(f"time window {window!r}: {text!r} is not a time of day (00:00 to 24:00)")
    return hours * 60 + minutes


def _days(text: str, window: str) -> tuple[int, ...]:
    found: list[int] = []
    for part in text.replace(" ", "").split(","):
        first, sep, last = part.partition("-")
        names = [first, last] if sep else [first]
        for name in names:
            if name not in _DAY_INDEX:
                raise WindowError(
                    f"time window {window!r}: unknown day {name!r} (days are {', '.join(DAYS)})"
                )
        start = _DAY_INDEX[first]
        end = _DAY_INDEX[last] if sep else start
        day = start
        while True:
            if day not in found:
                found.append(day)
            if day == end:
                break
            day = (day + 1) % 7
    return tuple(sorted(found))


class Window:
    """One parsed window: the days it starts on, and start/end as minutes of the day."""

    __slots__ = ("days", "end", "source", "start")

    def __init__(self, source: str, days: tuple[int, ...], start: int, end: int) -> None:
        self.source = source
        self.days = days
        self.start = start
        self.end = end

    def intervals(self) -> list[tuple[int, int]]:
        """[start, end) in minutes of the week (Monday 00:00 = 0), split where the week wraps."""
        out: list[tuple[int, int]] = []
        length = (self.end - self.start) % _MINUTES_PER_DAY or _MINUTES_PER_DAY
        for day in self.days:
            begin = day * _MINUTES_PER_DAY + self.start
            finish = begin + length
            if finish <= _MINUTES_PER_WEEK:
                out.append((begin, finish))
            else:
                out.append((begin, _MINUTES_PER_WEEK))
                out.append((0, finish - _MINUTES_PER_WEEK))
        return out

    def __repr__(self) -> str:
        return f"Window({self.source!r})"


def parse_window(text: str) -> Window:
    """Parse one window; raises ``WindowError`` with a message naming the problem."""
    if not isinstance(text, str):
        raise WindowError(f"time window {text!r}: must be a string; {EXAMPLE}")
    match = _WINDOW.match(" ".join(text.split()).lower())
    if not match:
        raise WindowError(f"time window {text!r}: {EXAMPLE}")
    start = _minutes(match.group("start"), text)
    end = _minutes(match.group("end"), text)
    if start == _MINUTES_PER_DAY:
        raise WindowError(f"time window {text!r}: 24:00 can only end a window")
    if start == end:
        raise WindowError(
            f"time window {text!r}: start and end are the same time (for a whole day write 00:00-24:00)"
        )
    day_text = match.group("days")
    days = _days(day_text, text) if day_text else tuple(range(7))
    canonical = f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"
    if day_text:
        canonical = day_text.replace(" ", "") + " " + canonical
    return Window(canonical, days, start, end)


def check_windows(texts: list[str] | tuple[str, ...]) -> list[str]:
    """Validate windows; returns them in canonical form ("mon-fri 08:00-18:00"), raises ``WindowError``."""
    return [parse_window(text).source for text in texts]


class Schedule:
    """Compiled windows: ``allows(unix_seconds)`` is a few integer comparisons."""

    __slots__ = ("intervals",)

    def __init__(self, windows: list[Window]) -> None:
        merged: list[tuple[int, int]] = []
        for begin, finish in sorted(i for w in windows for i in w.intervals()):
            if merged and begin <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], finish))
            else:
                merged.append((begin, finish))
        self.intervals = tuple(merged)

    @classmethod
    def parse(cls, texts: list[str] | tuple[str, ...]) -> Schedule:
        return cls([parse_window(t) for t in texts])

    def allows(self, now: float) -> bool:
        minute = (int(now) // 60 + _EPOCH_WEEKDAY * _MINUTES_PER_DAY) % _MINUTES_PER_WEEK
        return any(begin <= minute < finish for begin, finish in self.intervals)
