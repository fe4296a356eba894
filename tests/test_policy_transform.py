"""The `transform` policy end to end: a real gateway process in front of the real upstream, which
records what reached it (headers, query, path, the body's first 64 KiB).

Header and query values with every variable (a consumer by key-auth, a token's claims by jwt,
the request id, client address, route and an environment variable), query edits and their
encoding, path rewrites with groups, JSON body mapping and the bodies it leaves alone; then
what is never sent (CR/LF from a variable, a path climbing out of its rewrite) and, with
Hypothesis, that no header value, query string or body makes the gateway fail.
"""

from __future__ import annotations

import gzip
import json
import re
import string
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.errors_helpers import wait_until
from tests.support.inprocess import InProcessGateway
from tests.support.jwks_server import HS_SECRET, claims, hs_sign
from tests.support.proxy_http import RawConnection, find_request, running_gateway
from tests.support.upstream import Seen, UpstreamServer

ALICE_KEY = "alice-transform-key-0123456789abcdef"
ENV = {"TRANSFORM_TEST_REGION": "eu-west"}
JWT = {"algorithms": ["HS256"], "secret": HS_SECRET}
BODY_MAP = {
    "set": {"meta.source": "gateway", "items[*].currency": "EUR", "flags": {"mapped": True}},
    "remove": ["user.internal_id", "items[*].internal"],
    "rename": {"user.name": "full_name"},
    "move": {"legacy.id": "id"},
    "copy": {"user.email": "contact.email"},
    "max_size": "2KB",
}
EVERY_VARIABLE = {
    "X-Consumer": "${consumer.id}",
    "X-Tenant-ID": "${tenant_id}",
    "X-Consumer-Tenant": "${consumer.tenant}",
    "X-Request": "${request_id}",
    "X-Client": "${client_ip}",
    "X-Route": "${route}",
    "X-Region": "${env.TRANSFORM_TEST_REGION}",
    "X-Mixed": "r=${route};ip=${client_ip}",
}


def route(prefix: str, target: str, policies: dict[str, Any], strip: bool = True) -> dict[str, Any]:
    return {
        "name": prefix.strip("/"),
        "path": f"{prefix}/*",
        "target": target,
        "strip_prefix": strip,
        "policies": policies,
    }


@pytest.fixture(scope="module")
def gateway(shared_upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory):
    url = shared_upstream.url
    directory = tmp_path_factory.mktemp("transform")
    config = {
        "store": {"url": f"sqlite:///{directory / 'apigate.db'}"},
        "consumers": [{"id": "alice", "tenant": "acme", "keys": [{"key": ALICE_KEY}]}],
        "routes": [
            route(
                "/vars",
                url,
                {
                    "transform": {
                        "request": {"headers": {"set": EVERY_VARIABLE, "add": {"X-Added": "a-${route}"}}},
                        "response": {
                            "headers": {
                                "set": {"X-Served-Route": "${route}", "X-Echo-Request": "${request_id}"},
                                "remove": ["X-Kept"],
                            }
                        },
                    }
                },
            ),
            route(
                "/key",
                url,
                {"key-auth": {}, "transform": {"request": {"headers": {"set": EVERY_VARIABLE}}}},
            ),
            route(
                "/jwt",
                url,
                {
                    "jwt": JWT,
                    "transform": {
                        "request": {
                            "headers": {
                                "set": {
                                    "X-Sub": "${jwt.sub}",
                                    "X-Plan": "${jwt.plan}",
                                    "X-Roles": "${jwt.roles}",
                                    "X-Tenant-ID": "${tenant_id}",
                                    "X-Evil": "${jwt.evil}",
                                    "X-Namespaced": "${jwt.https://example.com/org}",
                                },
                                "remove": ["X-Internal"],
                                "rename": {"X-Old": "X-New"},
                            },
                            "query": {"set": {"sub": "${jwt.sub}", "evil": "${jwt.evil}"}},
                        }
                    },
                },
            ),
            route(
                "/query",
                url,
                {
                    "transform": {
                        "request": {
                            "query": {
                                "remove": ["debug", "api key"],
                                "rename": {"old": "new"},
                                "set": {"version": "2"},
                                "add": {"tag": "a b&c=d/\u00e9+%", "ip": "${client_ip}"},
                            }
                        }
                    }
                },
            ),
            route(
                "/users",
                url,
                {
                    "transform": {
                        "request": {
                            "path": {
                                "pattern": r"^/users/v1/(?P<id>[0-9]+)$",
                                "replace": "/people/{id}/profile",
                            }
                        }
                    }
                },
                strip=False,
            ),
            route(
                "/stripped",
                url,
                {"transform": {"request": {"path": {"pattern": r"^/v1/([a-z]+)/", "replace": "/v2/{1}s/"}}}},
            ),
            route(
                "/files",
                url,
                {
                    "transform": {
                        "request": {
                            "path": {"pattern": r"^/(?P<name>[^/]+)\.json$", "replace": "/store/{name}/data"}
                        }
                    }
                },
            ),
            route("/body", url, {"transform": {"request": {"body": BODY_MAP}}}),
            route(
                "/all",
                url,
                {
                    "transform": {
                        "request": {
                            "headers": {"set": {"X-Route": "${route}"}},
                            "query": {"add": {"via": "gw"}},
                            "path": {"pattern": "^/all/", "replace": "/everything/"},
                            "body": {"remove": ["secret"]},
                        }
                    }
                },
                strip=False,
            ),
        ],
    }
    with running_gateway(directory, config, env=ENV) as gw:
        # The port is open; declared keys are served a moment later.
        wait_until(lambda: call(gw.port, "/key/echo", {"X-API-Key": ALICE_KEY}).status == 200, timeout=15)
        yield gw


