"""The dashboard on the admin listener, in a real browser (chromium) against a real gateway.

The gateway (tests/support/observed.py) proxies to a real upstream through routes that answer 200,
404 (no route), 429 (a rate limit) and 401 (key-auth), and takes GitHub webhooks for a handler that
always fails (so the event ends as a dead letter). The page is opened, signed in to with the admin
token, and must show every panel, the traffic in its tables and a request-rate chart with
something drawn in it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from apigate.admin.dashboard import ASSETS
from tests.support.browser import WatchedPage, chromium
from tests.support.errors_helpers import request, wait_until
from tests.support.gateway import GatewayProcess, free_port
from tests.support.observed import TOKEN, Observed, observed_gateway, send_mixed_traffic
from tests.support.upstream import UpstreamServer

# A route name is whatever the config says: the page must show it as text, never as markup.
MARKUP_ROUTE = '<img src=x onerror="window.__injected=1">'
PANELS = ["overview", "rate", "latency", "errors", "refused", "clients", "upstreams", "webhooks"]

# Pixels of the request-rate chart's fill (rgba(37, 99, 235, 0.25)): an area under the line that
# only exists where the rate is above zero.
COUNT_RATE_FILL = """() => {
  const canvas = document.querySelector("#rate-chart canvas");
  if (!canvas) return -1;
  const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let count = 0;
  for (let i = 0; i < pixels.length; i += 4) {
    const [r, g, b, a] = [pixels[i], pixels[i + 1], pixels[i + 2], pixels[i + 3]];
    const near = Math.abs(r - 37) <= 16 && Math.abs(g - 99) <= 16 && Math.abs(b - 235) <= 16;
    if (near && a >= 40 && a <= 90) count++;
  }
  return count;
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as made:
        yield made


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Observed]:
    def add_markup_route(config: dict) -> None:
        config["routes"].append({"name": MARKUP_ROUTE, "path": "/markup", "upstream": "backend"})

    with observed_gateway(tmp_path, add_markup_route) as observed:
        yield observed


def send_traffic(observed: Observed) -> None:
    send_mixed_traffic(observed.gateway.port)
    assert request(observed.gateway.port, "GET", "/markup").status == 200


def sign_in(page: Page, admin_url: str, token: str) -> None:
    page.goto(admin_url)
    expect(page.locator("#login")).to_be_visible()
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")


def table_text(page: Page, table_id: str) -> str:
    return page.locator(f"#{table_id} tbody").inner_text()


