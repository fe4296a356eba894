"""The YAML loader: typed values, env interpolation, and every problem named by path and line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from apigate.config.loader import ConfigError, load_config
from apigate.config.models import GatewayConfig
from tests.support.pactown import PACTOWN_ROUTES_YAML

SECRET = "sk_live_9f8e7d6c5b4a39281706"


def write(tmp_path: Path, text: str, *, dedent: bool = True) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(textwrap.dedent(text) if dedent else text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, **environ: str) -> GatewayConfig:
    return load_config(write(tmp_path, text), environ=environ)


def problems(tmp_path: Path, text: str, **environ: str) -> list[tuple[int | None, str, str]]:
    """(line, field path, message) of every issue, in the order reported."""
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, **environ)
    return [(issue.line, issue.path(), issue.message) for issue in caught.value.issues]


@pytest.fixture(autouse=True)
def _no_env_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    # models.py reads these from os.environ for its defaults; the host's values must not leak in.
    for name in ("PORT", "DEFAULT_TIMEOUT", "MAX_RETRIES", "APIGATE_STATE_URL"):
        monkeypatch.delenv(name, raising=False)


# --- valid configs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [('"127.0.0.1:9000"', "127.0.0.1", 9000), ('":9000"', "0.0.0.0", 9000), ("9000", "0.0.0.0", 9000)],
)
def test_listen_forms(tmp_path: Path, listen: str, host: str, port: int) -> None:
    config = load(tmp_path, f"listen: {listen}\n")
    assert (config.listen.host, config.listen.port) == (host, port)


def test_full_config(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        listen: 127.0.0.1:9000
        workers: 2
        trusted_proxies: [10.0.0.0/8]
        timeouts: {connect: 2s, read: 1m}
        limits: {max_body_size: 10MiB}
        endpoints: {stats: ~, token: "${ADMIN_TOKEN}"}
        upstreams:
          backend:
            targets:
              - http://10.0.0.1:8080
              - {url: "http://10.0.0.2:8080", weight: 3}
            pool: {max_connections: 64}
        routes:
          - name: users
            path: /users/{id}
            host: api.example.com
            methods: [get, POST]
            headers: {X-Tenant: "*"}
            upstream: backend
            rewrite: /v2/users/{id}
            timeout: 250ms
            max_body_size: 1MB
          - path: /static/*
            host: [example.com, "*.example.com"]
            target: https://cdn.example.com
            strip_prefix: true
            retries: 0
        """,
        ADMIN_TOKEN=SECRET,
    )
    assert (config.listen.host, config.listen.port, config.workers) == ("127.0.0.1", 9000, 2)
    assert str(config.trusted_proxies[0]) == "10.0.0.0/8"
    assert (config.timeouts.connect, config.timeouts.read) == (2.0, 60.0)
    assert config.limits.max_body_size == 10 * 1024 * 1024
    assert config.endpoints.stats is None
    assert config.endpoints.token is not None and config.endpoints.token.get_secret_value() == SECRET
    targets = config.upstreams["backend"].targets
    assert [(t.url, t.weight) for t in targets] == [("http://10.0.0.1:8080", 1), ("http://10.0.0.2:8080", 3)]
    assert config.upstreams["backend"].pool.max_connections == 64
    users, static = config.routes
    assert users.name == "users" and users.host == ["api.example.com"]
    assert users.methods == ["GET", "POST"]
    assert users.headers == {"x-tenant": "*"}
    assert (users.upstream, users.rewrite) == ("backend", "/v2/users/{id}")
    assert (users.timeout, users.max_body_size) == (0.25, 1_000_000)
    assert static.host == ["example.com", "*.example.com"]
    assert static.strip_prefix is True and static.retries.attempts == 0


