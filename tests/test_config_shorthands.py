"""Route shorthands (``auth:``, ``rate_limit:``, ``cache:``) stand for the policy that declares them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.errors_helpers import request

REPO = Path(__file__).resolve().parent.parent
# The gateway imports the plugin from the repository, and apigate from wherever this run does.
PLUGIN_PATH = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))


@pytest.fixture
def gateway(start_gateway, upstream):
    config = {
        "plugins": ["tests.support.shorthand_policies"],
        "routes": [
            {"name": "limited", "path": "/limited", "target": upstream.url, "rate_limit": "100 per test"},
            {"name": "refused", "path": "/refused", "target": upstream.url, "rate_limit": "unlimited"},
            {"name": "cached", "path": "/cached", "target": upstream.url, "cache": "60s"},
        ],
    }
    return start_gateway(config, env={"PYTHONPATH": PLUGIN_PATH})


def test_a_shorthand_becomes_the_policy_that_declares_it(gateway, upstream) -> None:
    before = len(upstream.requests)
    response = request(gateway.port, "GET", "/limited")
    assert response.status == 200
    assert response.json() == {"limit": "100 per test"}
    assert len(upstream.requests) == before
    routes = {r["name"]: r for r in request(gateway.port, "GET", "/routes").json()["routes"]}
    assert routes["limited"]["policies"] == {"test_declared_limit": {"limit": "100 per test"}}
    assert "inactive" not in routes["limited"]
    assert routes["cached"]["policies"]["cache"]["ttl"] == 60.0
    assert "inactive" not in routes["cached"]


def test_a_shorthand_its_policy_cannot_honour_or_no_policy_declares_is_inactive(gateway, upstream) -> None:
    routes = {r["name"]: r for r in request(gateway.port, "GET", "/routes").json()["routes"]}
    assert routes["refused"]["inactive"] == ["rate_limit: unlimited"]
    before = len(upstream.requests)
    assert request(gateway.port, "GET", "/refused").status == 200  # served, as before, without the policy
    assert len(upstream.requests) == before + 1