def test_the_dashboard_shows_every_panel_and_live_traffic(
    setup: Observed, browser: Browser, tmp_path: Path
) -> None:
    watched = WatchedPage(browser)
    page = watched.page
    try:
        response = page.goto(setup.admin_url)
        assert response is not None and response.status == 200
        policy = response.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy
        assert "connect-src 'self'" in policy and "unsafe-inline" not in policy
        # With a token configured, the page asks for it and shows nothing else.
        expect(page.locator("#login")).to_be_visible()
        expect(page.locator("#dashboard")).to_be_hidden()

        page.fill("#token", TOKEN)
        page.click("#login-form button[type=submit]")
        expect(page.locator("#dashboard")).to_be_visible()
        expect(page.locator("#status")).to_contain_text("Updated")
        for panel in PANELS:
            expect(page.locator(f'[data-panel="{panel}"]')).to_be_visible()
        # The token lives in this tab's sessionStorage only: no cookie, no localStorage, no URL.
        assert page.evaluate("sessionStorage.getItem('apigate.admin.token')") == TOKEN
        assert page.evaluate("localStorage.length") == 0
        assert page.context.cookies() == []
        assert TOKEN not in page.url

        page.wait_for_function("() => document.querySelector('#rate-chart canvas') !== null")
        assert page.evaluate(COUNT_RATE_FILL) == 0  # no traffic yet: nothing under the line

        send_traffic(setup)
        page.wait_for_function(f"() => ({COUNT_RATE_FILL})() > 2000", timeout=15_000)

        expect(page.locator("#latency-table tbody")).to_contain_text("orders")
        expect(page.locator("#latency-chart canvas")).to_have_count(1)
        wait_until(lambda: "(no route)" in table_text(page, "errors-table"), message="the 404 in the errors")
        orders = page.locator("#latency-table tbody tr", has_text="orders").inner_text().split("\t")
        assert orders[0] == "orders" and int(orders[1]) >= 20
        assert all(float(value) > 0 for value in orders[2:5]), orders
        refused = page.locator("#refused-totals").inner_text()
        assert "rate limited\n1" in refused and "auth failures\n1" in refused, refused
        expect(page.locator("#refused-table tbody")).to_contain_text("limited")
        expect(page.locator("#refused-table tbody")).to_contain_text("keyed")
        expect(page.locator("#clients-ip tbody")).to_contain_text("127.0.0.1")
        expect(page.locator("#clients-consumer tbody")).to_contain_text("acme")
        expect(page.locator("#health-table tbody")).to_contain_text("backend")
        expect(page.locator("#circuits-table tbody")).to_contain_text("closed")
        expect(page.locator("#upstream-latency-table tbody")).to_contain_text(setup.upstream.url)
        expect(page.locator("#webhooks-table tbody")).to_contain_text("github", timeout=15_000)
        # One event: dead for the handler that answers 503, waiting for the one tried again in an hour.
        webhooks = re.compile(r"received\s*1\s*backlog\s*1\s*dead letters\s*1\s*$")
        expect(page.locator("#webhook-totals")).to_have_text(webhooks, timeout=20_000)

        # The route named like markup is shown as its text and runs nothing.
        expect(page.locator("#latency-table tbody")).to_contain_text(MARKUP_ROUTE)
        assert page.locator("#dashboard img").count() == 0
        assert page.evaluate("window.__injected") is None
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

        # A phone: everything fits the width, nothing scrolls sideways.
        page.set_viewport_size({"width": 375, "height": 800})
        page.wait_for_function("() => document.documentElement.scrollWidth <= 375")
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        page.screenshot(path=str(tmp_path / "dashboard-phone.png"), full_page=True)
        assert (tmp_path / "dashboard.png").stat().st_size > 0
        assert watched.problems() == []
    finally:
        watched.close()


def test_a_wrong_token_shows_the_error_and_no_data(setup: Observed, browser: Browser) -> None:
    send_traffic(setup)
    watched = WatchedPage(browser)
    page = watched.page
    try:
        sign_in(page, setup.admin_url, "not-the-token")
        message = page.locator("#login-message")
        expect(message).to_contain_text("not accepted")
        expect(message).to_have_class("message error")
        expect(page.locator("#dashboard")).to_be_hidden()
        assert page.locator("#dashboard tbody tr").count() == 0
        assert page.locator("#dashboard canvas").count() == 0
        assert page.evaluate("sessionStorage.length") == 0

        # The user tries again with the right one.
        page.fill("#token", TOKEN)
        page.click("#login-form button[type=submit]")
        expect(page.locator("#dashboard")).to_be_visible()
        expect(page.locator("#latency-table tbody")).to_contain_text("orders")

        # Signing out forgets the token and every number shown.
        page.click("#sign-out")
        expect(page.locator("#login")).to_be_visible()
        assert page.locator("#dashboard tbody tr").count() == 0
        assert page.evaluate("sessionStorage.length") == 0
        assert watched.problems() == []
    finally:
        watched.close()