def test_headers_policy_route_and_global(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        policies:
          headers:
            response: {set: {X-Gateway: apigate}}
        routes:
          - path: /a
            target: http://a:80
            policies:
              headers:
                request:
                  remove: [Cookie]
                  add: {X-Api-Key: "${API_KEY}"}
          - path: /b
            target: http://b:80
            policies: {headers: ~}
        """,
        API_KEY=SECRET,
    )
    assert config.policies["headers"] == {"response": {"set": {"X-Gateway": "apigate"}}}
    route_policy = config.routes[0].policies["headers"]
    assert route_policy == {"request": {"remove": ["Cookie"], "add": {"X-Api-Key": SECRET}}}
    assert config.routes[1].policies == {"headers": None}


def test_headers_policy_errors_have_paths_and_lines(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """\
        policies:
          headers:
            response: {sett: {}}
        routes:
          - path: /a
            target: http://a:80
            policies:
              headers:
                request:
                  set:
                    Host: example.com
        """,
    )
    assert [(line, path) for line, path, _ in found] == [
        (3, "policies.headers.response.sett"),
        (11, "routes[0].policies.headers.request.set.Host"),  # the key itself
    ]
    assert "managed by the proxy" in found[1][2]


def test_scalars_are_typed(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        listen: {host: "::1", port: 8001}
        endpoints: {routes: ~}
        routes:
          - {path: /a/*, target: "http://a:80", strip_prefix: yes, preserve_host: false}
        """,
    )
    assert config.listen.port == 8001 and config.endpoints.routes is None
    assert config.routes[0].strip_prefix is True and config.routes[0].preserve_host is False


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "---\n"])
def test_empty_file_gives_defaults(tmp_path: Path, text: str) -> None:
    config = load(tmp_path, text)
    assert config == GatewayConfig()
    assert config.routes == [] and config.listen.port == 8000


def test_text_instead_of_path() -> None:
    config = load_config(text="routes: [{path: /x, target: 'http://x:1'}]", environ={})
    assert config.routes[0].target == "http://x:1"


