"""Routes that carry policies: one to proxy through, one to load, for the tests of each policy."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from apigate.config.loader import ConfigError, load_config
from apigate.config.models import GatewayConfig


def proxied_route(path: str, target: str, policies: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A prefix route to ``target`` that strips its prefix (``/p/*`` sends ``/echo`` for ``/p/echo``)."""
    return {"path": path, "target": target, "strip_prefix": True, "policies": policies, **extra}


def route_config(policy: str, settings: Any) -> str:
    """A config of one route (to a closed port) with ``policy: settings``, as YAML."""
    route = {"path": "/x", "target": "http://127.0.0.1:9", "policies": {policy: settings}}
    return yaml.safe_dump({"routes": [route]})


def load_route(policy: str, settings: Any) -> GatewayConfig:
    return load_config(text=route_config(policy, settings), environ={})


def config_problems(policy: str, settings: Any) -> str:
    """What the loader says of a route with ``policy: settings`` (the test fails if it loads)."""
    with pytest.raises(ConfigError) as caught:
        load_route(policy, settings)
    return str(caught.value)
