"""What the tests of the counting policies share: requests from a chosen client address, gateways
whose limits read a frozen clock, and `apigate limits`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from tests.support.errors_helpers import Response, apigate_cmd
from tests.support.errors_helpers import request as send
from tests.support.gateway import GatewayProcess

REPO = Path(__file__).resolve().parent.parent.parent
# Gateways import the test plugins from the repository, and apigate from wherever this run does.
PLUGIN_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))}


def get_as(port: int, path: str, ip: str, headers: list[tuple[str, str]] | None = None) -> Response:
    """A request that the gateway attributes to ``ip`` (it trusts the loopback as a proxy)."""
    return send(port, "GET", path, [("X-Forwarded-For", ip), *(headers or [])])


def frozen(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the plugin that stops the limits' clock at ``$LIMITS_FROZEN_NOW``."""
    return {"plugins": ["tests.support.frozen_clock"], **config}


def frozen_at(now: float) -> dict[str, str]:
    """The environment of a gateway (or CLI) whose limits read ``now`` (seconds since the epoch)."""
    return {**PLUGIN_ENV, "LIMITS_FROZEN_NOW": repr(now)}


def limits_cli(gateway: GatewayProcess, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`apigate limits ARGS -c <the gateway's config>` with ``env`` (a frozen clock)."""
    return subprocess.run(
        apigate_cmd("limits", *args, "-c", str(gateway.config_path)),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
