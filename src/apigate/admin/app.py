"""The admin API: FastAPI on the admin listener (never on the proxy path), answering for the whole
node through the node agent.

Every endpoint needs ``Authorization: Bearer <token>`` when a token is configured: none given is
401, a wrong one 403. Without a token the listener binds loopback only (node/admin.py).
``GET /`` is the dashboard (admin/dashboard.py): a page that holds no data and asks for the token.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import orjson
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from apigate import __version__
from apigate.admin.dashboard import add_dashboard
from apigate.discovery.networks import AddressRefused, RegistrationError
from apigate.discovery.registry import Registration, RegistryFull, parse_registration
from apigate.observe.usage_queries import (
    ERROR_GROUPS,
    ParameterNames,
    UsageQueryError,
    answer,
    build_query,
    error_summary,
    iso,
    parse_timeframe,
)
from apigate.store.roles.usage import UsageQuery, UsageRow, UsageStore

log = logging.getLogger("apigate")

MAX_REGISTRATION_BYTES = 16 * 1024
USAGE_PARAMETERS = ParameterNames(start="start", end="end", group_by="group_by", granularity="granularity")


class Node(Protocol):
    """What the admin API asks of the node (node/agent.py)."""

    async def services(self) -> dict[str, Any]: ...

    async def circuits(self) -> dict[str, Any]: ...

    async def reset(self, upstream: str, target: str | None) -> dict[str, Any]: ...

    async def cache_purge(self, notice: dict[str, Any]) -> dict[str, Any]: ...

    def upstream_names(self) -> set[str]: ...

    def health_summary(self) -> dict[str, Any]: ...

    async def register(self, registration: Registration) -> dict[str, Any]: ...

    async def heartbeat(self, instance_id: str) -> bool: ...

    async def deregister(self, instance_id: str) -> bool: ...

    async def view(self, name: str) -> tuple[str, str]: ...

    def subscribe_events(self) -> asyncio.Queue[dict[str, Any]]: ...

    def unsubscribe_events(self, queue: asyncio.Queue[dict[str, Any]]) -> None: ...

    async def usage_store(self) -> UsageStore:
        """The store usage analytics is read from (opened on first use)."""


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

    @app.post("/api/services", dependencies=guarded, status_code=201)
    async def register(request: Request) -> dict[str, Any]:
        """Register (or, with the same id, renew) an instance of a service: name, host, port,
        health URL, ttl. Its address must be in discovery.allowed_networks."""
        body = await request.body()
        if len(body) > MAX_REGISTRATION_BYTES:
            raise HTTPException(413, f"a registration is at most {MAX_REGISTRATION_BYTES} bytes")
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise HTTPException(400, "the body must be a JSON object") from None
        try:
            return await node.register(parse_registration(data))
        except AddressRefused as exc:
            raise HTTPException(403, str(exc)) from None
        except RegistryFull as exc:
            raise HTTPException(409, str(exc)) from None
        except RegistrationError as exc:
            raise HTTPException(422, str(exc)) from None

    @app.put("/api/services/{instance_id}/heartbeat", dependencies=guarded)
    async def heartbeat(instance_id: str) -> dict[str, Any]:
        """Keep a registration for another ttl; 404 once it expired (register again)."""
        if not await node.heartbeat(instance_id):
            raise HTTPException(
                404, f"no registration {instance_id!r} (expired or never made): register again"
            )
        return {"id": instance_id}

    @app.delete("/api/services/{instance_id}", dependencies=guarded, status_code=204)
    async def deregister(instance_id: str) -> Response:
        if not await node.deregister(instance_id):
            raise HTTPException(404, f"no registration {instance_id!r}")
        return Response(status_code=204)

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

    @app.post("/api/cache/purge", dependencies=guarded)
    async def cache_purge(request: Request) -> dict[str, Any]:
        """Drop cached responses on every worker of this node: ``{"all": true}``, ``{"route": NAME}``,
        ``{"prefix": "/path", "host": null}`` or ``{"url": "http://host/path?q"}``. Entries in Redis
        are the CLI's to delete (`apigate cache purge`), which reaches every node."""
        from apigate.policies.cache.purge import MAX_NOTICE_BYTES, PurgeError, parse_notice

        body = await request.body()
        if len(body) > MAX_NOTICE_BYTES:
            raise HTTPException(413, f"a purge is at most {MAX_NOTICE_BYTES} bytes")
        try:
            purge = parse_notice(orjson.loads(body))
        except orjson.JSONDecodeError:
            raise HTTPException(400, "the body must be a JSON object") from None
        except PurgeError as exc:
            raise HTTPException(400, str(exc)) from None
        return {"purge": purge.describe(), **await node.cache_purge(purge.notice())}

    @app.get("/api/health", dependencies=guarded)
    async def health() -> dict[str, Any]:
        """Each upstream's status and response time from the active checks."""
        return node.health_summary()

    @app.get("/metrics", dependencies=guarded)
    async def prometheus() -> Response:
        """Every worker's counts, merged, in the Prometheus text format."""
        content_type, text = await node.view("prometheus")
        return Response(text, media_type=content_type, headers=_NO_STORE)

    @app.get("/api/metrics", dependencies=guarded)
    async def metrics() -> Response:
        """Counts, latency percentiles, top clients, merged across workers (docs/observability.md)."""
        content_type, text = await node.view("metrics")
        return Response(text, media_type=content_type, headers=_NO_STORE)

    @app.get("/api/stats", dependencies=guarded)
    async def stats() -> Response:
        """What /stats on the proxy listener shows, merged across workers."""
        content_type, text = await node.view("stats")
        return Response(text, media_type=content_type, headers=_NO_STORE)

    async def read_usage(query: UsageQuery) -> list[UsageRow]:
        try:
            store = await node.usage_store()
            return await store.query_usage(query)
        except Exception as exc:
            log.warning("admin: reading usage from the store failed: %s", exc)
            raise HTTPException(503, "the store cannot be read now; try again") from None

    @app.get("/api/analytics/usage", dependencies=guarded)
    async def usage(request: Request) -> dict[str, Any]:
        """Requests, errors, bytes and latency in [start, end) (default: the last hour), per bucket
        (granularity: minute, hour, day or total; default by the range) and per group_by (consumer,
        key, tenant, route, comma-separated)."""
        try:
            query = build_query(request.query_params, USAGE_PARAMETERS)
        except UsageQueryError as exc:
            raise HTTPException(400, str(exc)) from None
        return answer(query, await read_usage(query))

    @app.get("/api/analytics/errors", dependencies=guarded)
    async def errors(timeframe: str | None = None) -> dict[str, Any]:
        """4xx and 5xx answers per route, consumer and status class over the last ``timeframe``
        (default 24h), most first."""
        try:
            seconds = parse_timeframe(timeframe, "timeframe")
        except UsageQueryError as exc:
            raise HTTPException(400, str(exc)) from None
        end = int(time.time())
        query = UsageQuery(end - seconds, end, ERROR_GROUPS, None)
        found = await read_usage(query)
        return {"start": iso(query.start), "end": iso(query.end), "errors": error_summary(found)}

    @app.get("/api/events", dependencies=guarded)
    async def events(route: str | None = None, errors: bool = False) -> StreamingResponse:
        """Request events as server-sent events, live (sampled and capped per worker: see
        ``events:``); ``route`` keeps one route's, ``errors=true`` only failed requests."""
        queue = node.subscribe_events()
        return StreamingResponse(
            _event_stream(node, queue, route, errors),
            media_type="text/event-stream",
            headers={**_NO_STORE, "x-accel-buffering": "no"},
        )

    add_dashboard(app)
    return app


_NO_STORE = {"cache-control": "no-store"}
KEEPALIVE_EVERY = 15.0  # seconds of silence before a comment line keeps proxies from closing


async def _event_stream(
    node: Node, queue: asyncio.Queue[dict[str, Any]], route: str | None, errors: bool
) -> AsyncIterator[bytes]:
    try:
        yield b": listening\n\n"
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), KEEPALIVE_EVERY)
            except TimeoutError:
                yield b": keepalive\n\n"
                continue
            if not event:  # the node stops
                return
            if (route is not None and event.get("route") != route) or (errors and not event.get("error")):
                continue
            yield b"event: request\ndata: " + orjson.dumps(event) + b"\n\n"
    finally:
        node.unsubscribe_events(queue)
