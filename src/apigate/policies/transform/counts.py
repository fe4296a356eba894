"""What the `transform` policy did with each body it could map, counted per route and direction.

A count is one list slot added to (``counts[MAPPED] += 1``): nothing is formatted or looked up by
name per request. The lists live here, by (route, direction), for the life of the process, so a
reload's new policy instances go on counting where the last ones stopped, as the engine's route
meters do; ``rows()`` is what the process hands the node, which adds up every worker's rows
(observe/metrics.py) and shows them as ``apigate_transform_bodies_total{route,direction,outcome}``.
"""

from __future__ import annotations

from typing import Final

# Every outcome, in slot order: what ``body_counts`` and the metric's ``outcome`` label say.
OUTCOMES: Final = (
    "mapped",  # changed by the mapping and sent on
    "unchanged",  # read, and the mapping changed nothing: sent as it came
    "not_json",  # a content type that is neither JSON (nor XML where XML is converted)
    "encoded",  # a Content-Encoding (gzip...): sent as it came
    "too_large",  # over the size limit: streamed through as it came
    "malformed",  # not JSON that can be read: sent as it came
    "too_deep",  # nested deeper than can be written back: sent as it came
    "xml",  # converted: an XML request to JSON, or a JSON response to XML
    "xml_refused",  # an XML request refused (DTD, entities, malformed, over the size limit...)
)
MAPPED, UNCHANGED, NOT_JSON, ENCODED, TOO_LARGE, MALFORMED, TOO_DEEP, XML, XML_REFUSED = range(len(OUTCOMES))
SLOTS: Final = {name: slot for slot, name in enumerate(OUTCOMES)}
DIRECTIONS: Final = ("request", "response")

_COUNTS: dict[tuple[str, str], list[int]] = {}


def counts_for(route: str, direction: str) -> list[int]:
    """The slots of ``route``'s bodies in ``direction`` (made on first use, kept across reloads)."""
    key = (route, direction)
    found = _COUNTS.get(key)
    if found is None:
        found = _COUNTS[key] = [0] * len(OUTCOMES)
    return found


def as_dict(counts: list[int]) -> dict[str, int]:
    """Slots by outcome name (what tests and describe() read)."""
    return dict(zip(OUTCOMES, counts, strict=True))


def rows() -> list[list[object]]:
    """Every non-zero count as [route, direction, outcome, n], for the node's merged metrics."""
    return [
        [route, direction, OUTCOMES[slot], count]
        for (route, direction), counts in _COUNTS.items()
        for slot, count in enumerate(counts)
        if count
    ]
