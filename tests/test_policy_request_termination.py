"""request-termination: a route that answers by itself with a fixed status."""

from __future__ import annotations

import pytest

from apigate.config.loader import ConfigError, load_config
from tests.support.errors_helpers import request


def test_route_without_target_answers_with_the_configured_status(start_gateway) -> None:
    config = {
        "routes": [
            {
                "path": "/v1/*",
                "policies": {
                    "request-termination": {
                        "status": 410,
                        "message": "v1 is retired, use /v2",
                        "reason": "gone",
                    }
                },
            }
        ]
    }
    gateway = start_gateway(config)
    for method, body in (("GET", b""), ("POST", b'{"a": 1}')):
        response = request(gateway.port, method, "/v1/orders", body=body)
        assert response.status == 410
        payload = response.json()
        assert payload["error"] == "v1 is retired, use /v2"
        assert payload["reason"] == "gone"
        assert payload["request_id"] == response.header("x-request-id")


@pytest.mark.parametrize(
    ("settings", "field"),
    [({"status": 700}, "status"), ({"reason": "Not A Code"}, "reason"), ({"colour": "red"}, "colour")],
)
def test_bad_settings_are_config_errors_naming_the_field(settings: dict, field: str) -> None:
    text = f"routes:\n  - path: /x\n    policies:\n      request-termination: {settings}\n"
    with pytest.raises(ConfigError) as caught:
        load_config(text=text, environ={})
    assert f"routes[0].policies.request-termination.{field}" in str(caught.value)