def test_exactly_one_source(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        load_config()
    with pytest.raises(TypeError):
        load_config(write(tmp_path, ""), text="")


def test_merge_keys_are_overridden_without_duplicate_error(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        routes:
          - &base {path: /a, target: "http://a:80", timeout: 5s}
          - <<: *base
            path: /b
        """,
    )
    assert [(r.path, r.timeout) for r in config.routes] == [("/a", 5.0), ("/b", 5.0)]


# --- a routes.yaml written for the Pactown gateway ----------------------------------------------


def test_pactown_routes_yaml_loads_unchanged(tmp_path: Path) -> None:
    path = write(tmp_path, PACTOWN_ROUTES_YAML, dedent=False)  # dedent would empty the whitespace-only lines
    assert "\n    \n" in path.read_text()
    config = load_config(path, environ={})
    assert [r.path for r in config.routes] == [
        "/webhooks/allegro",
        "/webhooks/inpost",
        "/webhooks/stripe",
        "/api/v1/*",
    ]
    assert config.routes[0].auth == "webhook_secret" and config.routes[0].rate_limit == "100/min"
    assert config.routes[3].cache == "60s"
    assert config.listen.port == 8000
    assert all(r.timeout == 30.0 and r.retries.attempts == 2 for r in config.routes)


def test_pactown_routes_yaml_reads_its_env_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9123")
    monkeypatch.setenv("DEFAULT_TIMEOUT", "12")
    monkeypatch.setenv("MAX_RETRIES", "5")
    config = load_config(write(tmp_path, PACTOWN_ROUTES_YAML, dedent=False))  # environ defaults to os.environ
    assert config.listen.port == 9123
    assert all(r.timeout == 12.0 and r.retries.attempts == 5 for r in config.routes)


# --- errors: path, line, message -------------------------------------------------------------

ROUTE = "routes:\n  - path: /a\n"  # line 2 is the route; add its keys from line 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            ROUTE + "    tagret: http://a:80\n",
            [(3, "routes[0].tagret", "Extra inputs are not permitted")],
            id="typo",
        ),
        pytest.param(
            ROUTE + "    target: ftp://a\n",
            [(3, "routes[0].target", "must be an http:// or https:// URL")],
            id="bad-url",
        ),
        pytest.param(
            ROUTE + "    auth: jwt\n",
            [(2, "routes[0]", "a route needs a target or an upstream (or a policy that answers itself)")],
            id="no-target",
        ),
        pytest.param(
            "upstreams:\n  u: {targets: [http://u:1]}\n"
            + ROUTE.replace("/a", "/b")
            + "    target: http://a:80\n    upstream: u\n",
            [(4, "routes[0]", "a route takes one of target or upstream, not both")],
            id="target-and-upstream",
        ),
        pytest.param(
            ROUTE + "    upstream: nowhere\n",
            [(3, "routes[0].upstream", "no upstream named 'nowhere'")],
            id="unknown-upstream",
        ),
        pytest.param(
            "routes:\n  - {name: r, path: /a, target: 'http://a:1'}\n  - {name: r, path: /b, target: 'http://a:1'}\n",
            [(3, "routes[1].name", "route name 'r' is already used by routes[0]")],
            id="duplicate-route-name",
        ),
        pytest.param(
            "routes:\n  - target: http://a:1\n    path: /a*b\n",
            [(3, "routes[0].path", "* is allowed only as the whole last segment, as in /api/*")],
            id="bad-path-pattern",
        ),
        pytest.param(
            "routes:\n  - target: http://a:1\n", [(2, "routes[0].path", "Field required")], id="missing-path"
        ),
        pytest.param(
            ROUTE + "    target: http://a:1\n    methods: [GET, FETCH]\n",
            [(4, "routes[0].methods", "unknown method(s) FETCH")],
            id="bad-method",
        ),
        pytest.param(
            ROUTE + "    target: http://a:1\n    timeout: soon\n",
            [(4, "routes[0].timeout", "expected a duration such as 30s, 250ms or 5m")],
            id="bad-duration",
        ),
        pytest.param(
            ROUTE + "    target: http://a:1\n    max_body_size: -5\n",
            [(4, "routes[0].max_body_size", "a size cannot be negative")],
            id="negative-size",
        ),
        pytest.param(
            ROUTE + "    target: http://a:1\n    max_body_size: 1iB\n",
            [(4, "routes[0].max_body_size", "expected a size such as 1048576, 512KB or 10MiB")],
            id="size-unit-without-multiplier",
        ),
        pytest.param(
            ROUTE + "    target: http://a:1\n    upgrades: [web socket]\n",
            [(4, "routes[0].upgrades", "is not a protocol name such as websocket")],
            id="bad-upgrade-protocol",
        ),
        pytest.param(
            "timeouts: {body_idle: never}\n",
            [(1, "timeouts.body_idle", "expected a duration such as 30s, 250ms or 5m")],
            id="bad-body-idle",
        ),
        pytest.param(
            "upstreams:\n  main:\n    targets:\n      - http://a:1\n      - {url: 'a:1', weight: 2}\n",
            [(5, "upstreams.main.targets[1].url", "must be an http:// or https:// URL")],
            id="bad-upstream-target",
        ),
        pytest.param(
            ROUTE + "    target: http://a:1\n    policies:\n      nope: {}\n",
            [(5, "routes[0].policies.nope", "unknown policy 'nope'")],
            id="unknown-route-policy",
        ),
        pytest.param(
            "workers: 1\npolicies:\n  nope: ~\n",
            [(3, "policies.nope", "unknown policy 'nope'")],
            id="unknown-global-policy",
        ),
        pytest.param(
            "workers: 1\nroutes: [\n  {path: /a\n",
            [(4, "(top level)", "YAML syntax error")],
            id="yaml-syntax",
        ),
        pytest.param(
            "workers: 1\nlisten: 80\nworkers: 2\n",
            [(3, "workers", "duplicate key 'workers' (first at line 1)")],
            id="duplicate-key",
        ),
        pytest.param(
            "- path: /a\n  target: http://a:1\n",
            [(1, "(top level)", "must be a mapping")],
            id="top-level-list",
        ),
        pytest.param(
            ROUTE + "    target: http://${UPSTREAM_HOST}:80\n",
            [(3, "routes[0].target", "environment variable UPSTREAM_HOST is not set")],
            id="unset-env",
        ),
        pytest.param(
            "workers: !secret x\n", [(1, "workers", "unsupported YAML tag !secret")], id="unknown-tag"
        ),
        pytest.param(
            ROUTE + "    target: http://a:1\n    policies:\n      cache:\n        store: disk\n",
            [(6, "routes[0].policies.cache.store", "Input should be 'memory' or 'redis'")],
            id="cache-unknown-store",
        ),
        pytest.param(
            ROUTE + "    target: http://a:1\n    policies:\n      cache:\n        store: redis\n",
            [(6, "routes[0].policies.cache.store", "needs a Redis in state.url")],
            id="cache-redis-without-redis",
        ),
        pytest.param(
            "state: {url: 'redis://r:6379/0'}\n"
            + ROUTE.replace("/a", "/b")
            + "    target: http://a:1\n    policies:\n      cache:\n        store: redis\n"
            "        local_ttl: 2m\n        local_max_bytes: 0\n        max_entry_size: 64MiB\n",
            [
                (8, "routes[0].policies.cache.local_ttl", "less than or equal to 60"),
                (9, "routes[0].policies.cache.local_max_bytes", "greater than or equal to 1"),
                (10, "routes[0].policies.cache.max_entry_size", "at most 32MiB with store: redis"),
            ],
            id="cache-redis-bounds",
        ),
        pytest.param(
            "policies:\n  cache: {store: redis, local_ttl: soon}\n",
            [(2, "policies.cache.local_ttl", "expected a duration such as 30s")],
            id="cache-global-bad-local-ttl",
        ),
        pytest.param(
            "workers: 0\n", [(1, "workers", "Input should be greater than or equal to 1")], id="out-of-range"
        ),
        pytest.param(
            "listen: 99999\n",
            [(1, "listen", "Input should be less than or equal to 65535")],
            id="bad-port",
        ),
    ],
)
def test_error_kinds(tmp_path: Path, text: str, expected: list[tuple[int, str, str]]) -> None:
    found = problems(tmp_path, text)
    assert len(found) == len(expected), found
    for (line, path, message), (want_line, want_path, want_message) in zip(found, expected, strict=True):
        assert (line, path) == (want_line, want_path), found
        assert want_message in message


def test_several_errors_reported_at_once_sorted_by_line(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """\
        listen: ":${PORT_NUMBER}"
        routes:
          - path: /a
            tagret: http://a:80
          - path: /b*
            target: http://b:80
            timeout: 3 fortnights
          - path: /c
            upstream: missing
        workers: 0
        """,
    )
    assert [(line, path) for line, path, _ in found] == [
        (1, "listen"),
        (4, "routes[0].tagret"),
        (5, "routes[1].path"),
        (7, "routes[1].timeout"),
        (9, "routes[2].upstream"),
        (10, "workers"),
    ]
    # Only the unset variable is reported for listen, not the ":" it leaves behind; the
    # cross-field checks (the unknown upstream) run alongside field validation.
    assert found[0][2] == "environment variable PORT_NUMBER is not set"


def test_semantic_errors_together(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """\
        routes:
          - {name: a, path: /a, upstream: x}
          - {name: a, path: /b, target: "http://b:1"}
        policies:
          nope: {}
        """,
    )
    assert [(line, path) for line, path, _ in found] == [
        (2, "routes[0].upstream"),
        (3, "routes[1].name"),
        (5, "policies.nope"),
    ]


def test_error_str_is_one_issue_per_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, ROUTE + "    target: ftp://a\n    timeout: x\n")
    assert str(caught.value).splitlines() == [
        "line 3: routes[0].target: must be an http:// or https:// URL",
        "line 4: routes[0].timeout: expected a duration such as 30s, 250ms or 5m",
    ]


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read .*missing\.yaml: No such file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_bytes(b"workers: 1\nname: \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8") as caught:
        load_config(path)
    assert caught.value.issues[0].line == 2


def test_recursive_alias(tmp_path: Path) -> None:
    found = problems(tmp_path, "routes: &r [*r]\n")
    assert any("alias refers to a value that contains it" in message for _, _, message in found)


# --- environment interpolation ---------------------------------------------------------------


def test_env_interpolation(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        listen: "${HOST}:${PORT_NO:-8100}"
        workers: ${WORKERS}
        endpoints:
          health: /${PREFIX:-x}/${NAME}/health
          routes: ${EMPTY:-/fallback}
          stats: "/cost-$${NOT_A_VAR}-$$-${EMPTY}"
        """,
        HOST="127.0.0.1",
        WORKERS="4",
        PREFIX="gw",
        NAME="edge",
        EMPTY="",
    )
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 8100)
    assert config.workers == 4  # "${WORKERS}" stays a string, pydantic's lax mode makes it an int
    assert config.endpoints.health == "/gw/edge/health"
    assert config.endpoints.routes == "/fallback"  # empty counts as unset, as in shell
    assert config.endpoints.stats == "/cost-${NOT_A_VAR}-$$-"  # set but empty, no default: empty


