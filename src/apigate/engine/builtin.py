"""The built-in endpoints on the proxy listener: /health, /routes and /stats (paths configurable).

A user's exact route for the same path wins, so a backend's own /health stays reachable.
/health answers anyone. /routes and /stats show upstream URLs and traffic, so they answer only
clients in ``endpoints.allow`` (by default loopback and ``trusted_proxies`` when no token is
set) and, with ``endpoints.token``, only with that bearer token.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from apigate.engine import wire
from apigate.engine.exchange import Exchange, Reply, json_reply

if TYPE_CHECKING:
    from apigate.config.compile import Snapshot
    from apigate.engine.server import Gateway

_LOOPBACK: Final = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
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
    allow = allowed_networks(config.allow, token is not None, snapshot.trusted_proxies)

    def guarded(handler: Callable[[Exchange], Reply]) -> Callable[[Exchange], Reply]:
        def check(exchange: Exchange) -> Reply:
            if allow is not None and not _address_in(exchange.client_ip, allow):
                return Reply(
                    403,
                    wire.error_body(
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


def allowed_networks(
    allow: list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None,
    has_token: bool,
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None:
    """The networks whose clients may read /routes and /stats; None for any client.

    Unset, a token alone guards them; without a token, loopback and the trusted proxies do.
    """
    if allow is not None:
        return tuple(allow)
    return None if has_token else (*_LOOPBACK, *trusted_proxies)


def _address_in(ip: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:  # a dual-stack listener's IPv4 peer
        address = address.ipv4_mapped
    return any(address in network for network in networks)
