"""What the state backend's tests share: the ``run`` fixture's type (conftest), waiting for a condition."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]
DEADLINE = 5.0


async def until(condition: Callable[[], bool], limit: float = DEADLINE) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
