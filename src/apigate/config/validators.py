"""Building blocks every config model shares: the strict base model and the checks of common
values. A leaf (it imports nothing of apigate), so that the config sections kept beside their
features (webhooks, pollers, policies) use them without importing ``config.models``."""

from __future__ import annotations

import os
from typing import TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown keys are errors: a typo must not silently disable a setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def check_http_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("must name a host, for example http://127.0.0.1:9000")
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise ValueError("has an invalid port") from exc
    if parts.query or parts.fragment:
        raise ValueError("must not carry a query string or fragment")
    return url


_Number = TypeVar("_Number", int, float)


def check_redis_url(url: str) -> str:
    if not url.startswith(("redis://", "rediss://")):
        raise ValueError("must be a redis:// or rediss:// URL")
    return url


def env_default(name: str, default: _Number) -> _Number:
    """A default taken from the environment variable ``name`` when it holds a number of its type."""
    raw = os.environ.get(name)
    try:
        return type(default)(raw) if raw else default
    except ValueError:
        return default
