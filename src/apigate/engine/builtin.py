"""The built-in endpoints on the proxy listener: /health, /routes and /stats (paths configurable).

A user's exact route for the same path wins, so a backend's own /health stays reachable.
/health answers anyone. /routes and /stats show upstream URLs and traffic, so they answer only
clients in ``endpoints.allow`` (by default loopback and ``trusted_proxies`` when no token is
set) and, with ``endpoints.token``, only with that bearer token.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import TYPE_CHECKING

from apigate.engine.exchange import Exchange
from apigate.engine.replies import Reply, error_body, json_reply
from apigate.httpspec import address_in

if TYPE_CHECKING:
    from apigate.engine.plan import Plan
    from apigate.engine.server import Gateway


def endpoints(gateway: Gateway, plan: Plan) -> dict[str, Callable[[Exchange], Reply]]:
    config = plan.endpoints
    token = config.token
    exact_user_paths = {route.path for route in plan.routes}
    allow = config.allow

    def guarded(handler: Callable[[Exchange], Reply]) -> Callable[[Exchange], Reply]:
        def check(exchange: Exchange) -> Reply:
            if allow is not None and not address_in(exchange.client_ip, allow):
                return Reply(
                    403,
                    error_body(
                        "this endpoint answers only the client addresses in endpoints.allow",
                        exchange.request_id,
                    ),
                )
            if token is None:
                return handler(exchange)
            given = exchange.header(b"authorization") or b""
            scheme, _, credential = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(credential.strip(), token):
                return Reply(
                    401,
                    error_body("a valid bearer token is required", exchange.request_id),
                    [(b"www-authenticate", b'Bearer realm="apigate"')],
                )
            return handler(exchange)

        return check

    def health(exchange: Exchange) -> Reply:
        return json_reply(200, {"status": "ok", "routes": len(plan.routes)})

    def routes(exchange: Exchange) -> Reply:
        return json_reply(200, {"routes": [route.description for route in plan.routes]})

    def stats(exchange: Exchange) -> Reply:
        in_flight = sum(1 for conn in gateway.connections if not conn.idle())
        per_route = {route.name: route.requests for route in plan.routes}
        return json_reply(200, gateway.stats.snapshot(len(gateway.connections), in_flight, per_route))

    table = {config.health: health, config.routes: guarded(routes), config.stats: guarded(stats)}
    return {path: handler for path, handler in table.items() if path and path not in exact_user_paths}
