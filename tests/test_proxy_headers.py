"""Headers across the proxy: hop-by-hop removal, forwarding headers, request ids, trusted proxies,
the Host sent upstream, routing rewrites seen by the upstream, and the `headers` policy."""

from __future__ import annotations

import re

import pytest

from tests.support.proxy_http import RawConnection, find_request, running_gateway

HEX32 = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def gateway(shared_upstream, tmp_path_factory):
    url = shared_upstream.url
    config = {
        "routes": [
            {"path": "/api/*", "target": url, "strip_prefix": True},
            {"path": "/users/{id}", "target": url, "rewrite": "/v2/u/{id}"},
            {"path": "/files/*", "target": url, "rewrite": "/store/{path}"},
            {"path": "/t/{tenant}/*", "target": url, "rewrite": "/tenants/{tenant}/{path}"},
            {"path": "/preserve/*", "target": url, "strip_prefix": True, "preserve_host": True},
            {"path": "/*", "target": url},
        ]
    }
    with running_gateway(tmp_path_factory.mktemp("gw"), config) as gw:
        yield gw


@pytest.fixture(scope="module")
def trusted_gateway(shared_upstream, tmp_path_factory):
    config = {"trusted_proxies": ["127.0.0.0/8"], "routes": [{"path": "/*", "target": shared_upstream.url}]}
    with running_gateway(tmp_path_factory.mktemp("trusted"), config) as gw:
        yield gw


@pytest.fixture(scope="module")
def policy_gateway(shared_upstream, tmp_path_factory):
    url = shared_upstream.url
    config = {
        "policies": {
            "headers": {
                "request": {"set": {"X-Global": "g"}},
                "response": {"set": {"X-Global-Response": "gr"}},
            }
        },
        "routes": [
            {
                "path": "/edit/*",
                "target": url,
                "strip_prefix": True,
                "policies": {
                    "headers": {
                        "request": {
                            "remove": ["X-Remove-Me"],
                            "rename": {"X-Old-Name": "X-New-Name"},
                            "set": {"X-Set": "set-value"},
                            "add": {"X-Add": "added"},
                        },
                        "response": {
                            "remove": ["X-Drop-Me-Not-There"],
                            "rename": {"X-Kept": "X-Renamed"},
                            "set": {"Content-Type": "text/x-set"},
                            "add": {"X-Resp-Add": "ra"},
                        },
                    }
                },
            },
            {
                "path": "/other/*",
                "target": url,
                "strip_prefix": True,
                "policies": {"headers": {"response": {"remove": ["X-Kept"]}}},
            },
            {"path": "/plain/*", "target": url, "strip_prefix": True},
        ],
    }
    with running_gateway(tmp_path_factory.mktemp("policy"), config) as gw:
        yield gw


def echo(port: int, path: str = "/echo", headers: dict[str, str] | None = None, method: str = "GET"):
    """(client response, upstream's JSON view of the request)."""
    with RawConnection(port) as conn:
        response = conn.exchange(method, path, headers)
    assert response.status == 200, response
    return response, response.json()


# -- hop-by-hop --------------------------------------------------------------------------------------------


def test_hop_by_hop_request_headers_do_not_reach_upstream(gateway, shared_upstream):
    with RawConnection(gateway.port) as conn:
        raw = (
            b"GET /echo HTTP/1.1\r\nHost: gateway.test\r\n"
            b"Connection: x-foo\r\nConnection: X-Bar\r\n"
            b"X-Foo: 1\r\nX-Bar: 2\r\n"
            b"Keep-Alive: timeout=5, max=100\r\nTE: trailers\r\nTrailer: X-Checksum\r\n"
            b"Proxy-Authorization: Basic dXNlcjpwYXNz\r\nProxy-Connection: keep-alive\r\n"
            b"Authorization: Bearer end-to-end\r\nX-Custom: stays\r\nCookie: a=b\r\n"
            b"X-Request-ID: hop-request-1\r\n\r\n"
        )
        conn.send(raw)
        response = conn.read_response()
    assert response.status == 200
    seen = find_request(shared_upstream, "hop-request-1")
    names = {name for name, _ in seen.headers}
    for hop in ("x-foo", "x-bar", "keep-alive", "te", "trailer", "proxy-authorization", "proxy-connection"):
        assert hop not in names, f"{hop} was forwarded upstream"
    # The Connection the upstream gets is the proxy's own, never the client's tokens.
    assert all("x-foo" not in value.lower() for name, value in seen.headers if name == "connection")
    assert seen.header("authorization") == "Bearer end-to-end"
    assert seen.header("x-custom") == "stays"
    assert seen.header("cookie") == "a=b"