def test_env_values_are_not_interpolated_again(tmp_path: Path) -> None:
    config = load(tmp_path, "endpoints: {health: '${A}'}\n", A="/${B}")
    assert config.endpoints.health == "/${B}"


def test_env_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APIGATE_TEST_WORKERS", "3")
    assert load_config(write(tmp_path, "workers: ${APIGATE_TEST_WORKERS}\n")).workers == 3


def test_several_unset_vars_in_one_value(tmp_path: Path) -> None:
    found = problems(tmp_path, "endpoints:\n  health: /${ONE}/${TWO}/${ONE}\n")
    assert found == [
        (2, "endpoints.health", "environment variable ONE is not set"),
        (2, "endpoints.health", "environment variable TWO is not set"),
    ]


def test_malformed_reference(tmp_path: Path) -> None:
    found = problems(tmp_path, "endpoints:\n  health: /${1BAD}\n")
    assert [(line, path) for line, path, _ in found] == [(2, "endpoints.health")]
    assert "malformed" in found[0][2]


def test_only_string_scalars_are_interpolated(tmp_path: Path) -> None:
    # A key is never interpolated: `${X}` as a key stays an (unknown) key.
    found = problems(tmp_path, "${X}: 1\n", X="workers")
    assert found == [(1, "${X}", "Extra inputs are not permitted")]


