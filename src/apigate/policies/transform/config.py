"""The `transform` policy's config (and the `headers` policy's, which is its header part).

Every value is checked when the config is loaded, and a problem names its field: header names,
templates (``${...}``, config/templates.py: an unknown variable or an unset ``${env.NAME}`` is
an error), the path pattern and its replacement, field paths of the body mapping and the values
it sets.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any

import orjson
from pydantic import AfterValidator, Field, field_validator, model_validator

from apigate.config.headernames import check_header_name
from apigate.config.templates import ENV_PREFIX, parse_template, path_template
from apigate.config.units import ByteSize
from apigate.policies.base import PolicyConfig
from apigate.policies.transform.jsonmap import parse_path

# What a path replacement may hold besides {group}: RFC 3986 path characters and %XX escapes.
_PATH_TEXT = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*")
_UNSAFE_IN_HEADER = ("\r", "\n", "\0")
# The root element's name: ASCII, so that every XML parser reads it.
_XML_ROOT = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


def template_value(text: str) -> str:
    """What a template resolves to when it is loaded: the literal text with ``${env.NAME}`` read
    (other variables count as empty). A ValueError names an unknown variable or an unset one."""
    out = ""
    for is_variable, piece in parse_template(text):
        if not is_variable:
            out += piece
        elif piece.startswith(ENV_PREFIX):
            name = piece[len(ENV_PREFIX) :]
            found = os.environ.get(name)
            if found is None:
                raise ValueError(f"environment variable {name} is not set")
            out += found
    return out


def _check_header_value(text: str) -> str:
    if any(char in template_value(text) for char in _UNSAFE_IN_HEADER):
        raise ValueError("header values cannot contain CR, LF or NUL")
    return text


def _check_query_value(text: str) -> str:
    template_value(text)
    return text


def _check_header_name(name: str) -> str:
    return check_header_name(name)


def _check_query_name(name: str) -> str:
    if not name:
        raise ValueError("a query parameter name cannot be empty")
    return name


HeaderName = Annotated[str, AfterValidator(_check_header_name)]
HeaderValue = Annotated[str, AfterValidator(_check_header_value)]
QueryName = Annotated[str, AfterValidator(_check_query_name)]
QueryValue = Annotated[str, AfterValidator(_check_query_value)]


class HeaderEdits(PolicyConfig):
    """Applied in the order remove → rename → set → add, as Kong's transformers do. Values may hold
    variables; one that resolves to nothing (no consumer, no such claim) or to text with a control
    character leaves its header out (``set`` still removes the old values)."""

    remove: list[HeaderName] = Field(default_factory=list)
    rename: dict[HeaderName, HeaderName] = Field(default_factory=dict)
    set: dict[HeaderName, HeaderValue] = Field(default_factory=dict, description="replace or add")
    add: dict[HeaderName, HeaderValue] = Field(
        default_factory=dict, description="append, keeping existing values"
    )


class QueryEdits(PolicyConfig):
    """Query parameters, matched by their decoded names; remove → rename → set → add. Values may
    hold variables and are percent-encoded."""

    remove: list[QueryName] = Field(default_factory=list)
    rename: dict[QueryName, QueryName] = Field(default_factory=dict)
    set: dict[QueryName, QueryValue] = Field(default_factory=dict, description="replace or add")
    add: dict[QueryName, QueryValue] = Field(
        default_factory=dict, description="append, keeping existing values"
    )

    @property
    def empty(self) -> bool:
        return not (self.remove or self.rename or self.set or self.add)


class PathRewrite(PolicyConfig):
    """The first match of ``pattern`` in the upstream path is replaced by ``replace``, where
    ``{name}`` (a named group) or ``{1}`` (a numbered one) stands for what the group matched."""

    pattern: str
    replace: str

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc.msg} at position {exc.pos}") from None
        return pattern

    @field_validator("replace")
    @classmethod
    def _replace(cls, replace: str) -> str:
        if not replace.startswith("/"):
            raise ValueError("must start with /")
        for is_group, text in path_template(replace):
            if not is_group and not _PATH_TEXT.fullmatch(text):
                raise ValueError(
                    "may hold path characters only (letters, digits, -._~!$&'()*+,;=:@/ and %XX) and {group}"
                )
        return replace

    @model_validator(mode="after")
    def _groups(self) -> PathRewrite:
        pattern = re.compile(self.pattern)
        for is_group, name in path_template(self.replace):
            if not is_group:
                continue
            known = int(name) <= pattern.groups if name.isdigit() else name in pattern.groupindex
            if not known:
                raise ValueError(f"replace uses {{{name}}}, which the pattern has no group for")
        return self


def _field_path(text: str) -> str:
    parse_path(text)
    return text


def _single_path(text: str) -> str:
    if None in parse_path(text):
        raise ValueError(f"{text!r}: move and copy take one field, not [*]")
    return text


def _field_name(name: str) -> str:
    if not name or any(char in name for char in ".[]"):
        raise ValueError(f"{name!r}: rename gives the field a new name (no . [ ]); move puts it elsewhere")
    return name


FieldPath = Annotated[str, AfterValidator(_field_path)]
SingleFieldPath = Annotated[str, AfterValidator(_single_path)]
FieldName = Annotated[str, AfterValidator(_field_name)]


def _literal_json(value: Any) -> Any:
    """A value ``set`` puts in bodies, as plain JSON; its strings are literal (``$${`` unescaped):
    variables are filled in header and query values, not in bodies."""
    if isinstance(value, str):
        if any(is_variable for is_variable, _ in parse_template(value)):
            raise ValueError("variables are filled in header and query values, not in body values")
        return "".join(piece for _, piece in parse_template(value))
    if isinstance(value, list):
        return [_literal_json(item) for item in value]
    if isinstance(value, dict):
        return {key: _literal_json(item) for key, item in value.items()}
    return value


class BodyEdits(PolicyConfig):
    """A JSON body mapping (policies/transform/jsonmap.py), for bodies of a JSON content type up to
    ``max_size``; others go on unchanged."""

    set: dict[FieldPath, Any] = Field(default_factory=dict, description="path -> JSON value")
    remove: list[FieldPath] = Field(default_factory=list)
    rename: dict[FieldPath, FieldName] = Field(default_factory=dict, description="path -> new name")
    move: dict[SingleFieldPath, SingleFieldPath] = Field(default_factory=dict, description="path -> path")
    copies: dict[SingleFieldPath, SingleFieldPath] = Field(
        default_factory=dict, alias="copy", description="path -> path"
    )
    max_size: ByteSize = Field(default=1 << 20, ge=1, description="larger bodies go on unchanged")

    @field_validator("set")
    @classmethod
    def _values(cls, pairs: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for path, value in pairs.items():
            literal = _literal_json(value)
            try:  # what orjson cannot write (an integer beyond 64 bits) is refused here, not per request
                out[path] = orjson.loads(orjson.dumps(literal))
            except (orjson.JSONEncodeError, TypeError) as exc:
                raise ValueError(f"{path}: not a JSON value ({exc})") from None
        return out


class RequestTransform(PolicyConfig):
    headers: HeaderEdits = HeaderEdits()
    query: QueryEdits = QueryEdits()
    path: PathRewrite | None = None
    body: BodyEdits | None = None


class ResponseTransform(PolicyConfig):
    headers: HeaderEdits = HeaderEdits()
    body: BodyEdits | None = None


def _root_name(name: str) -> str:
    if not _XML_ROOT.fullmatch(name):
        raise ValueError(
            f"{name!r} is not an element name to write: a letter or _ first, then letters, digits, "
            "_, - or . (no :)"
        )
    if name[:3].lower() == "xml":
        raise ValueError(f"{name!r}: names starting with 'xml' are reserved by XML 1.0")
    return name


class XmlNegotiation(PolicyConfig):
    """JSON and XML, as the client asks (policies/transform/xmlmap.py has the mapping): JSON
    responses become XML for clients whose Accept weighs XML above JSON, and XML request bodies
    become JSON for the upstream."""

    respond_as_requested: bool = Field(
        default=True, description="JSON responses as XML when the client's Accept prefers XML"
    )
    convert_requests: bool = Field(
        default=True, description="XML request bodies (application/xml, text/xml) sent upstream as JSON"
    )
    root: Annotated[str, AfterValidator(_root_name)] = Field(
        default="root", description="the root element of the XML the gateway writes"
    )
    max_size: ByteSize = Field(
        default=1 << 20,
        ge=1,
        description="larger XML requests get 413; larger JSON responses go as JSON, unconverted",
    )


class TransformConfig(PolicyConfig):
    request: RequestTransform = RequestTransform()
    response: ResponseTransform = ResponseTransform()
    xml: XmlNegotiation | None = None


__all__ = [
    "BodyEdits",
    "HeaderEdits",
    "PathRewrite",
    "QueryEdits",
    "RequestTransform",
    "ResponseTransform",
    "TransformConfig",
    "XmlNegotiation",
    "template_value",
]
