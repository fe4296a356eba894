"""Asking the stored usage: the time range, grouping and granularity of a question as the CLI and
the admin API take them (each error names the parameter), the answers as JSON, the error summary,
and where a rollup cuts.

Times are ISO 8601 (``2026-03-29T10:00:00Z``, ``2026-03-29``; no offset means UTC), ``now``, or
relative to now (``-1h``, ``-30m``, ``-7d``). Buckets are UTC minutes, hours and days.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from apigate.config.units import parse_duration
from apigate.store.roles.usage import (
    DAY,
    GRANULARITIES,
    GRANULARITY_NAMES,
    GROUP_COLUMNS,
    HOUR,
    MINUTE,
    RollupCutoffs,
    UsageQuery,
    UsageRow,
)

if TYPE_CHECKING:
    from apigate.config.usage import UsageConfig

TOTAL: Final = "total"  # the granularity of one total over the whole range
# The most buckets one question may ask for (a week of minutes); a longer range needs a coarser step.
MAX_BUCKETS: Final = 7 * 24 * 60
# The longest range a question may span (ten years; nothing is kept that long by default).
MAX_RANGE: Final = 10 * 366 * DAY
# A range up to this long is answered per minute, then per hour, beyond that per day.
MINUTES_UP_TO: Final = 6 * HOUR
HOURS_UP_TO: Final = 7 * DAY
GROUP_ALIASES: Final = {"key_id": "key"}


class UsageQueryError(ValueError):
    """A question that cannot be asked; ``parameter`` is the name the caller used."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter


@dataclass(frozen=True, slots=True)
class ParameterNames:
    """What the caller calls each part of a question (CLI flags, query parameters)."""

    start: str
    end: str
    group_by: str
    granularity: str


def parse_time(text: str, now: float, parameter: str) -> int:
    """Unix seconds from an ISO time, ``now`` or ``-<duration>`` (before ``now``)."""
    value = text.strip()
    if not value:
        raise UsageQueryError(parameter, "is empty; give an ISO time such as 2026-03-29T10:00:00Z, or -1h")
    if value == "now":
        return int(now)
    if value.startswith("-"):
        try:
            return int(now - parse_duration(value[1:]))
        except ValueError:
            raise UsageQueryError(
                parameter, f"{text!r} is not a relative time such as -1h, -30m or -7d"
            ) from None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    except ValueError:
        raise UsageQueryError(
            parameter,
            f"{text!r} is not an ISO time such as 2026-03-29T10:00:00Z, nor a relative one such as -1h",
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp())


def parse_group_by(text: str | None, parameter: str) -> tuple[str, ...]:
    """Names of GROUP_COLUMNS from ``consumer,route`` (``key_id`` means ``key``), each once."""
    if text is None or not text.strip():
        return ()
    names: list[str] = []
    for raw in text.split(","):
        name = raw.strip().lower()
        name = GROUP_ALIASES.get(name, name)
        if name not in GROUP_COLUMNS:
            allowed = ", ".join(GROUP_COLUMNS)
            raise UsageQueryError(parameter, f"cannot group by {raw.strip()!r}; choose from {allowed}")
        if name not in names:
            names.append(name)
    return tuple(names)


def choose_granularity(start: int, end: int, asked: str | None, parameter: str) -> int | None:
    """Seconds per bucket (None: one total): as ``asked``, else by the range's length."""
    span = end - start
    if asked is None or not asked.strip():
        return MINUTE if span <= MINUTES_UP_TO else HOUR if span <= HOURS_UP_TO else DAY
    name = asked.strip().lower()
    if name == TOTAL:
        return None
    if name not in GRANULARITIES:
        raise UsageQueryError(parameter, f"{asked!r} is not one of {', '.join([*GRANULARITIES, TOTAL])}")
    step = GRANULARITIES[name]
    if span / step > MAX_BUCKETS:
        raise UsageQueryError(
            parameter,
            f"{name} buckets over this range would be more than {MAX_BUCKETS}; ask for a coarser one",
        )
    return step


def build_query(
    given: Mapping[str, str | None], names: ParameterNames, now: float | None = None, default_span: int = HOUR
) -> UsageQuery:
    """The UsageQuery for the parameters in ``given`` (keyed by ``names``): the range defaults to
    the last ``default_span`` seconds up to now."""
    now = time.time() if now is None else now
    end_text, start_text = given.get(names.end), given.get(names.start)
    end = int(now) if end_text is None else parse_time(end_text, now, names.end)
    start = end - default_span if start_text is None else parse_time(start_text, now, names.start)
    if start >= end:
        raise UsageQueryError(names.start, "must be before the end of the range")
    if end - start > MAX_RANGE:
        raise UsageQueryError(names.start, "the range is longer than ten years")
    group_by = parse_group_by(given.get(names.group_by), names.group_by)
    granularity = choose_granularity(start, end, given.get(names.granularity), names.granularity)
    return UsageQuery(start, end, group_by, granularity)


def parse_timeframe(text: str | None, parameter: str, default: float = DAY) -> int:
    """Seconds of a timeframe such as ``24h`` or ``7d`` (up to ten years)."""
    if text is None:
        return int(default)
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise UsageQueryError(parameter, f"{text!r} is not a duration such as 24h, 30m or 7d") from None
    if not 1 <= seconds <= MAX_RANGE:
        raise UsageQueryError(parameter, "must be at least 1s and at most ten years")
    return int(seconds)


def iso(at: int) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def row_dict(row: UsageRow) -> dict[str, Any]:
    """A row as JSON: its bucket, groups, counts and the average latency."""
    counts = row.counts
    return {
        "start": iso(row.start),
        "granularity": TOTAL if row.granularity is None else GRANULARITY_NAMES[row.granularity],
        **row.groups,
        "requests": counts.requests,
        "client_errors": counts.client_errors,
        "server_errors": counts.server_errors,
        "bytes_in": counts.bytes_in,
        "bytes_out": counts.bytes_out,
        "latency_avg_ms": round(counts.latency_avg_ms, 3),
        "latency_max_ms": round(counts.latency_max_ms, 3),
    }


def answer(query: UsageQuery, rows: Iterable[UsageRow]) -> dict[str, Any]:
    """A query's answer as JSON."""
    return {
        "start": iso(query.start),
        "end": iso(query.end),
        "granularity": TOTAL if query.granularity is None else GRANULARITY_NAMES[query.granularity],
        "group_by": list(query.group_by),
        "rows": [row_dict(row) for row in rows],
    }


ERROR_GROUPS: Final = ("route", "consumer")


def error_summary(rows: Iterable[UsageRow]) -> list[dict[str, Any]]:
    """Errors per route, consumer and status class (4xx, 5xx) from rows of a total grouped by
    ERROR_GROUPS, most first."""
    found: list[dict[str, Any]] = []
    for row in rows:
        for status_class, count in (("4xx", row.counts.client_errors), ("5xx", row.counts.server_errors)):
            if count:
                found.append({**row.groups, "status_class": status_class, "errors": count})
    found.sort(key=lambda entry: (-entry["errors"], str(entry["route"]), str(entry["consumer"])))
    return found


def rollup_cutoffs(usage: UsageConfig, now: float) -> RollupCutoffs:
    """Where a rollup at ``now`` cuts: whole hours and days older than the configured ages."""
    return RollupCutoffs(
        hours_before=_floor(now - usage.rollup.hourly_after, HOUR),
        days_before=_floor(now - usage.rollup.daily_after, DAY),
        delete_before=_floor(now - usage.retention, DAY),
    )


def _floor(at: float, step: int) -> int:
    whole = int(at)
    return whole - whole % step