# --- secrets never reach messages ------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        f"routes:\n  - {{path: /a, target: '{SECRET}'}}\n",
        f"trusted_proxies: ['{SECRET}']\n",
        f"listen: '{SECRET}'\n",
        f"endpoints: {{token: ['{SECRET}']}}\n",
        f"workers: '{SECRET}'\n",
        f"routes:\n  - {{path: /a, target: 'http://a:1', host: '{SECRET}.example.com:x'}}\n",
        f'endpoints:\n  token: "{SECRET}\n',  # unterminated quote: a YAML syntax error
        f"workers: 1\nworkers: '{SECRET}'\n",
    ],
)
def test_messages_never_contain_values(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert caught.value.issues
    assert SECRET not in str(caught.value)
    assert SECRET not in repr(caught.value)


def test_secret_from_env_never_in_messages(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, "routes:\n  - {path: /a, target: '${TOKEN}'}\n", TOKEN=SECRET)
    assert str(caught.value) == "line 2: routes[0].target: must be an http:// or https:// URL"


def test_alias_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from apigate.config import loader

    monkeypatch.setattr(loader, "_MAX_NODES", 5_000)  # the real limit, smaller to stay fast
    lines = ["routes: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"p{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    found = problems(tmp_path, "\n".join(lines) + "\n")
    assert found == [(1, "(top level)", "document expands to too many values (aliases?)")]


def test_every_builtin_policy_is_known_even_after_one_was_imported_alone() -> None:
    # A fresh interpreter: the registry is process-wide.
    code = (
        "import apigate.policies.jwt\n"
        "from apigate.policies.registry import BUILTIN, registry\n"
        "print(len(registry()), 'oauth2-token' in registry(), 'headers' in registry())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    count, has_token, has_headers = out.split()
    assert has_token == "True" and has_headers == "True"
    assert int(count) >= 10
