"""What every destination shares: the message it sends, the result it reports, the interface."""

from __future__ import annotations

import abc
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Message:
    """What is delivered: the original body and kept headers plus the gateway's own headers."""

    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(frozen=True, slots=True)
class Result:
    delivered: bool
    status: int | None = None  # the handler's HTTP status, if it answered
    error: str | None = None  # why it was not delivered, for people
    retry_after: float | None = None  # seconds the handler asked to wait


class Destination(abc.ABC):
    timeout: float
    """Longest one attempt takes; a claim outlives it, so no other process starts the same attempt."""

    @abc.abstractmethod
    async def deliver(self, message: Message) -> Result: ...
