"""What the webhook runtime makes of a verified event, before anyone speaks HTTP.

``WebhookRuntime.accept`` (async sources) and ``.forward`` (sync sources) return one of these;
the ``webhook-ingest`` policy turns it into the answer the sender gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from apigate.outbound.client import ErrorKind


@dataclass(frozen=True, slots=True)
class Stored:
    """The event is durable: ``accepted`` now, or a ``duplicate`` of one the source already sent."""

    status: Literal["accepted", "duplicate"]
    event_id: str


@dataclass(frozen=True, slots=True)
class Handled:
    """A sync source's handler answered: its status, body and content type go back to the sender."""

    status: int
    body: bytes
    content_type: bytes


@dataclass(frozen=True, slots=True)
class Refused:
    """The gateway could not take the event; the sender should send it again.

    ``not_stored``: the store did not commit it. ``unsendable``: a sync source's event has a header
    the outbound client will not send. Otherwise how the sync handler failed (``timeout``,
    ``connect``...: the outbound client's error kinds)."""

    reason: Literal["not_stored", "unsendable"] | ErrorKind


Outcome = Stored | Handled | Refused