def test_polling_pauses_while_the_tab_is_hidden(setup: Observed, browser: Browser) -> None:
    watched = WatchedPage(browser)
    page = watched.page
    polls = "performance.getEntriesByType('resource').filter((e) => e.name.endsWith('/api/metrics')).length"
    visibility = """(hidden) => {
      Object.defineProperty(document, "hidden", {value: hidden, configurable: true});
      document.dispatchEvent(new Event("visibilitychange"));
    }"""
    try:
        sign_in(page, setup.admin_url, TOKEN)
        page.wait_for_function(f"() => {polls} >= 3", timeout=10_000)  # one every 2 s
        page.evaluate(visibility, True)
        page.wait_for_timeout(500)  # a poll already on its way may still land
        hidden_at = page.evaluate(polls)
        page.wait_for_timeout(5000)  # two and a half poll periods with the tab hidden
        assert page.evaluate(polls) == hidden_at
        page.evaluate(visibility, False)
        page.wait_for_function(f"() => {polls} > {hidden_at}", timeout=1500)  # at once, not in 2 s
        assert watched.problems() == []
    finally:
        watched.close()


def test_without_an_admin_token_the_page_opens_without_asking(
    tmp_path: Path, upstream: UpstreamServer, browser: Browser
) -> None:
    admin_port = free_port()
    config = {
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "routes": [{"name": "plain", "path": "/*", "target": upstream.url}],
    }
    gateway = GatewayProcess(tmp_path, config, env={"APIGATE_ADMIN_TOKEN": ""}).start()
    watched = WatchedPage(browser, width=375)
    page = watched.page
    try:
        wait_until(lambda: request(admin_port, "GET", "/api/metrics", host="127.0.0.1").status == 200)
        assert request(gateway.port, "GET", "/x").status == 200
        page.goto(f"http://127.0.0.1:{admin_port}/")
        expect(page.locator("#dashboard")).to_be_visible()
        expect(page.locator("#login")).to_be_hidden()
        expect(page.locator("#sign-out")).to_be_hidden()
        expect(page.locator("#latency-table tbody")).to_contain_text("plain")
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        assert watched.problems() == []
    finally:
        watched.close()
        gateway.stop()


def test_the_page_and_its_files_are_served_with_the_security_headers(setup: Observed) -> None:
    for path, kind in [
        ("/", "text/html"),
        ("/static/dashboard.js", "text/javascript"),
        ("/static/dashboard.css", "text/css"),
        ("/static/vendor/uplot/uPlot.iife.min.js", "text/javascript"),
        ("/static/vendor/uplot/uPlot.min.css", "text/css"),
        ("/static/vendor/uplot/LICENSE", "text/plain"),
    ]:
        response = request(setup.admin_port, "GET", path, host="127.0.0.1")
        assert response.status == 200, path
        assert (response.header("content-type") or "").startswith(kind), path
        assert response.header("x-content-type-options") == "nosniff"
        assert "frame-ancestors 'none'" in (response.header("content-security-policy") or "")
        assert response.body
    for path in ["/static/", "/static/../app.py", "/static/%2e%2e/app.py", "/static/vendor/uplot/"]:
        assert request(setup.admin_port, "GET", path, host="127.0.0.1").status == 404, path


def test_an_install_carries_and_serves_the_dashboard(tmp_path: Path) -> None:
    """Run the install's packaging step (setuptools' build_py: packages and their package data, as
    `pip install .` lays them out) on a copy of the sources, and build the admin app from what it
    produced: every file the page needs must have come along."""
    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"  # a copy: building writes build/ and egg-info next to the sources
    shutil.copytree(root / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ["pyproject.toml", "setup.py", "README.md"]:
        shutil.copy(root / name, source / name)
    installed = tmp_path / "installed"
    built = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(installed)],
        cwd=source,
        capture_output=True,
        text=True,
        env={**os.environ, "APIGATE_PURE": "1"},
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    static = installed / "apigate" / "admin" / "static"
    assert sorted(p.relative_to(static).as_posix() for p in static.rglob("*") if p.is_file()) == sorted(
        name for name, _ in ASSETS.values()
    )
    check = (
        "import apigate.admin.dashboard as d, fastapi; d.add_dashboard(fastapi.FastAPI()); print(d.__file__)"
    )
    ran = subprocess.run(
        [sys.executable, "-c", check],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(installed)},
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip().startswith(str(installed))
