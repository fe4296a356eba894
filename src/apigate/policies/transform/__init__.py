"""The `transform` policy: request and response edits, as Kong's request- and response-transformer
and APISIX's proxy-rewrite do.

- ``request.headers`` and ``response.headers``: remove, rename, set, add, with variables in
  values (``${consumer.id}``, ``${tenant_id}``, ``${jwt.sub}``..., config/templates.py);
- ``request.query``: the same for query parameters;
- ``request.path``: a regular expression with groups rewrites the path sent upstream;
- ``request.body``: a JSON body mapping (``jsonmap.py``) for bodies of a JSON content type up to
  ``max_size``. Larger bodies are not buffered (the engine streams them on: ``oversized_body``),
  and those and the bodies that are not JSON, are compressed or do not parse go on unchanged;
  ``body_counts`` counts each outcome (per route, in this process).

The `headers` policy is this policy's header part, under its own name. The compiled per-request
work is in ``hotpath.py``; what is built from the config, in ``build.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from apigate.engine.replies import Reply, json_reply
from apigate.policies.base import Phase, Policy
from apigate.policies.registry import register
from apigate.policies.transform.bodymap import RequestBody
from apigate.policies.transform.build import body_mapping, header_edits, path_rewrite, query_edits
from apigate.policies.transform.config import TransformConfig
from apigate.policies.transform.hotpath import CompiledRequest

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange

# What ``body_counts`` counts, one per body that reached the policy (or streamed past it).
BODY_OUTCOMES: Final = ("mapped", "unchanged", "not_json", "encoded", "too_large", "malformed", "too_deep")


@register
class TransformPolicy(Policy[TransformConfig]):
    name = "transform"
    order = 5000  # after authentication and limits: the consumer and the token's claims are known
    phases = frozenset({"request", "body", "response", "log"})
    oversized_body = "stream"

    def prepare(self) -> None:
        request = self.config.request
        headers = header_edits(request.headers, self.route)
        query = None if request.query.empty else query_edits(request.query, self.route)
        path = None if request.path is None else path_rewrite(request.path, self._refuse_path)
        self.request_edits = CompiledRequest(path, query, None if headers.empty else headers)
        self.response_edits = header_edits(self.config.response.headers, self.route)
        body = request.body
        self.mapping = None if body is None else body_mapping(body)
        self.body_limit = 0 if body is None else body.max_size
        self.body_counts: dict[str, int] = dict.fromkeys(BODY_OUTCOMES, 0)
        # The body hook, compiled (bodymap.py): it counts each outcome in body_counts.
        self.body_hook = (
            None
            if self.mapping is None
            else RequestBody(self.mapping.operations, self.body_limit, self.body_counts)
        )
        phases: set[Phase] = set()
        if path is not None or query is not None or not headers.empty:
            phases.add("request")
        if self.mapping is not None and not self.mapping.empty:
            phases |= {"body", "log"}  # the log hook counts the bodies too large to map
        if not self.response_edits.empty:
            phases.add("response")
        self.phases = frozenset(phases)
        # Compiled hooks, called by the engine with no Python frame in between; header edits
        # alone need no request wrapper.
        only_headers = path is None and query is None
        hooks: dict[Phase, Callable[..., Any]] = {
            "request": headers.edit_request if only_headers else self.request_edits.edit,
            "response": self.response_edits.edit_response,
        }
        if self.body_hook is not None:
            hooks["body"] = self.body_hook.on_body
        self.engine_hooks = hooks

    def on_request(self, exchange: Exchange) -> Any:
        return self.request_edits.edit(exchange)

    def on_body(self, exchange: Exchange, body: bytes) -> None:
        if self.body_hook is not None:
            self.body_hook.on_body(exchange, body)

    def on_response(self, exchange: Exchange) -> None:
        self.response_edits.edit_response(exchange)

    def on_log(self, exchange: Exchange) -> None:
        # A body over the limit went upstream without the body hooks (so exchange.body is unset).
        if exchange.body is None and exchange.bytes_in > self.body_limit and exchange.target is not None:
            self.body_counts["too_large"] += 1

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
