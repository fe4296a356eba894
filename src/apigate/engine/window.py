"""Two counts over a sliding window of time, in ten buckets (no list of events kept)."""

from __future__ import annotations

from typing import Final

BUCKETS: Final = 10


class WindowCounts:
    """Counts of two things (requests and failures, requests and retries) over the last
    ``window`` seconds, to a tenth of the window; ``now`` is monotonic seconds, given."""

    __slots__ = ("_firsts", "_seconds", "_slots", "window")

    def __init__(self, window: float) -> None:
        self.window = window
        self._slots = [-1] * BUCKETS  # the slot number each bucket counts
        self._firsts = [0] * BUCKETS
        self._seconds = [0] * BUCKETS

    def add(self, now: float, first: int, second: int) -> None:
        slot = int(now * BUCKETS / self.window)
        index = slot % BUCKETS
        if self._slots[index] != slot:
            self._slots[index] = slot
            self._firsts[index] = 0
            self._seconds[index] = 0
        self._firsts[index] += first
        self._seconds[index] += second

    def totals(self, now: float) -> tuple[int, int]:
        oldest = int(now * BUCKETS / self.window) - BUCKETS + 1
        firsts = seconds = 0
        for index in range(BUCKETS):
            if self._slots[index] >= oldest:
                firsts += self._firsts[index]
                seconds += self._seconds[index]
        return firsts, seconds

    def clear(self) -> None:
        self._slots = [-1] * BUCKETS
