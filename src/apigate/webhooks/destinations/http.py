"""Deliver by POSTing to an HTTP endpoint; a 2xx answer is a delivery, anything else a failure."""

from __future__ import annotations

import email.utils
import time

from apigate.outbound import HttpClient, OutboundError, Response
from apigate.webhooks.config import HttpDestinationConfig
from apigate.webhooks.destinations.base import Destination, Message, Result

# What a handler may answer is read for the record and for sync mode; bigger answers are refused.
MAX_ANSWER = 1 << 20
MAX_RETRY_AFTER = 86400.0


class HttpDestination(Destination):
    def __init__(self, config: HttpDestinationConfig, client: HttpClient) -> None:
        self.url = config.url
        self.timeout = config.timeout
        self._client = client

    async def send(self, message: Message) -> Response:
        """POST the message and return the whole answer (raises OutboundError)."""
        return await self._client.request(
            "POST", self.url, message.headers, message.body, timeout=self.timeout, max_body=MAX_ANSWER
        )

    async def deliver(self, message: Message) -> Result:
        try:
            response = await self.send(message)
        except OutboundError as exc:
            return Result(False, error=f"{exc.kind}: {exc.message}")
        if 200 <= response.status < 300:
            return Result(True, response.status)
        return Result(
            False,
            response.status,
            f"answered {response.status}",
            retry_after(response.header(b"retry-after"), time.time()),
        )


def retry_after(value: bytes | None, now: float) -> float | None:
    """Seconds from a Retry-After value (delta-seconds or an HTTP date), capped at a day."""
    if not value:
        return None
    text = value.decode("latin-1").strip()
    if text.isdigit():
        seconds = float(text)
    else:
        try:
            seconds = email.utils.parsedate_to_datetime(text).timestamp() - now
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)
