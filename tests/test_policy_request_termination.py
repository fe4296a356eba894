"""request-termination: a route that answers by itself with a fixed status."""

from __future__ import annotations

import pytest

from apigate.config.loader import ConfigError, load_config
from tests.support.errors_helpers import request
from tests.support.proxy_http import RawConnection


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


def test_an_early_answer_to_a_client_awaiting_100_continue_closes_the_connection(start_gateway) -> None:
    """The client may never send the body it announced: its next bytes could be read as that body."""
    gateway = start_gateway({"routes": [{"path": "/closed", "policies": {"request-termination": None}}]})
    with RawConnection(gateway.port) as conn:
        conn.send(conn.request("POST", "/closed", {"Expect": "100-continue", "Content-Length": "10"}))
        response = conn.read_response("POST")
        assert response.status == 503  # the final answer, and no 100 before it
        assert (response.header("connection") or "").lower() == "close"
        assert conn.closed_by_peer()
    with RawConnection(gateway.port) as conn:  # without Expect, a small body keeps the connection
        assert conn.exchange("POST", "/closed", body=b"0123456789").status == 503
        assert conn.is_open()
