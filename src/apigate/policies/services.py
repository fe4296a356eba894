"""The shared services a policy may reach, as the policy sees them.

The process starts the services the compiled policies declare in ``needs`` and hands every
policy the same object; its accessors answer None while a service is not running (not started
yet, or not configured). A policy then answers ``unavailable()``, or its protocol's own form of
it (a bearer token's ``Retry-After``, an OAuth ``temporarily_unavailable``): there is no
other path for a missing service.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Literal, Protocol

from apigate.engine.replies import Reply, json_reply

if TYPE_CHECKING:
    from apigate.consumers.registry import ConsumerRegistry
    from apigate.engine.exchange import Exchange
    from apigate.state import StateBackend
    from apigate.webhooks.runtime import WebhookRuntime

ServiceName = Literal["consumers", "state", "webhooks", "quotas"]
"""What ``Policy.needs`` may name: the consumer registry (it opens the store), the state
backend, the webhook runtime (intake, delivery), the write-behind of memory-backed quota
counters to the store (``policies/quota/ledger.py``; it opens the store when a quota counts in
memory)."""

_RETRY_SOON: Final = [(b"retry-after", b"1")]
CONSUMERS_NOT_READY: Final = "consumer registry is not ready, try again"


class PolicyServices(Protocol):
    """What policies use of the running services; None: that service is not running."""

    @property
    def consumers(self) -> ConsumerRegistry | None: ...

    @property
    def state(self) -> StateBackend | None: ...

    def state_at(self, url: str) -> StateBackend | None:
        """The state backend at ``url`` that a policy named in its ``state_urls``."""

    @property
    def webhooks(self) -> WebhookRuntime | None: ...


class _NoServices:
    """For policies built without a running process (``apigate check``, a policy built alone)."""

    consumers = None
    state = None
    webhooks = None

    def state_at(self, url: str) -> StateBackend | None:
        return None


NO_SERVICES: Final[PolicyServices] = _NoServices()


def unavailable(exchange: Exchange, message: str) -> Reply:
    """503 ``unavailable``, to be retried in a second: a service the request needs is not running
    (or, as for password checks, is saturated)."""
    payload = {"error": message, "reason": "unavailable", "request_id": exchange.request_id}
    return json_reply(503, payload, _RETRY_SOON)
