"""The built-in endpoints on the proxy listener: /health, /routes and /stats (paths configurable).

A user's exact route for the same path wins, so a backend's own /health stays reachable.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from apigate.engine import wire
from apigate.engine.exchange import Exchange, Reply, json_reply

if TYPE_CHECKING:
    from apigate.config.compile import Snapshot
    from apigate.engine.server import Gateway

_SECRET_KEY = re.compile(r"secret|token|password|passwd|api[_-]?key|private|credential", re.IGNORECASE)


def mask_secrets(value: Any) -> Any:
    """A copy of a config value with every secret-looking field replaced by '***'."""
    if isinstance(value, dict):
        return {k: ("***" if _SECRET_KEY.search(str(k)) and v else mask_secrets(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    return value


def endpoints(gateway: Gateway, snapshot: Snapshot) -> dict[str, Callable[[Exchange], Reply]]:
    config = snapshot.config.endpoints
    token = config.token.get_secret_value().encode() if config.token is not None else None
    exact_user_paths = {route.config.path for route in snapshot.routes}

    def guarded(handler: Callable[[Exchange], Reply]) -> Callable[[Exchange], Reply]:
        if token is None:
            return handler

        def check(exchange: Exchange) -> Reply:
            given = exchange.header(b"authorization") or b""
            scheme, _, credential = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(credential.strip(), token):
                return Reply(
                    401,
                    wire.error_body("a valid bearer token is required", exchange.request_id),
                    [(b"www-authenticate", b'Bearer realm="apigate"')],
                )
            return handler(exchange)

        return check

    def health(exchange: Exchange) -> Reply:
        return json_reply(200, {"status": "ok", "routes": len(snapshot.routes)})

    def routes(exchange: Exchange) -> Reply:
        listed = []
        for route in snapshot.routes:
            item = mask_secrets(route.config.model_dump(mode="json", exclude_none=True))
            item["name"] = route.name
            item["policies"] = {p.name: mask_secrets(p.describe()) for p in route.policies}
            if route.inactive:
                item["inactive"] = list(route.inactive)
            listed.append(item)
        return json_reply(200, {"routes": listed})

    def stats(exchange: Exchange) -> Reply:
        in_flight = sum(1 for conn in gateway.connections if not conn.idle())
        per_route = {route.name: route.requests for route in snapshot.routes}
        return json_reply(200, gateway.stats.snapshot(len(gateway.connections), in_flight, per_route))

    table = {config.health: health, config.routes: guarded(routes), config.stats: guarded(stats)}
    return {path: handler for path, handler in table.items() if path and path not in exact_user_paths}