def call(
    port: int, path: str, headers: dict[str, str] | None = None, body: bytes = b"", method: str = "GET"
) -> Any:
    with RawConnection(port) as conn:
        return conn.exchange(method, path, headers, body)


def seen(upstream: UpstreamServer, response: Any) -> Seen:
    return find_request(upstream, response.header("x-request-id"))


def forwarded(port: int, upstream: UpstreamServer, path: str, **kwargs: Any) -> tuple[Any, Seen]:
    """(the client's response, what the upstream saw of the request)."""
    response = call(port, path, **kwargs)
    assert response.status == 200, (response.status, response.body)
    return response, seen(upstream, response)


# -- variables in header values ----------------------------------------------------------------------------


def test_every_variable_without_a_consumer(gateway, shared_upstream) -> None:
    response, request = forwarded(
        gateway.port, shared_upstream, "/vars/echo", headers={"X-Tenant-ID": "spoofed", "X-Consumer": "me"}
    )
    rid = response.header("x-request-id")
    assert request.header("x-request") == rid
    assert request.header("x-client") == "127.0.0.1"
    assert request.header("x-route") == "vars"
    assert request.header("x-region") == "eu-west"
    assert request.header("x-mixed") == "r=vars;ip=127.0.0.1"
    assert request.header("x-added") == "a-vars"
    # No consumer: those values resolve to nothing, so the headers are left out, and `set` still
    # took away what the client sent under those names.
    names = {name for name, _ in request.headers}
    assert {"x-consumer", "x-tenant-id", "x-consumer-tenant"}.isdisjoint(names)
    # The response side, with variables too.
    assert response.header("x-served-route") == "vars"
    assert response.header("x-echo-request") == rid


def test_response_headers_are_removed(gateway, shared_upstream) -> None:
    response = call(gateway.port, "/vars/hop")
    assert response.status == 200
    assert response.header("x-kept") is None
    assert response.header("x-served-route") == "vars"


def test_consumer_variables_come_from_key_auth(gateway, shared_upstream) -> None:
    _, request = forwarded(
        gateway.port, shared_upstream, "/key/echo", headers={"X-API-Key": ALICE_KEY, "X-Tenant-ID": "spoofed"}
    )
    assert request.header("x-consumer") == "alice"
    assert request.header("x-consumer-tenant") == "acme"
    assert [value for name, value in request.headers if name == "x-tenant-id"] == ["acme"]
    assert request.header("x-route") == "key"


