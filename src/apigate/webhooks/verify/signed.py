"""HMAC signatures carried in one header: the rule every such preset is an instance of, and the
generic ``hmac`` scheme that exposes the rule to configuration.

A rule names the header (and its prefix, e.g. ``sha256=``), the digest and its encoding, and the
signed content as a template over the raw body, the timestamp header and the id header.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from apigate.webhooks.verify.common import (
    BodyJson,
    Encoding,
    FieldSource,
    HeaderName,
    HmacKeys,
    Refused,
    SchemeBase,
    SchemeVerifier,
    Secrets,
    Timestamp,
    TimestampFormat,
    Tolerance,
    decode_signature,
    header_value,
    secret_bytes,
    signed_bytes,
)
from apigate.webhooks.verify.model import Reason, Verdict, WebhookRequest

Template = tuple[bytes | str, ...]
"""Literal bytes, and placeholder names ("body", "timestamp", "id") as str."""
BODY_ONLY: Template = ("body",)
_PLACEHOLDERS = frozenset({"body", "timestamp", "id"})


def compile_template(text: str) -> Template:
    """``"{timestamp}.{body}"`` -> ``("timestamp", b".", "body")``; ``{{`` and ``}}`` are literal braces."""
    parts: list[bytes | str] = []
    for literal, field, spec, conversion in string.Formatter().parse(text):
        if literal:
            parts.append(literal.encode("utf-8"))
        if field is None:
            continue
        if field not in _PLACEHOLDERS or spec or conversion:
            raise ValueError(f"unknown placeholder {{{field}}}: use {{body}}, {{timestamp}} or {{id}}")
        parts.append(field)
    return tuple(parts)


@dataclass(frozen=True, slots=True)
class HmacRule:
    headers: tuple[str, ...]
    """The signature's header; later names are accepted alternatives."""
    digest: str = "sha256"
    encoding: Encoding = "hex"
    prefix: str = ""
    template: Template = BODY_ONLY
    timestamp_header: str | None = None
    timestamp_formats: tuple[TimestampFormat, ...] = ("unix",)
    tolerance: float = 300.0
    id_header: str | None = None

    def verify(self, request: WebhookRequest, keys: HmacKeys) -> None:
        """Returns when the request carries a signature made with one of ``keys``; else raises Refused."""
        name = self.headers[0]
        value = header_value(request, self.headers, Reason.MISSING_SIGNATURE, Reason.MALFORMED_SIGNATURE)
        if not value.startswith(self.prefix):
            raise Refused(Reason.MALFORMED_SIGNATURE, f"the {name} value does not start with {self.prefix!r}")
        signature = decode_signature(value[len(self.prefix) :], self.encoding, keys.digest_size)
        if signature is None:
            raise Refused(
                Reason.MALFORMED_SIGNATURE, f"the {name} value is not a {self.encoding} {self.digest} digest"
            )
        timestamp = (
            Timestamp.from_header(request, self.timestamp_header, self.timestamp_formats)
            if self.timestamp_header
            else None
        )
        if not keys.matches((signature,), self._content(request, timestamp)):
            raise Refused(Reason.BAD_SIGNATURE, f"the {name} signature does not match under any secret")
        if timestamp is not None:
            timestamp.require_within(self.tolerance, request.now)

    def _content(self, request: WebhookRequest, timestamp: Timestamp | None) -> list[bytes]:
        values = {"body": request.body}
        if timestamp is not None:
            values["timestamp"] = signed_bytes(timestamp.text, timestamp.name)
        if self.id_header is not None and "id" in self.template:
            event_id = header_value(request, (self.id_header,), Reason.MISSING_ID, Reason.MISSING_ID)
            values["id"] = signed_bytes(event_id, self.id_header)
        return [part if isinstance(part, bytes) else values[part] for part in self.template]


class HmacVerifier(SchemeVerifier):
    """One HMAC rule keyed with the config's secrets."""

    def __init__(
        self,
        config: SchemeBase,
        secrets: Sequence[bytes],
        rule: HmacRule,
        event_id: FieldSource | None = None,
        event_type: FieldSource | None = None,
    ) -> None:
        super().__init__(config, event_id, event_type)
        self._rule = rule
        self._keys = HmacKeys(secrets, rule.digest)

    def check(self, request: WebhookRequest, body: BodyJson) -> Verdict | None:
        self._rule.verify(request, self._keys)
        return None


class HmacConfig(SchemeBase):
    """Any sender that signs with an HMAC in one header."""

    scheme: Literal["hmac"]
    secrets: Secrets
    header: HeaderName = Field(description="the header carrying the signature")
    algorithm: Literal["sha1", "sha256", "sha512"] = "sha256"
    encoding: Encoding = "hex"
    prefix: str = Field(default="", max_length=64, description="text before the digest, e.g. sha256=")
    signed_content: str = Field(
        default="{body}",
        max_length=256,
        description="what is signed: {body} (raw bytes), {timestamp} and {id} (header values)",
    )
    timestamp_header: HeaderName | None = Field(default=None, description="needed by {timestamp}")
    timestamp_format: TimestampFormat = "unix"
    tolerance: Tolerance = 300.0

    @field_validator("signed_content")
    @classmethod
    def _template_compiles(cls, text: str) -> str:
        compile_template(text)
        return text

    @model_validator(mode="after")
    def _placeholders_have_sources(self) -> Self:
        used = {part for part in compile_template(self.signed_content) if isinstance(part, str)}
        if "body" not in used:
            raise ValueError("signed_content must contain {body}: an unsigned body could be forged")
        if ("timestamp" in used) != (self.timestamp_header is not None):
            raise ValueError("{timestamp} in signed_content and timestamp_header go together")
        if "id" in used and self.id_header is None:
            raise ValueError("{id} in signed_content needs id_header")
        return self

    def build(self) -> HmacVerifier:
        rule = HmacRule(
            headers=(self.header,),
            digest=self.algorithm,
            encoding=self.encoding,
            prefix=self.prefix,
            template=compile_template(self.signed_content),
            timestamp_header=self.timestamp_header,
            timestamp_formats=(self.timestamp_format,),
            tolerance=self.tolerance,
            id_header=self.id_header,
        )
        return HmacVerifier(self, secret_bytes(self.secrets), rule)