def test_hop_by_hop_response_headers_do_not_reach_client(gateway):
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("GET", "/hop")
        assert response.status == 200
        assert response.header("x-kept") == "yes"
        names = response.names()
        assert "x-secret-hop" not in names  # listed in the upstream's Connection header
        assert "keep-alive" not in names
        assert "proxy-authenticate" not in names
        assert all("x-secret-hop" not in v.lower() for v in response.header_all("connection"))
        assert response.body == b"{}"
        assert conn.is_open()  # the upstream's Connection header does not close the client's


# -- forwarding headers and request ids --------------------------------------------------------------------


def test_forwarding_headers_are_added(gateway):
    _, seen = echo(gateway.port, headers={"Host": "shop.example:8080"})
    headers = seen["headers"]
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "shop.example:8080"
    assert headers["via"] == "1.1 apigate"


def test_existing_x_forwarded_for_is_appended_to(gateway, shared_upstream):
    _, seen = echo(gateway.port, headers={"X-Forwarded-For": "10.1.1.1"})
    assert seen["headers"]["x-forwarded-for"] == "10.1.1.1, 127.0.0.1"

    with RawConnection(gateway.port) as conn:
        conn.send(
            b"GET /echo HTTP/1.1\r\nHost: gw\r\nX-Request-ID: xff-two-lines\r\n"
            b"X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2, 10.0.0.3\r\n\r\n"
        )
        assert conn.read_response().status == 200
    recorded = find_request(shared_upstream, "xff-two-lines")
    values = [v for k, v in recorded.headers if k == "x-forwarded-for"]
    assert values == ["10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1"]


def test_via_from_the_client_is_appended_to(gateway, shared_upstream):
    echo(gateway.port, headers={"Via": "1.0 fred", "X-Request-ID": "via-1"})
    values = [v for k, v in find_request(shared_upstream, "via-1").headers if k == "via"]
    assert ", ".join(values) == "1.0 fred, 1.1 apigate"


def test_request_id_is_generated_returned_and_sent_upstream(gateway):
    first, seen_first = echo(gateway.port)
    second, seen_second = echo(gateway.port)
    for response, seen in ((first, seen_first), (second, seen_second)):
        request_id = response.header("x-request-id")
        assert request_id and HEX32.match(request_id), request_id
        assert seen["headers"]["x-request-id"] == request_id
        assert len(response.header_all("x-request-id")) == 1
    assert first.header("x-request-id") != second.header("x-request-id")


def test_client_request_id_is_propagated_both_ways(gateway):
    response, seen = echo(gateway.port, headers={"X-Request-ID": "client-id-123"})
    assert response.header("x-request-id") == "client-id-123"
    assert seen["headers"]["x-request-id"] == "client-id-123"
    assert len(response.header_all("x-request-id")) == 1


@pytest.mark.parametrize(
    "bad", ["has space", "x" * 201, 'a"b', "a\\b"], ids=["space", "too-long", "quote", "backslash"]
)
def test_unsafe_client_request_id_is_replaced(gateway, bad):
    response, seen = echo(gateway.port, headers={"X-Request-ID": bad})
    request_id = response.header("x-request-id")
    assert HEX32.match(request_id), request_id
    assert seen["headers"]["x-request-id"] == request_id


def test_request_id_on_gateway_errors(gateway):
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("GET", "/close", {"X-Request-ID": "err-id-1"})  # upstream hangs up
    assert response.status == 502
    assert response.header("x-request-id") == "err-id-1"
    assert response.json()["request_id"] == "err-id-1"


# -- trusted proxies --------------------------------------------------------------------------------------

FORWARDED = {
    "Host": "internal.example",
    "X-Forwarded-For": "203.0.113.7",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "public.example",
}


def test_trusted_peer_keeps_forwarded_proto_and_host(trusted_gateway):
    _, seen = echo(trusted_gateway.port, headers=FORWARDED)
    headers = seen["headers"]
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-host"] == "public.example"
    assert headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"


def test_trusted_peer_without_forwarded_headers_gets_its_own(trusted_gateway):
    _, seen = echo(trusted_gateway.port, headers={"Host": "internal.example"})
    headers = seen["headers"]
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "internal.example"
    assert headers["x-forwarded-for"] == "127.0.0.1"


def test_untrusted_peer_forwarded_proto_and_host_are_replaced(gateway):
    _, seen = echo(gateway.port, headers=FORWARDED)
    headers = seen["headers"]
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "internal.example"
    # X-Forwarded-For is still a chain: the untrusted peer's claim stays, its own address follows.
    assert headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"