def test_claim_variables_come_from_the_jwt(gateway, shared_upstream) -> None:
    token = hs_sign(
        claims(
            sub="svc-7",
            plan="pro",
            roles=["admin", "ops"],
            tenant="globex",
            **{"https://example.com/org": "o-1"},
        )
    )
    _, request = forwarded(
        gateway.port,
        shared_upstream,
        "/jwt/echo?keep=1",
        headers={"Authorization": f"Bearer {token}", "X-Internal": "x", "X-Old": "moved"},
    )
    assert request.header("x-sub") == "svc-7"
    assert request.header("x-plan") == "pro"
    assert request.header("x-roles") == "admin,ops"
    assert request.header("x-tenant-id") == "globex"
    assert request.header("x-namespaced") == "o-1"
    assert request.header("x-evil") is None  # no such claim
    assert request.header("x-internal") is None
    assert (request.header("x-new"), request.header("x-old")) == ("moved", None)
    assert request.query == "keep=1&sub=svc-7"


def test_a_missing_claim_leaves_its_header_out(gateway, shared_upstream) -> None:
    token = hs_sign(claims(sub="svc-8"))
    _, request = forwarded(
        gateway.port, shared_upstream, "/jwt/echo", headers={"Authorization": f"Bearer {token}"}
    )
    assert request.header("x-sub") == "svc-8"
    assert request.header("x-plan") is None and request.header("x-tenant-id") is None


@pytest.mark.parametrize(
    "evil", ["a\r\nX-Injected: 1", "a\nX-Injected: 1", "a\rb", "nul\x00byte", "bell\x07"]
)
def test_control_characters_from_a_variable_never_reach_the_upstream(
    gateway, shared_upstream, evil: str
) -> None:
    token = hs_sign(claims(sub="svc-9", evil=evil))
    _, request = forwarded(
        gateway.port, shared_upstream, "/jwt/echo", headers={"Authorization": f"Bearer {token}"}
    )
    names = {name for name, _ in request.headers}
    assert "x-evil" not in names and "x-injected" not in names
    assert request.header("x-sub") == "svc-9"
    # In the query it is dropped as well, never sent even percent-encoded.
    assert request.query == "sub=svc-9"


# -- query -------------------------------------------------------------------------------------------------


def test_query_edits_and_their_encoding(gateway, shared_upstream) -> None:
    _, request = forwarded(
        gateway.port,
        shared_upstream,
        "/query/echo?a=1&debug=true&old=x%20y&%64ebug=2&version=1&api+key=s3cret&z",
    )
    # Untouched parameters go as sent; debug by its encoded name too; api+key is "api key".
    assert request.query == "a=1&new=x%20y&z&version=2&tag=a%20b%26c%3Dd%2F%C3%A9%2B%25&ip=127.0.0.1"


def test_query_added_to_a_request_without_one(gateway, shared_upstream) -> None:
    _, request = forwarded(gateway.port, shared_upstream, "/query/echo")
    assert request.query == "version=2&tag=a%20b%26c%3Dd%2F%C3%A9%2B%25&ip=127.0.0.1"


# -- path ----------------------------------------------------------------------------------------------------


def test_path_rewrite_with_a_named_group(gateway, shared_upstream) -> None:
    _, request = forwarded(gateway.port, shared_upstream, "/users/v1/42?x=1")
    assert (request.path, request.query) == ("/people/42/profile", "x=1")


def test_path_that_does_not_match_goes_as_it_was(gateway, shared_upstream) -> None:
    _, request = forwarded(gateway.port, shared_upstream, "/users/v1/abc")
    assert request.path == "/users/v1/abc"


def test_path_rewrite_applies_to_the_path_the_route_sends(gateway, shared_upstream) -> None:
    # strip_prefix makes it /v1/order/7; the rewrite replaces the first match only.
    _, request = forwarded(gateway.port, shared_upstream, "/stripped/v1/order/7")
    assert request.path == "/v2/orders/7"


def test_a_rewrite_that_would_climb_out_is_refused(gateway, shared_upstream) -> None:
    before = len(shared_upstream.requests)
    for path in ("/files/...json", "/files/..json"):  # {name} is ".." then "."
        response = call(gateway.port, path)
        assert response.status == 400, path
        assert response.json()["reason"] == "invalid_rewritten_path"
    assert len(shared_upstream.requests) == before
    _, request = forwarded(gateway.port, shared_upstream, "/files/report.json")
    assert request.path == "/store/report/data"


def test_all_request_edits_together(gateway, shared_upstream) -> None:
    body = orjson.dumps({"secret": "s", "keep": 1})
    _, request = forwarded(
        gateway.port,
        shared_upstream,
        "/all/x?q=1",
        method="POST",
        body=body,
        headers={"Content-Type": "application/json"},
    )
    assert (request.path, request.query, request.header("x-route")) == ("/everything/x", "q=1&via=gw", "all")
    assert orjson.loads(request.body) == {"keep": 1}
    assert request.header("content-length") == str(len(request.body))


