"""Helpers for tests that drive the `apigate` command line and wait for what it changes."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from tests.support.errors_helpers import apigate_cmd, clean_env


def apigate_json(cwd: Path, store_url: str, *args: str, stderr: int | None = subprocess.PIPE) -> Any:
    """`python -m apigate ... --store URL --json` as an operator would run it; returns its JSON.
    ``stderr`` may be a file descriptor (a terminal, say) to send the command's stderr to."""
    done = subprocess.run(
        [sys.executable, "-m", "apigate", *args, "--store", store_url, "--json"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return orjson.loads(done.stdout)


def check_problems(directory: Path, text: str) -> str:
    """What `apigate check -c <file>` says of a config file with ``text`` (run in a clean
    environment), which it must refuse."""
    path = directory / "apigate.yaml"
    path.write_text(text)
    done = subprocess.run(
        apigate_cmd("check", "-c", str(path)), env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done
    return done.stderr


def seconds_until(condition: Callable[[], bool], limit: float = 10.0) -> float:
    """Polls ``condition`` until it holds; returns how long that took (fails after ``limit``)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > limit:
            raise AssertionError(f"condition not met within {limit}s")
        time.sleep(0.02)
    return time.monotonic() - start
