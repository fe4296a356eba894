"""The built-in endpoints on the proxy listener: /health, /health/detailed, /routes and /stats
(paths configurable).

A user's exact route for the same path wins, so a backend's own /health stays reachable.
/health answers anyone. /health/detailed, /routes and /stats show upstream URLs and traffic, so
they answer only clients in ``endpoints.allow`` (by default loopback and ``trusted_proxies``
when no token is set) and, with ``endpoints.token``, only with that bearer token.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from apigate.engine.breakers import OPEN, STATE_NAMES
from apigate.engine.exchange import Exchange
from apigate.engine.replies import Reply, error_body, json_reply
from apigate.httpspec import address_in

if TYPE_CHECKING:
    from apigate.engine.plan import Plan
    from apigate.engine.server import Gateway


Handler = Callable[[Exchange], "Reply | Awaitable[Reply]"]


def endpoints(gateway: Gateway, plan: Plan) -> dict[str, Handler]:
    config = plan.endpoints
    token = config.token
    exact_user_paths = {route.path for route in plan.routes}
    allow = config.allow

    def guarded(handler: Handler) -> Handler:
        def check(exchange: Exchange) -> Reply | Awaitable[Reply]:
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

    def node_view(name: str) -> Callable[[Exchange], Awaitable[Reply]]:
        """A view the node merges from every worker (whichever worker answers, the same numbers)."""

        async def answer(exchange: Exchange) -> Reply:
            ask = gateway.node_view
            if ask is None:
                return Reply(503, error_body("this gateway runs without its node", exchange.request_id))
            status, content_type, body = await ask(name)
            return Reply(status, body, [(b"cache-control", b"no-store")], content_type)

        return answer

    def health_detailed(exchange: Exchange) -> Reply:
        # Not ready while draining (a load balancer then stops sending); a down upstream or store
        # degrades the status but not readiness: other routes still serve.
        payload = detailed_health(gateway, plan)
        return json_reply(200 if gateway.ready else 503, payload)

    table: dict[str | None, Handler] = {
        config.health: health,
        config.health_detailed: guarded(health_detailed),
        config.routes: guarded(routes),
        config.stats: guarded(node_view("stats")),
        config.metrics: guarded(node_view("metrics")),
        config.metrics_prometheus: guarded(node_view("prometheus")),
    }
    return {path: handler for path, handler in table.items() if path and path not in exact_user_paths}


def detailed_health(gateway: Gateway, plan: Plan) -> dict[str, object]:
    """Each upstream's status (targets usable, active-check response times, circuits) and the
    store's and state backend's reachability, as this worker sees them."""
    now = time.monotonic()
    upstreams: dict[str, object] = {}
    degraded = False
    for group in plan.upstreams:
        targets: list[dict[str, object]] = []
        usable = 0
        for target in group.targets:
            state = target.state
            ok = state.usable(now)
            usable += ok
            item: dict[str, object] = {"address": target.address, "healthy": state.healthy, "usable": ok}
            detail = state.health_detail
            latency = detail.get("last_latency") if detail is not None else None
            if isinstance(latency, float):
                item["response_time_ms"] = round(latency * 1000, 3)
            if state.breaker is not None:
                item["circuit"] = STATE_NAMES[state.breaker.state]
            targets.append(item)
        cut_off = group.breaker is not None and group.breaker.state == OPEN
        status = "down" if cut_off or not usable else "healthy" if usable == len(targets) else "degraded"
        degraded = degraded or status != "healthy"
        entry: dict[str, object] = {"status": status, "targets": targets}
        if group.breaker is not None:
            entry["circuit"] = STATE_NAMES[group.breaker.state]
        upstreams[group.name] = entry
    dependencies = dict(gateway.dependencies)
    degraded = degraded or any(d.get("status") != "ok" for d in dependencies.values())
    return {
        "status": "draining" if not gateway.ready else "degraded" if degraded else "ok",
        "ready": gateway.ready,
        "upstreams": upstreams,
        "dependencies": dependencies,
    }