# -- JSON bodies ---------------------------------------------------------------------------------------------

DOCUMENT = {
    "user": {"name": "Ada", "internal_id": 7, "email": "ada@example.com"},
    "items": [
        {"id": 1, "price": 10, "internal": "x"},
        {"id": 2, "price": 20.5, "internal": "y"},
        {"id": 3, "price": 5},
    ],
    "legacy": {"id": "L-1"},
    "note": "\u017c\u00f3\u0142w",
}
MAPPED = {
    "user": {"full_name": "Ada", "email": "ada@example.com"},
    "items": [
        {"id": 1, "price": 10, "currency": "EUR"},
        {"id": 2, "price": 20.5, "currency": "EUR"},
        {"id": 3, "price": 5, "currency": "EUR"},
    ],
    "legacy": {},
    "note": "\u017c\u00f3\u0142w",
    "id": "L-1",
    "contact": {"email": "ada@example.com"},
    "meta": {"source": "gateway"},
    "flags": {"mapped": True},
}


def post_body(port: int, upstream: UpstreamServer, body: bytes, content_type: str, **headers: str) -> Seen:
    _, request = forwarded(
        port,
        upstream,
        "/body/echo",
        method="POST",
        body=body,
        headers={"Content-Type": content_type, **headers},
    )
    return request


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/Vnd.Api+JSON"]
)
def test_a_json_body_is_mapped(gateway, shared_upstream, content_type: str) -> None:
    request = post_body(gateway.port, shared_upstream, orjson.dumps(DOCUMENT), content_type)
    mapped = orjson.loads(request.body)
    assert mapped == MAPPED
    assert list(mapped["user"]) == ["full_name", "email"]  # renamed in place
    assert request.header("content-length") == str(len(request.body))


def test_a_chunked_json_body_is_mapped_and_sent_with_its_length(gateway, shared_upstream) -> None:
    body = orjson.dumps(DOCUMENT)
    framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:50], body[50:])) + b"0\r\n\r\n"
    request = post_body(
        gateway.port, shared_upstream, framed, "application/json", **{"Transfer-Encoding": "chunked"}
    )
    assert orjson.loads(request.body) == MAPPED
    assert request.header("transfer-encoding") is None


@pytest.mark.parametrize(
    ("body", "content_type", "extra"),
    [
        (orjson.dumps(DOCUMENT), "text/plain", {}),
        (orjson.dumps(DOCUMENT), "application/x-www-form-urlencoded", {}),
        (b'{"user": {"internal_id": 1}', "application/json", {}),  # malformed
        (b'{"user": NaN}', "application/json", {}),
        (b"\xff\xfe{}", "application/json", {}),
        (gzip.compress(orjson.dumps(DOCUMENT), mtime=0), "application/json", {"Content-Encoding": "gzip"}),
    ],
    ids=["text", "form", "malformed", "nan", "not-utf8", "gzip"],
)
def test_bodies_the_mapping_leaves_alone_go_byte_for_byte(
    gateway, shared_upstream, body: bytes, content_type: str, extra: dict[str, str]
) -> None:
    request = post_body(gateway.port, shared_upstream, body, content_type, **extra)
    assert request.body == body


def test_a_body_over_max_size_streams_through_unchanged(gateway, shared_upstream) -> None:
    document = {**DOCUMENT, "padding": "p" * 3000}  # over max_size (2 KB)
    body = orjson.dumps(document)
    request = post_body(gateway.port, shared_upstream, body, "application/json")
    assert request.body == body
    # Chunked, so the gateway finds out while it reads: what it held goes first, then the rest.
    pieces = [body[:1500], body[1500:2600], body[2600:]]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    request = post_body(
        gateway.port, shared_upstream, framed, "application/json", **{"Transfer-Encoding": "chunked"}
    )
    assert request.body == body and request.body_length == len(body)


def test_a_large_body_that_is_not_json_streams_through(gateway, shared_upstream) -> None:
    body = b"x" * (3 << 20)
    response = call(
        gateway.port, "/body/echo", method="POST", body=body, headers={"Content-Type": "text/plain"}
    )
    assert response.status == 200
    assert response.json()["body_length"] == len(body)


