"""Deliver by POSTing to an HTTP endpoint; a 2xx answer is a delivery, anything else a failure."""

from __future__ import annotations

import time

from apigate.outbound import HttpClient, OutboundError, Response, retry_after
from apigate.webhooks.config import HttpDestinationConfig
from apigate.webhooks.destinations.base import Destination, Message, Result

# What a handler may answer is read for the record and for sync mode; bigger answers are refused.
MAX_ANSWER = 1 << 20


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
