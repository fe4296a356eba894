"""Human units in config: durations ("250ms", "30s", "5m") and sizes ("512KB", "10MiB")."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*$")
_DURATION_FACTOR = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}

# "i" only after a multiplier: "1iB" is no unit.
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_FACTOR = {"": 1, "b": 1}
for _i, _p in enumerate("kmgt", start=1):
    _SIZE_FACTOR[_p] = _SIZE_FACTOR[_p + "b"] = 1000**_i
    _SIZE_FACTOR[_p + "i"] = _SIZE_FACTOR[_p + "ib"] = 1024**_i


def parse_duration(value: object) -> float:
    """Seconds from a number or a string with a unit; raises ValueError naming the accepted forms."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 250ms or 5m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _DURATION_FACTOR[match.group(2)]
    else:
        raise ValueError("expected a duration such as 30s, 250ms or 5m")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from an integer or a string such as 512KB, 10MiB, 1g."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 1048576, 512KB or 10MiB")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        size = int(float(match.group(1)) * _SIZE_FACTOR[(match.group(2) or "").lower()])
    else:
        raise ValueError("expected a size such as 1048576, 512KB or 10MiB")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


Duration = Annotated[float, BeforeValidator(parse_duration)]
ByteSize = Annotated[int, BeforeValidator(parse_size)]