def test_big_integers_keep_every_digit(gateway, shared_upstream) -> None:
    body = b'{"id": 123456789012345678901234567890, "user": {"internal_id": 1, "name": "B"}, "f": 1.5}'
    request = post_body(gateway.port, shared_upstream, body, "application/json")
    mapped = orjson.loads(request.body.replace(b"123456789012345678901234567890", b"0"))
    assert b'"id":123456789012345678901234567890' in request.body
    assert mapped["user"] == {"full_name": "B"} and mapped["f"] == 1.5


# -- counting, with the engine in this process ---------------------------------------------------------


def test_bodies_that_are_not_mapped_are_counted(upstream: UpstreamServer) -> None:
    config = f"""
routes:
  - path: /body/*
    target: {upstream.url}
    policies:
      transform:
        request:
          body: {{remove: [secret], max_size: 100}}
"""
    with InProcessGateway(config) as gateway:
        policy = gateway.policy(0, "transform")
        sent = {
            "mapped": (b'{"secret": 1, "a": 2}', "application/json"),
            "unchanged": (b'{"a": 2}', "application/json"),
            "malformed": (b'{"secret": ', "application/json"),
            "not_json": (b"secret=1", "application/x-www-form-urlencoded"),
            "too_large": (b'{"secret": "' + b"s" * 200 + b'"}', "application/json"),
        }
        for body, content_type in sent.values():
            with RawConnection(gateway.port) as conn:
                response = conn.exchange("POST", "/body/echo", {"Content-Type": content_type}, body)
            assert response.status == 200
            assert find_request(upstream, response.header("x-request-id")).body == (
                b'{"a":2}' if body.startswith(b'{"secret": 1') else body
            )
        # The log hook counts the body that streamed past once its exchange is done.
        wait_until(lambda: policy.body_counts["too_large"] == 1, timeout=5)
        assert policy.body_counts == {
            "mapped": 1,
            "unchanged": 1,
            "not_json": 1,
            "encoded": 0,
            "too_large": 1,
            "malformed": 1,
            "too_deep": 0,
            "xml": 0,
            "xml_refused": 0,
        }


# -- config errors -------------------------------------------------------------------------------------------


def test_config_errors_name_their_fields(tmp_path: Path) -> None:
    from apigate.config.loader import ConfigError, load_config

    text = """\
routes:
  - path: /a/*
    target: http://127.0.0.1:9
    policies:
      transform:
        request:
          headers:
            set:
              X-Who: "${consumer.nickname}"
              X-Env: "${env.TRANSFORM_TEST_UNSET_VARIABLE}"
              Host: example.com
          query: {set: {"": x}}
          path: {pattern: "^/a/(?P<id>[0-9]+", replace: "/b/{id}"}
          body:
            remove: ["items[x]"]
            rename: {user.name: "a.b"}
            move: {"items[*].id": ids}
            set: {big: 123456789012345678901234567890, who: "${consumer.id}"}
        response:
          body: {remove: ["user["]}
  - path: /b/*
    target: http://127.0.0.1:9
    policies:
      transform:
        request:
          path: {pattern: "^/b/(?P<id>[0-9]+)$", replace: "/c/{nope} x"}
"""
    with pytest.raises(ConfigError) as caught:
        load_config(text=text, environ={})
    found = {issue.path(): (issue.line, issue.message) for issue in caught.value.issues}
    where = "routes[0].policies.transform.request"
    assert "unknown variable 'consumer.nickname'" in found[f"{where}.headers.set.X-Who"][1]
    assert (
        "environment variable TRANSFORM_TEST_UNSET_VARIABLE is not set"
        in found[f"{where}.headers.set.X-Env"][1]
    )
    assert "managed by the proxy" in found[f"{where}.headers.set.Host"][1]
    assert found[f"{where}.headers.set.X-Who"][0] == 9
    assert "cannot be empty" in found[f"{where}.query.set."][1]  # the key is ""
    assert "not a regular expression" in found[f"{where}.path.pattern"][1]
    assert "an index is written" in found[f"{where}.body.remove[0]"][1]
    assert "new name" in found[f"{where}.body.rename.user.name"][1]
    assert "not [*]" in found[f"{where}.body.move.items[*].id"][1]
    assert "not a JSON value" in found[f"{where}.body.set"][1]
    assert "an index is written" in found["routes[0].policies.transform.response.body.remove[0]"][1]
    assert "path characters only" in found["routes[1].policies.transform.request.path.replace"][1]


