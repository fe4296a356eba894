"""The path normaliser: every request path gets one normal form or a refusal, and the route chosen
on the normal form is the route chosen on the path as an upstream decodes it (tests/support/paths.py)."""

from __future__ import annotations

import atheris

with atheris.instrument_imports():
    from apigate.engine.paths import PathRefused, normalize_path
    from apigate.engine.router import RouteEntry, RouteMatch, Router

from tests.support.paths import upstream_decoding

from fuzz.harness import fuzz

ROUTES = ["/jwt/*", "/jwt/secret", "/users/{id}", "/users/me", "/*"]
ROUTER = Router(RouteEntry(path=path, payload=path, order=i) for i, path in enumerate(ROUTES))


def route_of(path: str) -> str | None:
    match = ROUTER.match("GET", path, None, [])
    return match.payload if isinstance(match, RouteMatch) else None


def check(data: bytes) -> None:
    path = "/" + data.decode("latin-1")
    for unescape_slashes in (False, True):
        try:
            normal = normalize_path(path, unescape_slashes)
        except PathRefused:
            continue
        assert normal.startswith("/"), (path, normal)
        assert normalize_path(normal, unescape_slashes) == normal, (path, normal)  # a fixed point
        decoded = upstream_decoding(path)
        assert route_of(normal) == route_of(decoded), (path, normal, decoded)


if __name__ == "__main__":
    fuzz(check)