# -- Host sent upstream --------------------------------------------------------------------------------


def test_upstream_gets_the_targets_host_by_default(gateway, shared_upstream):
    _, seen = echo(gateway.port, headers={"Host": "api.example.com"})
    assert seen["headers"]["host"] == f"127.0.0.1:{shared_upstream.port}"
    assert seen["headers"]["x-forwarded-host"] == "api.example.com"


def test_preserve_host_sends_the_clients_host(gateway):
    _, seen = echo(gateway.port, "/preserve/echo", headers={"Host": "api.example.com:8443"})
    assert seen["headers"]["host"] == "api.example.com:8443"
    assert seen["path"] == "/echo"


# -- routing as the upstream sees it ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_target, path, query",
    [
        ("/api/x?a=1&b=2", "/x", "a=1&b=2"),
        ("/api/x/y/z", "/x/y/z", ""),
        ("/api", "/", ""),
        ("/api/", "/", ""),
        ("/users/42?q=1", "/v2/u/42", "q=1"),
        ("/files/a/b.txt?v=%20x", "/store/a/b.txt", "v=%20x"),
        ("/t/acme/orders/7", "/tenants/acme/orders/7", ""),
        ("/plain/path?x=1&x=2&empty=", "/plain/path", "x=1&x=2&empty="),
    ],
)
def test_route_rewrites_seen_upstream(gateway, request_target, path, query):
    _, seen = echo(gateway.port, request_target)
    assert (seen["path"], seen["query"]) == (path, query)


def test_rewrite_applies_to_bodies_and_methods_too(gateway):
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("PATCH", "/users/9?x=y", body=b"patch-body")
    seen = response.json()
    assert (seen["method"], seen["path"], seen["query"], seen["body_length"]) == (
        "PATCH",
        "/v2/u/9",
        "x=y",
        10,
    )


# -- the headers policy -----------------------------------------------------------------------------------


def test_headers_policy_edits_the_request(policy_gateway, shared_upstream):
    echo(
        policy_gateway.port,
        "/edit/echo",
        headers={
            "X-Request-ID": "policy-request-1",
            "X-Remove-Me": "1",
            "X-Old-Name": "renamed-value",
            "X-Set": "client-value",
            "X-Add": "client-add",
            "X-Untouched": "u",
        },
    )
    seen = find_request(shared_upstream, "policy-request-1")
    names = [name for name, _ in seen.headers]
    assert "x-remove-me" not in names
    assert "x-old-name" not in names
    assert seen.header("x-new-name") == "renamed-value"
    assert [v for k, v in seen.headers if k == "x-set"] == ["set-value"]
    assert [v for k, v in seen.headers if k == "x-add"] == ["client-add", "added"]
    assert seen.header("x-untouched") == "u"
    # The route's headers config replaces the global one: no X-Global on this route.
    assert "x-global" not in names


def test_headers_policy_edits_the_response(policy_gateway):
    with RawConnection(policy_gateway.port) as conn:
        response = conn.exchange("GET", "/edit/hop")
        assert response.status == 200
        assert response.header("x-kept") is None
        assert response.header("x-renamed") == "yes"
        assert response.header_all("content-type") == ["text/x-set"]
        assert response.header("x-resp-add") == "ra"
        assert response.header("x-global-response") is None  # route config overrides global
        assert response.body == b"{}"
        assert conn.exchange("GET", "/edit/echo").status == 200  # framing untouched


def test_global_headers_policy_applies_to_routes_without_their_own(policy_gateway, shared_upstream):
    response, seen = echo(policy_gateway.port, "/plain/echo", headers={"X-Global": "client"})
    assert seen["headers"]["x-global"] == "g"
    assert response.header("x-global-response") == "gr"
    with RawConnection(policy_gateway.port) as conn:
        hop = conn.exchange("GET", "/plain/hop", {"X-Request-ID": "global-2"})
    assert hop.header("x-kept") == "yes"
    assert hop.header("x-global-response") == "gr"
    assert [v for k, v in find_request(shared_upstream, "global-2").headers if k == "x-global"] == ["g"]


def test_route_headers_policy_replaces_the_global_one(policy_gateway, shared_upstream):
    with RawConnection(policy_gateway.port) as conn:
        response = conn.exchange("GET", "/other/hop", {"X-Request-ID": "override-1"})
    assert response.status == 200
    assert response.header("x-kept") is None  # the route's own response edit
    assert response.header("x-global-response") is None  # the global edits are not merged in
    assert find_request(shared_upstream, "override-1").header("x-global") is None