def test_a_replacement_must_name_groups_of_the_pattern() -> None:
    from apigate.policies.registry import validate_policy_config

    issues = validate_policy_config(
        "transform", {"request": {"path": {"pattern": "^/a/([0-9]+)$", "replace": "/b/{2}/{name}"}}}, ("t",)
    )
    assert [issue.path() for issue in issues] == ["t.request.path"]
    assert "{2}" in issues[0].message


def test_variables_stay_for_policies_and_environment_references_do_not(tmp_path: Path) -> None:
    from apigate.config.loader import load_config

    text = """\
policies:
  transform:
    request:
      headers:
        set:
          X-A: "${tenant_id}"
          X-B: "$${tenant_id} ${env.TRANSFORM_TEST_REGION}-${TRANSFORM_TEST_REGION}"
routes:
  - path: /a
    target: http://127.0.0.1:9
    name: "${TRANSFORM_NAME}"
    policies:
      headers: {request: {set: {X-C: "${consumer.id} ${jwt.sub}"}}}
"""
    config = load_config(text=text, environ={"TRANSFORM_TEST_REGION": "eu", "TRANSFORM_NAME": "r"})
    assert config.policies["transform"]["request"]["headers"]["set"] == {
        "X-A": "${tenant_id}",
        "X-B": "$${tenant_id} eu-eu",
    }
    assert config.routes[0].policies["headers"]["request"]["set"] == {"X-C": "${consumer.id} ${jwt.sub}"}
    assert config.routes[0].name == "r"


def test_request_variables_outside_policies_are_what_they_were() -> None:
    from apigate.config.loader import ConfigError, load_config

    with pytest.raises(ConfigError) as caught:
        load_config(text="routes:\n  - {path: /a, target: 'http://x:1/${consumer.id}'}\n", environ={})
    assert "malformed ${...}" in str(caught.value)


# -- hostile input -------------------------------------------------------------------------------------------

_HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
_QUERY_TEXT = st.text(alphabet=string.ascii_letters + string.digits + "%&=+;/?:@-._~!$'()*,", max_size=80)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=25,
)


@settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(header=_HEADER_TEXT, query=_QUERY_TEXT, document=_JSON, raw=st.binary(max_size=200))
def test_no_header_query_or_body_makes_the_gateway_fail(
    gateway, header: str, query: str, document: Any, raw: bytes
) -> None:
    body = json.dumps(document).encode() if document is not None else raw
    target = "/all/x" + ("?" + query if query else "")
    headers = {
        "X-Old": header.strip() or "v",
        "Content-Type": "application/json",
        "X-Route": header.strip() or "v",
    }
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("POST", target, headers, body)
        assert response.status < 500, (response.status, response.body)
        response = conn.exchange("POST", "/body/echo", {"Content-Type": "application/json"}, raw)
        assert response.status < 500, (response.status, response.body)


def test_a_path_from_hostile_groups_is_valid_or_refused(gateway, shared_upstream) -> None:
    for name in ["..", ".", "%2E%2E", "%2e.", "a%2F..", "~x", "%41", "a;b", "@"]:
        response = call(gateway.port, f"/files/{name}.json")
        assert response.status in (200, 400), (name, response.status)
        if response.status == 200:
            path = seen(shared_upstream, response).path
            assert re.fullmatch(r"/store/[^/]+/data", path) and ".." not in path.split("/"), path


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/users/42/profile", "/users/42/profile"),
        ("/a//b/", "/a/b/"),
        ("/a/%7Euser", "/a/~user"),
        ("/a/%2f", None),  # an encoded slash
        ("/store/../data", None),
        ("/store/./data", None),
        ("/store/%2E%2e/data", None),
        ("/store/..", None),
        ("/a b", None),
        ("/a\r\nX: 1", None),
        ("/a%zz", None),
        ("relative", None),
        ("", None),
    ],
)
def test_a_rewritten_path_is_an_origin_form_path_or_nothing(path: str, expected: str | None) -> None:
    from apigate.policies.transform.hotpath import origin_form

    assert origin_form(path) == expected
