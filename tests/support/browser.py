"""A real browser for tests: Debian's chromium driven by Playwright (no browser download).

A missing chromium fails the test that needs it (CI installs it with apt-get): nothing is skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import Browser, Page, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")

# Runs in every page before its scripts: records Content-Security-Policy violations.
RECORD_CSP_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__cspViolations.push(`${event.violatedDirective} ${event.blockedURI}`);
});
"""


@contextmanager
def chromium() -> Iterator[Browser]:
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: apt-get install -y chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            yield browser
        finally:
            browser.close()


class WatchedPage:
    """A page that keeps its script errors and CSP violations for the test to assert on."""

    def __init__(self, browser: Browser, width: int = 1280, height: int = 900) -> None:
        self.page: Page = browser.new_page(viewport={"width": width, "height": height})
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.add_init_script(RECORD_CSP_VIOLATIONS)

    def problems(self) -> list[str]:
        return [*self.errors, *self.page.evaluate("window.__cspViolations")]

    def close(self) -> None:
        self.page.close()
