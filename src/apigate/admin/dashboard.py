"""The dashboard: a page on the admin listener that reads the admin API from the browser.

Its files ship in the package (``admin/static/``, uPlot vendored from npm) and are read once when
the app is built, so nothing is fetched at run time and no request path ever reaches the file
system. The page holds no data: it asks for the admin token itself, keeps it in sessionStorage and
sends it with each call to /api/..., so the page and its files are served without one. The
Content-Security-Policy allows scripts, styles and requests from this origin only (no inline code).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.resources import files

from fastapi import FastAPI, Response

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)

# URL path -> (file under admin/static/, content type). Only these are served.
ASSETS: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/static/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/static/vendor/uplot/uPlot.iife.min.js": (
        "vendor/uplot/uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
    ),
    "/static/vendor/uplot/uPlot.min.css": ("vendor/uplot/uPlot.min.css", "text/css; charset=utf-8"),
    "/static/vendor/uplot/LICENSE": ("vendor/uplot/LICENSE", "text/plain; charset=utf-8"),
}


def add_dashboard(app: FastAPI) -> None:
    """Serve the dashboard's page and files from memory, each with the security headers."""
    static = files("apigate.admin").joinpath("static")
    for url, (name, content_type) in ASSETS.items():
        body = static.joinpath(name).read_bytes()  # a missing file is a broken install: fail loudly
        app.add_api_route(url, _serve(body, content_type), methods=["GET"], include_in_schema=False)


def _serve(body: bytes, content_type: str) -> Callable[[], Awaitable[Response]]:
    headers = {
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }

    async def asset() -> Response:
        return Response(body, media_type=content_type, headers=headers)

    return asset
