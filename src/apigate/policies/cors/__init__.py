"""The `cors` policy: the CORS protocol of the Fetch standard, answered by the gateway.

A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) is answered
here with ``204`` and never reaches the upstream. It is granted (the allow fields) only when
the origin is allowed, the requested method is in ``methods`` (or CORS-safelisted) and every
requested header is in ``headers`` (unset: any header the preflight names, echoed back); any
other preflight gets the same ``204`` without a single ``Access-Control-*`` field, which the
browser reads as a refusal, and which says nothing of what is allowed. Every other response of
the route gets the gateway's CORS fields instead of the upstream's: the allow fields for an
allowed origin, none for another, and ``Origin`` in ``Vary`` wherever the answer depends on it
(also for requests without ``Origin``, as the Fetch standard advises for caches).

The policy runs before authentication: a preflight carries no credentials.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING, Annotated, Final

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from apigate.config.headernames import HEADER_NAME
from apigate.config.units import Duration
from apigate.engine.replies import Reply, error_body
from apigate.engine.wire import METHODS
from apigate.policies.base import Policy, PolicyConfig
from apigate.policies.cors.hotpath import ALLOW_ORIGIN, CorsCheck, OriginMatcher
from apigate.policies.registry import register

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange

DEFAULT_METHODS: Final = ("GET", "HEAD", "PUT", "PATCH", "POST", "DELETE")
# Methods a browser sends without asking first (Fetch: CORS-safelisted methods).
_SAFELISTED_METHODS: Final = frozenset({b"GET", b"HEAD", b"POST"})
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*$")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_NAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_DEFAULT_PORTS: Final = {"http": "80", "https": "443"}
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_ORIGIN_FORMS = "https://app.example.com, https://*.example.com, ~<regular expression> or *"


def normal_origin(text: str) -> str:
    """``text`` as browsers serialize an origin (lowercase scheme and host, no default port), with
    ``*.`` kept before a wildcard host; a ValueError says what is wrong with it."""
    if text == "null":
        raise ValueError(
            "the origin null cannot be allowed: sandboxed documents and local files of any site send it"
        )
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or not _SCHEME.match(scheme) or not rest:
        raise ValueError(f"{text!r} is not an origin; write one as {_ORIGIN_FORMS}")
    if any(c in rest for c in "/?#@\\"):
        raise ValueError(f"{text!r}: an origin is scheme://host[:port], without a path, query or user name")
    if rest.startswith("["):
        end = rest.find("]")
        try:
            address = ipaddress.IPv6Address(rest[1:end]) if end > 0 else None
        except ValueError:
            address = None
        if address is None:
            raise ValueError(f"{text!r} does not hold a valid IPv6 address in brackets")
        host, port = f"[{address.compressed}]", rest[end + 1 :]
    else:
        host, colon, number = rest.partition(":")
        port = colon + number
        name = host.lower()
        wildcard = name.startswith("*.")
        if wildcard:
            name = name[2:]
        if not name.isascii():
            raise ValueError(f"{text!r}: write the host in its ASCII form (xn--...), as browsers send it")
        if not _HOST_NAME.match(name):
            raise ValueError(
                f"{text!r} does not name a valid host ('*' may only stand for the first labels, "
                "as in https://*.example.com)"
            )
        if wildcard and "." not in name:
            raise ValueError(f"{text!r} would allow every site under a top-level domain")
        host = f"*.{name}" if wildcard else name
    if port:
        digits = port[1:]
        if not (digits.isdigit() and digits.isascii() and 0 < int(digits) < 65536):
            raise ValueError(f"{text!r} has an invalid port")
        port = "" if _DEFAULT_PORTS.get(scheme) == str(int(digits)) else f":{int(digits)}"
    return f"{scheme}://{host}{port}"


def _check_origin(entry: str) -> str:
    if entry == "*":
        return entry
    if entry.startswith("~"):
        if not entry[1:]:
            raise ValueError("~ must be followed by a regular expression")
        try:
            re.compile(entry[1:])
        except re.error as exc:
            raise ValueError(f"the regular expression after ~ does not compile: {exc}") from None
        return entry
    return normal_origin(entry)


def _check_header_names(names: list[str]) -> list[str]:
    for name in names:
        if name == "*":
            raise ValueError("'*' is not a header name here: leave headers unset to accept any header")
        if not HEADER_NAME.match(name):
            raise ValueError(f"{name!r} is not a valid header name")
    return names


OriginEntry = Annotated[str, AfterValidator(_check_origin)]


class CorsConfig(PolicyConfig):
    origins: list[OriginEntry] = Field(
        min_length=1,
        description='exact (https://app.example.com), wildcard (https://*.example.com), "~regex" '
        '(matched against the whole origin) or "*"',
    )
    credentials: bool = Field(default=False, description="Access-Control-Allow-Credentials: true")
    methods: list[str] = Field(default_factory=lambda: list(DEFAULT_METHODS))
    headers: list[str] | None = Field(
        default=None, description="request headers a preflight may ask for; unset: any it asks for"
    )
    exposed_headers: list[str] = Field(default_factory=list, description="Access-Control-Expose-Headers")
    max_age: Duration | None = Field(default=None, description="how long browsers may keep a preflight")
    preflight_continue: bool = Field(
        default=False, description="pass preflights to the upstream, which answers them itself"
    )

    @field_validator("origins", mode="before")
    @classmethod
    def _one_or_a_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("origins")
    @classmethod
    def _star_alone(cls, origins: list[str]) -> list[str]:
        if "*" in origins and len(origins) > 1:
            raise ValueError('"*" already allows every origin: list it alone')
        return origins

    @field_validator("credentials")
    @classmethod
    def _no_credentials_for_any_origin(cls, credentials: bool, info: ValidationInfo) -> bool:
        if credentials and info.data.get("origins") == ["*"]:
            raise ValueError(
                'cannot be true with origins "*": browsers refuse credentials with '
                "Access-Control-Allow-Origin: * (list the origins instead)"
            )
        return credentials

    @field_validator("methods")
    @classmethod
    def _check_methods(cls, methods: list[str]) -> list[str]:
        upper = [m.upper() for m in methods]
        unknown = [m for m in upper if m.encode() not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}")
        return upper

    _headers = field_validator("headers")(
        classmethod(lambda cls, names: None if names is None else _check_header_names(names))
    )

    @field_validator("exposed_headers")
    @classmethod
    def _check_exposed(cls, names: list[str], info: ValidationInfo) -> list[str]:
        if names == ["*"]:
            if info.data.get("credentials"):
                raise ValueError('"*" exposes every header only without credentials: list the headers')
            return names
        return _check_header_names(names)


def compile_origins(entries: list[str]) -> tuple[frozenset[bytes], list[re.Pattern[str]]]:
    """The exact origins as bytes, and a pattern per wildcard or ``~`` entry (matched whole)."""
    exact: set[bytes] = set()
    patterns: list[re.Pattern[str]] = []
    for entry in entries:
        if entry.startswith("~"):
            patterns.append(re.compile(entry[1:]))
        elif "://*." in entry:
            scheme, _, host = entry.partition("://*.")
            patterns.append(re.compile(re.escape(f"{scheme}://") + rf"(?:{_LABEL}\.)+" + re.escape(host)))
        elif entry != "*":
            exact.add(entry.encode())
    return frozenset(exact), patterns


@register
class CorsPolicy(Policy[CorsConfig]):
    name = "cors"
    order = 500  # before authentication (~1000): a preflight carries no credentials
    phases = frozenset({"request", "response"})
    answers_preflights = True

    def prepare(self) -> None:
        config = self.config
        self.any_origin = config.origins == ["*"]
        self.matcher = OriginMatcher(*compile_origins(config.origins))
        simple: list[tuple[bytes, bytes]] = []
        if config.credentials:
            simple.append((b"access-control-allow-credentials", b"true"))
        if config.exposed_headers:
            simple.append((b"access-control-expose-headers", ", ".join(config.exposed_headers).encode()))
        self.methods = frozenset(m.encode() for m in config.methods) | _SAFELISTED_METHODS
        self.allowed_headers = (
            None if config.headers is None else frozenset(h.lower().encode() for h in config.headers)
        )
        granted = [(b"access-control-allow-methods", ", ".join(config.methods).encode())]
        if config.headers:
            granted.append((b"access-control-allow-headers", ", ".join(config.headers).encode()))
        if config.credentials:
            granted.append((b"access-control-allow-credentials", b"true"))
        if config.max_age is not None:
            granted.append((b"access-control-max-age", b"%d" % int(config.max_age)))
        self.granted = granted
        # A preflight's answer depends on what it asks for, and (unless "*") on its origin.
        asked = b"Access-Control-Request-Method, Access-Control-Request-Headers"
        self.preflight_vary = asked if self.any_origin else b"Origin, " + asked
        self.check = CorsCheck(self.matcher, self.any_origin, simple, self.preflight)
        if config.preflight_continue:
            self.phases = frozenset({"response"})
            self.engine_hooks = {"response": self.check.on_response}
        else:
            self.engine_hooks = {"request": self.check.on_request, "response": self.check.on_response}

    def only_preflights(self, allowed: bytes) -> None:
        def refuse(exchange: Exchange) -> Reply:
            body = error_body("method not allowed", exchange.request_id)
            return Reply(405, body, [(b"allow", allowed)], reason="method_not_allowed")

        self.check.plain_options = refuse

    def preflight(self, exchange: Exchange, origin: bytes) -> Reply:
        """The answer to a preflight from ``origin``: 204, with the allow fields when granted."""
        headers = [(b"vary", self.preflight_vary)]
        granted = self._grant(exchange, origin)
        if granted is not None:
            headers += granted
        return Reply(204, headers=headers)

    def _grant(self, exchange: Exchange, origin: bytes) -> list[tuple[bytes, bytes]] | None:
        """The allow fields of a preflight that may go ahead; None for one that may not."""
        if not (self.any_origin or self.matcher.allows(origin)):
            return None
        if exchange.header(b"access-control-request-method") not in self.methods:
            return None
        asked = b",".join(v for n, v in exchange.headers if n == b"access-control-request-headers")
        names = [name.strip().lower() for name in asked.split(b",") if name.strip()]
        if not all(_TOKEN.match(name) for name in names):
            return None
        allowed = self.allowed_headers
        if allowed is not None and not allowed.issuperset(names):
            return None
        fields = [(ALLOW_ORIGIN, b"*" if self.any_origin else origin), *self.granted]
        if allowed is None and names:
            fields.append((b"access-control-allow-headers", b", ".join(names)))
        return fields

    # What the compiled hooks do, for callers other than the engine.
    def on_request(self, exchange: Exchange) -> Reply | None:
        answer: Reply | None = self.check.on_request(exchange)
        return answer

    def on_response(self, exchange: Exchange) -> None:
        self.check.on_response(exchange)
