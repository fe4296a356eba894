"""The `transform` policy: request and response edits, as Kong's request- and response-transformer
and APISIX's proxy-rewrite do.

- ``request.headers`` and ``response.headers``: remove, rename, set, add, with variables in
  values (``${consumer.id}``, ``${tenant_id}``, ``${jwt.sub}``..., config/templates.py);
- ``request.query``: the same for query parameters;
- ``request.path``: a regular expression with groups rewrites the path sent upstream;
- ``request.body`` and ``response.body``: one JSON body mapping (``jsonmap.py``, run by
  ``bodies.py``) for bodies of a JSON content type up to ``max_size``: request bodies in the body
  phase (larger ones are not buffered: the engine streams them on, ``oversized_body``),
  response bodies in the response_body phase (a filter that holds the body, and the head with
  it, up to the limit). Bodies that are larger, not JSON, compressed or do not parse go on
  unchanged, and each outcome is counted (``counts.py``, exported as a metric);
- ``xml``: JSON and XML as the client asks (``xmlmap.py``): JSON responses written as XML for a
  client whose Accept prefers XML, XML request bodies sent upstream as JSON.

The `headers` policy is this policy's header part, under its own name. The compiled per-request
work is in ``hotpath.py``; what is built from the config, in ``build.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from apigate.engine.replies import Reply, json_reply
from apigate.policies.base import Phase, Policy
from apigate.policies.registry import register
from apigate.policies.transform import counts
from apigate.policies.transform.bodies import (
    BodyMapper,
    ResponseFilter,
    content_fields,
    is_json,
    with_vary_accept,
)
from apigate.policies.transform.build import body_mapping, header_edits, path_rewrite, query_edits
from apigate.policies.transform.config import TransformConfig
from apigate.policies.transform.hotpath import CompiledRequest
from apigate.policies.transform.jsonmap import NotMapped
from apigate.policies.transform.xmlmap import XmlRefused, is_xml, prefers_xml

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange

# What ``body_counts`` counts, one per body that reached the policy (or streamed past it).
BODY_OUTCOMES: Final = counts.OUTCOMES
# Distinct Accept values remembered with the XML type they ask for; past this many, forgotten.
ACCEPTS_KEPT: Final = 1024
_JSON_TYPE: Final = (b"content-type", b"application/json")


@register
class TransformPolicy(Policy[TransformConfig]):
    name = "transform"
    order = 5000  # after authentication and limits: the consumer and the token's claims are known
    phases = frozenset({"request", "body", "response", "response_body", "log"})
    oversized_body = "stream"

    def prepare(self) -> None:
        config = self.config
        request = config.request
        headers = header_edits(request.headers, self.route)
        query = None if request.query.empty else query_edits(request.query, self.route)
        path = None if request.path is None else path_rewrite(request.path, self._refuse_path)
        self.request_edits = CompiledRequest(path, query, None if headers.empty else headers)
        self.response_edits = header_edits(config.response.headers, self.route)
        body = request.body
        self.mapper = BodyMapper(None if body is None else body_mapping(body))
        self.json_limit = 0 if body is None else body.max_size
        response_body = config.response.body
        self.response_mapper = BodyMapper(None if response_body is None else body_mapping(response_body))
        self.response_limit = (1 << 20) if response_body is None else response_body.max_size
        xml = config.xml
        self.xml_requests = xml is not None and xml.convert_requests
        self.xml_responses = xml is not None and xml.respond_as_requested
        self.xml_root = "root" if xml is None else xml.root
        self.xml_limit = 0 if xml is None else xml.max_size
        self.accepts: dict[bytes, bytes | None] = {}
        self.request_counts = counts.counts_for(self.route, "request")
        self.response_counts = counts.counts_for(self.route, "response")
        self.body_limit = max(self.json_limit, self.xml_limit if self.xml_requests else 0)
        edits_request = path is not None or query is not None or not headers.empty
        phases: set[Phase] = set()
        if edits_request or self.xml_requests:
            phases.add("request")
        if self.mapper.mapping is not None:
            phases |= {"body", "log"}  # the log hook counts the bodies too large to map
        if self.xml_requests:
            phases.add("body")
        if not self.response_edits.empty:
            phases.add("response")
        if self.response_mapper.mapping is not None or self.xml_responses:
            phases.add("response_body")
        self.phases = frozenset(phases)
        # Compiled hooks, called by the engine with no Python frame in between; header edits
        # alone need no request wrapper, and XML requests need the policy's own look first.
        only_headers = path is None and query is None
        hooks: dict[Phase, Any] = {"response": self.response_edits.edit_response}
        if not self.xml_requests:
            hooks["request"] = headers.edit_request if only_headers else self.request_edits.edit
        self.engine_hooks = hooks

    @property
    def body_counts(self) -> dict[str, int]:
        """What became of request bodies on this route in this process, by outcome."""
        return counts.as_dict(self.request_counts)

    @property
    def response_body_counts(self) -> dict[str, int]:
        """What became of response bodies on this route in this process, by outcome."""
        return counts.as_dict(self.response_counts)

    # -- requests ------------------------------------------------------------------------------------------
    def on_request(self, exchange: Exchange) -> Any:
        if self.xml_requests and is_xml(exchange.header(b"content-type")):
            length = exchange.content_length
            if length is not None and length > self.xml_limit:
                self.request_counts[counts.XML_REFUSED] += 1
                return self._refuse_xml(exchange, 413, self._too_large_message(), "xml_too_large")
            exchange.body_must_fit = True  # an XML body that streamed on unread would reach a JSON upstream
        return self.request_edits.edit(exchange)

    def on_body(self, exchange: Exchange, body: bytes) -> Reply | None:
        if not body:
            return None  # nothing sent: nothing to count
        content_type = exchange.header(b"content-type")
        if self.xml_requests and is_xml(content_type):
            return self._xml_request(exchange, body)
        if self.mapper.mapping is None:
            return None
        slot = self._json_request(exchange, body, content_type)
        self.request_counts[slot] += 1
        return None

    def _json_request(self, exchange: Exchange, body: bytes, content_type: bytes | None) -> int:
        if len(body) > self.json_limit:  # buffered for another policy with a larger limit
            return counts.TOO_LARGE
        if not is_json(content_type):
            return counts.NOT_JSON
        if _encoded(exchange.header(b"content-encoding")):
            return counts.ENCODED
        slot, mapped = self.mapper.json_body(body)
        if mapped is not None:
            exchange.body = mapped
        return slot

    def _xml_request(self, exchange: Exchange, body: bytes) -> Reply | None:
        if _encoded(exchange.header(b"content-encoding")):
            self.request_counts[counts.ENCODED] += 1
            return None
        if len(body) > self.xml_limit:
            self.request_counts[counts.XML_REFUSED] += 1
            return self._refuse_xml(exchange, 413, self._too_large_message(), "xml_too_large")
        try:
            converted = self.mapper.xml_body(body)
        except XmlRefused as refused:
            self.request_counts[counts.XML_REFUSED] += 1
            return self._refuse_xml(exchange, 400, refused.message, refused.reason)
        except NotMapped:  # not expected (XML nests too little to be too deep): refused all the same
            self.request_counts[counts.XML_REFUSED] += 1
            return self._refuse_xml(exchange, 400, "the XML cannot be written as JSON", "xml_malformed")
        exchange.body = converted
        exchange.headers = [pair for pair in exchange.headers if pair[0] != b"content-type"]
        exchange.headers.append(_JSON_TYPE)
        self.request_counts[counts.XML] += 1
        return None

    def _too_large_message(self) -> str:
        return f"XML request bodies are converted up to {self.xml_limit} bytes; this one is larger"

    def _refuse_xml(self, exchange: Exchange, status: int, message: str, reason: str) -> Reply:
        return json_reply(status, {"error": message, "reason": reason, "request_id": exchange.request_id})

    def on_log(self, exchange: Exchange) -> None:
        # A body over the limit went upstream without the body hooks (so exchange.body is unset).
        if exchange.body is None and exchange.bytes_in > self.body_limit and exchange.target is not None:
            self.request_counts[counts.TOO_LARGE] += 1

    # -- responses -----------------------------------------------------------------------------------------
    def on_response(self, exchange: Exchange) -> None:
        self.response_edits.edit_response(exchange)

    def on_response_body(self, exchange: Exchange) -> ResponseFilter | None:
        if exchange.response_status == 206:
            return None
        content_type, length, encoded, partial = content_fields(exchange.response_headers)
        if partial:
            return None
        mapper = self.response_mapper
        xml_type = self._xml_type(exchange) if self.xml_responses else None
        if not is_json(content_type):
            if mapper.mapping is not None or xml_type is not None:
                self.response_counts[counts.NOT_JSON] += 1
            return None
        if self.xml_responses:  # a JSON body's form depends on the client's Accept: caches must know
            exchange.response_headers = with_vary_accept(exchange.response_headers)
        if mapper.mapping is None and xml_type is None:
            return None
        if encoded:
            self.response_counts[counts.ENCODED] += 1
            return None
        limit = self._response_limit(mapper, xml_type)
        if length > limit:
            self.response_counts[counts.TOO_LARGE] += 1
            return None
        exchange.hold_head = True  # the head waits for the body: it changes with it
        return ResponseFilter(exchange, mapper, self.response_counts, limit, xml_type, self.xml_root)

    def _xml_type(self, exchange: Exchange) -> bytes | None:
        accept = exchange.header(b"accept")
        if accept is None:
            return None
        accepts = self.accepts
        if accept in accepts:
            return accepts[accept]
        found = prefers_xml(accept)
        if len(accepts) >= ACCEPTS_KEPT:
            accepts.clear()
        accepts[accept] = found
        return found

    def _response_limit(self, mapper: BodyMapper, xml_type: bytes | None) -> int:
        """The most a response body is held: each limit that applies to it holds (the smaller)."""
        if xml_type is None:
            return self.response_limit
        if mapper.mapping is None:
            return self.xml_limit
        return min(self.response_limit, self.xml_limit)

    def _refuse_path(self, exchange: Exchange) -> Reply:
        return json_reply(
            400,
            {
                "error": "the request path cannot be rewritten into a valid path",
                "reason": "invalid_rewritten_path",
                "request_id": exchange.request_id,
            },
        )

    def describe(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json", by_alias=True)  # `copy`, not its field name


def _encoded(encoding: bytes | None) -> bool:
    return encoding is not None and encoding.strip().lower() != b"identity"


__all__ = ["BODY_OUTCOMES", "TransformPolicy", "is_json"]
