"""Outbound HTTP from the gateway itself (key sets, token introspection, webhook deliveries).

See ``client.py`` for what the client does and why it is written here.
"""

from apigate.outbound.client import (
    IDEMPOTENT_METHODS,
    HttpClient,
    OutboundError,
    Response,
    default_tls_context,
    retry_after,
)

__all__ = [
    "IDEMPOTENT_METHODS",
    "HttpClient",
    "OutboundError",
    "Response",
    "default_tls_context",
    "retry_after",
]
