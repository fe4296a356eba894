"""The admin API: FastAPI on the admin listener (never on the proxy path), answering for the whole
node through the node agent.

Every endpoint needs ``Authorization: Bearer <token>`` when a token is configured: none given is
401, a wrong one 403. Without a token the listener binds loopback only (node/admin.py).
"""

from __future__ import annotations

import hmac
from typing import Any, Protocol

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from apigate import __version__


class Node(Protocol):
    """What the admin API asks of the node (node/agent.py)."""

    async def services(self) -> dict[str, Any]: ...

    async def circuits(self) -> dict[str, Any]: ...

    async def reset(self, upstream: str, target: str | None) -> dict[str, Any]: ...

    def upstream_names(self) -> set[str]: ...

    def health_summary(self) -> dict[str, Any]: ...


def create_app(node: Node, token: bytes | None) -> FastAPI:
    app = FastAPI(
        title="apigate admin API",
        version=__version__,
        docs_url=None,
        redoc_url=None,  # no pages that would load scripts from elsewhere
    )

    def authorized(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, credential = given.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            challenge = {"WWW-Authenticate": 'Bearer realm="apigate-admin"'}
            raise HTTPException(401, "a bearer token is required", headers=challenge)
        if not hmac.compare_digest(credential.strip().encode(), token):
            raise HTTPException(403, "the bearer token is not valid")

    guarded = [Depends(authorized)]

    @app.exception_handler(HTTPException)
    async def _error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.get("/api/services", dependencies=guarded)
    async def services() -> dict[str, Any]:
        """Upstreams, their targets (health, in flight, ejections, circuits) and balancers."""
        return await node.services()

    @app.get("/api/circuits", dependencies=guarded)
    async def circuits() -> dict[str, Any]:
        """Every circuit breaker: state (the worst over the workers), failures, last change."""
        return await node.circuits()

    @app.post("/api/circuits/{upstream}/reset", dependencies=guarded)
    async def reset(upstream: str, target: str | None = None) -> dict[str, Any]:
        """Close the upstream's circuits (or one target's) and end ejections, on every worker."""
        if upstream not in node.upstream_names():
            raise HTTPException(404, f"no upstream named {upstream!r}")
        result = await node.reset(upstream, target)
        if target is not None and not result["reset"]:
            raise HTTPException(404, f"upstream {upstream!r} has no target {target!r}")
        return result

    @app.get("/api/health", dependencies=guarded)
    async def health() -> dict[str, Any]:
        """Each upstream's status and response time from the active checks."""
        return node.health_summary()

    return app
