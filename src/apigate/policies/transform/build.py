"""Config → what the hooks read per request (runs once, when a route is compiled).

Templates become literal bytes and getters: ``${route}`` and ``${env.NAME}`` are known now and
join the literal text; the others read the exchange.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from apigate.config.templates import ENV_PREFIX, JWT_PREFIX, parse_template, path_template
from apigate.policies.claims import claim_text
from apigate.policies.transform import hotpath
from apigate.policies.transform.config import BodyEdits, HeaderEdits, PathRewrite, QueryEdits
from apigate.policies.transform.hotpath import (
    Claim,
    CompiledEdits,
    CompiledPath,
    CompiledQuery,
    Getter,
    Template,
)
from apigate.policies.transform.jsonmap import JsonMapping, parse_path

_GETTERS: dict[str, Getter] = {
    "consumer.id": hotpath.consumer_id,
    "consumer.tenant": hotpath.tenant,
    "tenant_id": hotpath.tenant,
    "request_id": hotpath.request_id,
    "client_ip": hotpath.client_ip,
}
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _nothing(exchange: Any) -> bytes | None:
    return None


def value_template(text: str, route: str) -> Template:
    """``text`` (a validated template) for the route named ``route``."""
    literals: list[bytes] = []
    getters: list[Getter] = []
    literal = ""
    for is_variable, piece in parse_template(text):
        if not is_variable:
            literal += piece
            continue
        known = _known_now(piece, route)
        if known is not None and not _CONTROL.search(known):
            literal += known
            continue
        literals.append(literal.encode())
        literal = ""
        if known is not None:
            getters.append(_nothing)  # a route name no field value may carry: left out
        elif piece.startswith(JWT_PREFIX):
            getters.append(Claim(piece[len(JWT_PREFIX) :], claim_text).get)
        else:
            getters.append(_GETTERS[piece])
    literals.append(literal.encode())
    return Template(literals, getters)


def _known_now(variable: str, route: str) -> str | None:
    if variable == "route":
        return route
    if variable.startswith(ENV_PREFIX):
        return os.environ.get(variable[len(ENV_PREFIX) :], "")  # checked when the config loaded
    return None


def header_edits(edits: HeaderEdits, route: str) -> CompiledEdits:
    return CompiledEdits(
        [name.lower().encode() for name in edits.remove],
        {old.lower().encode(): new.lower().encode() for old, new in edits.rename.items()},
        [(name.lower().encode(), value_template(value, route)) for name, value in edits.set.items()],
        [(name.lower().encode(), value_template(value, route)) for name, value in edits.add.items()],
    )


def query_edits(edits: QueryEdits, route: str) -> CompiledQuery:
    values = [*edits.set.items(), *edits.add.items()]
    return CompiledQuery(
        frozenset(name.encode() for name in [*edits.remove, *edits.set]),
        {old.encode(): _encoded(new) for old, new in edits.rename.items()},
        [(_encoded(name), value_template(value, route)) for name, value in values],
    )


def _encoded(name: str) -> bytes:
    return quote(name, safe="").encode("ascii")


def path_rewrite(rewrite: PathRewrite, refuse: Callable[[Any], Any]) -> CompiledPath:
    pattern = re.compile(rewrite.pattern)
    pieces: list[tuple[int, str]] = []
    for is_group, text in path_template(rewrite.replace):
        if not is_group:
            pieces.append((-1, text))
        else:
            pieces.append((int(text) if text.isdigit() else pattern.groupindex[text], ""))
    return CompiledPath(pattern, pieces, refuse)


def body_mapping(body: BodyEdits) -> JsonMapping:
    return JsonMapping(
        remove=[parse_path(path) for path in body.remove],
        rename=[(parse_path(path), name) for path, name in body.rename.items()],
        move=[(parse_path(source), parse_path(to)) for source, to in body.move.items()],
        copy=[(parse_path(source), parse_path(to)) for source, to in body.copies.items()],
        set=[(parse_path(path), value) for path, value in body.set.items()],
    )
