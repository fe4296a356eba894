"""Every malformed upstream or retry setting is refused with its field path, line and a reason.

The whole matrix runs through the loader (`apigate check` prints the same issues; one case runs
the command itself)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from apigate.config.loader import ConfigError, load_config

U = "upstreams:\n  u:\n    targets: [http://a:1, http://b:1]\n"
R = "routes:\n  - path: /a\n    upstream: u\n"


@pytest.mark.parametrize(
    ("text", "line", "path", "message"),
    [
        pytest.param(
            U + "    balancer: fastest\n",
            4,
            "upstreams.u.balancer",
            "unknown balancer 'fastest'; one of round_robin, weighted, le",
            id="balancer-unknown",
        ),
        pytest.param(
            U + "    balancer: {name: fastest}\n",
            4,
            "upstreams.u.balancer",
            "Input tag 'fastest' found using 'name' does not match any of",
            id="balancer-unknown-map",
        ),
        pytest.param(
            U + "    balancer: {name: hash, on: header}\n",
            4,
            "upstreams.u.balancer",
            "hashing on header needs key: the header name",
            id="hash-no-key",
        ),
        pytest.param(
            U + "    balancer: {name: hash, on: body}\n",
            4,
            "upstreams.u.balancer.on",
            "Input should be 'ip', 'header', 'cookie' or 'param'",
            id="hash-bad-on",
        ),
        pytest.param(
            U + "    balancer: {name: hash, key: x}\n",
            4,
            "upstreams.u.balancer",
            "key is not used when hashing on ip",
            id="hash-key-ip",
        ),
        pytest.param(
            U + "    balancer: {name: sticky, cookie: 'a b'}\n",
            4,
            "upstreams.u.balancer.cookie",
            "String should match pattern '^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,6",
            id="sticky-cookie",
        ),
        pytest.param(
            U + "    balancer: {name: sticky, fallback: hash}\n",
            4,
            "upstreams.u.balancer.fallback",
            "Input should be 'round_robin', 'least_connections' or 'p2c'",
            id="sticky-fallback",
        ),
        pytest.param(
            U + "    balancer: {name: p2c, choices: 3}\n",
            4,
            "upstreams.u.balancer.choices",
            "Extra inputs are not permitted",
            id="balancer-extra",
        ),
        pytest.param(
            U + "    health:\n      active: {interval: 0s}\n",
            5,
            "upstreams.u.health.active.interval",
            "Input should be greater than 0",
            id="active-interval",
        ),
        pytest.param(
            U + "    health:\n      active: {interval: 1s, timeout: 2s}\n",
            5,
            "upstreams.u.health.active",
            "timeout must not exceed interval",
            id="active-timeout",
        ),
        pytest.param(
            U + "    health:\n      active: {statuses: [200, 700]}\n",
            5,
            "upstreams.u.health.active.statuses[1]",
            "Input should be less than or equal to 599",
            id="active-status",
        ),
        pytest.param(
            U + "    health:\n      active: {statuses: ['399-200']}\n",
            5,
            "upstreams.u.health.active.statuses",
            "'399-200' is not a status range such as 200-399",
            id="active-range",
        ),
        pytest.param(
            U + "    health:\n      active: {path: health}\n",
            5,
            "upstreams.u.health.active.path",
            "String should match pattern '^/[^\\s#]*$'",
            id="active-path",
        ),
        pytest.param(
            U + "    health:\n      active: {healthy_threshold: 0}\n",
            5,
            "upstreams.u.health.active.healthy_threshold",
            "Input should be greater than or equal to 1",
            id="active-threshold",
        ),
        pytest.param(
            U + "    health:\n      passive: {max_ejection_percent: 150}\n",
            5,
            "upstreams.u.health.passive.max_ejection_percent",
            "Input should be less than or equal to 100",
            id="passive-percent",
        ),
        pytest.param(
            U + "    health:\n      passive: {base_ejection: 60s, max_ejection: 10s}\n",
            5,
            "upstreams.u.health.passive",
            "max_ejection must not be shorter than base_ejection",
            id="passive-order",
        ),
        pytest.param(
            U + "    health:\n      pasive: {}\n",
            5,
            "upstreams.u.health.pasive",
            "Extra inputs are not permitted",
            id="health-typo",
        ),
        pytest.param(
            U + "    circuit_breaker: {failures: 0}\n",
            4,
            "upstreams.u.circuit_breaker",
            "set failures or error_rate: with both 0 the circuit never op",
            id="breaker-never",
        ),
        pytest.param(
            U + "    circuit_breaker: {error_rate: 1.5}\n",
            4,
            "upstreams.u.circuit_breaker.error_rate",
            "Input should be less than or equal to 1",
            id="breaker-rate",
        ),
        pytest.param(
            U + "    circuit_breaker: {scope: node}\n",
            4,
            "upstreams.u.circuit_breaker.scope",
            "Input should be 'target', 'upstream' or 'both'",
            id="breaker-scope",
        ),
        pytest.param(
            U + "    circuit_breaker: {recovery: soon}\n",
            4,
            "upstreams.u.circuit_breaker.recovery",
            "expected a duration such as 30s, 250ms or 5m",
            id="breaker-recovery",
        ),
        pytest.param(
            U + "    retry_budget: {ratio: -1}\n",
            4,
            "upstreams.u.retry_budget.ratio",
            "Input should be greater than or equal to 0",
            id="budget-ratio",
        ),
        pytest.param(
            U + "    timeouts: {first_byte: 0s}\n",
            4,
            "upstreams.u.timeouts.first_byte",
            "Input should be greater than 0",
            id="timeouts-neg",
        ),
        pytest.param(
            U + "    failure_statuses: [99]\n",
            4,
            "upstreams.u.failure_statuses[0]",
            "Input should be greater than or equal to 100",
            id="failure-status",
        ),
        pytest.param(
            U + R + "    retries: {retry_on: [connect, explode]}\n",
            7,
            "routes[0].retries.retry_on",
            "unknown failure 'explode': connect, reset, timeout or a status",
            id="retries-on",
        ),
        pytest.param(
            U + R + "    retries: 11\n",
            7,
            "routes[0].retries",
            "Input should be less than or equal to 10",
            id="retries-many",
        ),
        pytest.param(
            U + R + "    retries: {idempotency_header: 'bad header'}\n",
            7,
            "routes[0].retries.idempotency_header",
            "'<value hidden>' is not a valid header name",
            id="retries-header",
        ),
        pytest.param(
            U + R + "    retries: {per_try_timeout: -1s}\n",
            7,
            "routes[0].retries.per_try_timeout",
            "expected a duration such as 30s, 250ms or 5m",
            id="retries-pertry",
        ),
        pytest.param(
            U + R + "    retries: true\n",
            7,
            "routes[0].retries",
            "Input should be a valid dictionary or instance of RetryConfi",
            id="retries-bool",
        ),
    ],
)
def test_bad_upstream_settings_name_field_and_line(text: str, line: int, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(text=text, environ={})
    assert [(i.line, i.path()) for i in caught.value.issues] == [(line, path)]
    assert message in caught.value.issues[0].message


def test_good_upstream_settings_load() -> None:
    text = (
        U
        + "    balancer: {name: sticky, cookie: pin, ttl: 1h, fallback: p2c}\n"
        + "    health:\n      active: {path: /healthz, statuses: [200, '300-302']}\n"
        + "      passive: {consecutive_failures: 3}\n"
        + "    circuit_breaker: {error_rate: 0.5, scope: both}\n"
        + "    retry_budget: null\n"
        + R
        + "    retries: {attempts: 3, retry_on: [connect, timeout, 503],\n"
        + "              idempotency_header: Idempotency-Key}\n"
    )
    config = load_config(text=text, environ={})
    upstream = config.upstreams["u"]
    assert upstream.health.active is not None and upstream.health.active.statuses == [200, 300, 301, 302]
    assert upstream.retry_budget is None
    policy = config.routes[0].retries.policy()
    assert policy.attempts == 3 and policy.statuses == frozenset({503})
    assert policy.idempotency_header == b"idempotency-key"


def test_circuit_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIRCUIT_FAILURE_THRESHOLD", "7")
    monkeypatch.setenv("CIRCUIT_RECOVERY_TIMEOUT", "12")
    config = load_config(text=U + "    circuit_breaker: {}\n", environ={})
    breaker = config.upstreams["u"].circuit_breaker
    assert breaker is not None and (breaker.failures, breaker.recovery) == (7, 12.0)


def test_apigate_check_prints_the_path_and_line(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        U + "    balancer: {name: hash, on: header}\n" + R + "    retries: {retry_on: [explode]}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "apigate", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "line 4: upstreams.u.balancer: hashing on header needs key: the header name" in output
    assert "line 8: routes[0].retries.retry_on: unknown failure" in output


@pytest.mark.parametrize(
    ("text", "line", "path", "message"),
    [
        pytest.param(
            "upstreams:\n  u:\n    dns: {name: api.internal}\n",
            3,
            "upstreams.u.dns",
            "set port",
            id="dns-no-port",
        ),
        pytest.param(
            "upstreams:\n  u:\n    dns: {name: 10.0.0.1, port: 80}\n",
            3,
            "upstreams.u.dns",
            "is an IP address",
            id="dns-ip",
        ),
        pytest.param(
            "upstreams:\n  u:\n    dns: {name: api.internal, record: MX, port: 80}\n",
            3,
            "upstreams.u.dns.record",
            "'SRV'",
            id="dns-record",
        ),
        pytest.param(
            "upstreams:\n  u:\n    dns: {name: a.internal, port: 80, min_ttl: 60s, max_ttl: 1s}\n",
            3,
            "upstreams.u.dns",
            "max_ttl",
            id="dns-ttls",
        ),
        pytest.param(
            "upstreams:\n  u:\n    dns: {name: a.internal, port: 80, nameservers: [dns.google]}\n",
            3,
            "upstreams.u.dns",
            "nameservers[0]",
            id="dns-nameserver",
        ),
        pytest.param(
            "upstreams:\n  u:\n    service: users\n    dns: {name: a.internal, port: 80}\n",
            2,
            "upstreams.u",
            "not service and dns",
            id="two-sources",
        ),
        pytest.param(
            "upstreams:\n  u:\n    balancer: p2c\n",
            2,
            "upstreams.u",
            "give one source of targets",
            id="no-source",
        ),
        pytest.param(
            "upstreams:\n  u:\n    service: 'Bad Name'\n",
            3,
            "upstreams.u.service",
            "should match pattern",
            id="service-name",
        ),
        pytest.param(
            "discovery:\n  allowed_networks: [10.0.0.0/33]\n",
            2,
            "discovery.allowed_networks",
            "network",
            id="networks",
        ),
        pytest.param(
            "discovery:\n  redis: {url: 'http://x'}\n", 2, "discovery.redis.url", "redis://", id="redis-url"
        ),
        pytest.param(
            "discovery:\n  redis: {url: 'redis://x', poll_interval: 0s}\n",
            2,
            "discovery.redis.poll_interval",
            "greater than 0",
            id="redis-poll",
        ),
        pytest.param("admin:\n  listen: nowhere\n", 2, "admin.listen", "host:port", id="admin-listen"),
        pytest.param("admin:\n  lisen: 8001\n", 2, "admin.lisen", "Extra inputs", id="admin-typo"),
        pytest.param(
            "timeouts:\n  drain_notice: soon\n", 2, "timeouts.drain_notice", "duration", id="drain-notice"
        ),
    ],
)
def test_bad_discovery_and_admin_settings_name_field_and_line(
    text: str, line: int, path: str, message: str
) -> None:
    test_bad_upstream_settings_name_field_and_line(text, line, path, message)
