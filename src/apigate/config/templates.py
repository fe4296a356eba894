"""Value templates: the ``${...}`` variables that header and query values take, filled per request.

A template is literal text with variables: ``${consumer.id}``, ``${consumer.tenant}``,
``${tenant_id}`` (the same as ``consumer.tenant``: the Pactown gateway's spelling),
``${jwt.<claim>}`` (a claim of the verified token), ``${request_id}``, ``${client_ip}``,
``${route}`` and ``${env.NAME}`` (read once, when the config is loaded). ``$${`` writes a literal
``${``. This module only reads the grammar; what fills each variable is the policies' business.

The config loader replaces ``${NAME}`` from the environment in every string value; inside
``policies:`` sections it leaves the references that name request variables
(``is_request_reference``) for the policies to fill per request. A leaf: imports nothing of apigate.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "ENV_PREFIX",
    "REQUEST_VARIABLES",
    "VARIABLE_FORMS",
    "is_request_reference",
    "parse_template",
]

ENV_PREFIX: Final = "env."
JWT_PREFIX: Final = "jwt."
CONSUMER_PREFIX: Final = "consumer."
REQUEST_VARIABLES: Final = frozenset(
    {"consumer.id", "consumer.tenant", "tenant_id", "request_id", "client_ip", "route"}
)
VARIABLE_FORMS: Final = (
    "${consumer.id}, ${consumer.tenant}, ${tenant_id}, ${jwt.<claim>}, ${request_id}, "
    "${client_ip}, ${route}, ${env.NAME}"
)
_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CLAIM_NAME: Final = re.compile(r"[^\s${}]+")
# `$${` first, so that the escape wins over a reference that starts at its second `$`.
_REFERENCE: Final = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")


def is_request_reference(name: str) -> bool:
    """Whether ``${name}`` names a request variable (or a consumer or token field), which the
    policies fill per request rather than the loader from the environment."""
    return name in REQUEST_VARIABLES or name.startswith((JWT_PREFIX, CONSUMER_PREFIX))


def parse_template(text: str) -> list[tuple[bool, str]]:
    """``text`` as (is_variable, text) pieces in order, literal pieces merged; a ValueError names
    an unknown variable, a malformed one or an unclosed ``${``. ``env.NAME`` comes back as a
    variable: the caller reads the environment."""
    pieces: list[tuple[bool, str]] = []
    literal = ""
    position = 0
    for match in _REFERENCE.finditer(text):
        literal += text[position : match.start()]
        position = match.end()
        name = match.group(1)
        if match.group(0) == "$${":
            literal += "${"
            continue
        if name is None:
            raise ValueError("a ${ is not closed: write ${name}, or $${ for a literal ${")
        _check_variable(name)
        if literal:
            pieces.append((False, literal))
            literal = ""
        pieces.append((True, name))
    literal += text[position:]
    if literal or not pieces:
        pieces.append((False, literal))
    return pieces


def _check_variable(name: str) -> None:
    if name in REQUEST_VARIABLES:
        return
    if name.startswith(ENV_PREFIX) and _ENV_NAME.fullmatch(name[len(ENV_PREFIX) :]):
        return
    if name.startswith(JWT_PREFIX) and _CLAIM_NAME.fullmatch(name[len(JWT_PREFIX) :]):
        return
    raise ValueError(f"unknown variable {name!r} (known: {VARIABLE_FORMS}; $${{ writes a literal ${{)")


def path_template(template: str) -> tuple[tuple[bool, str], ...]:
    """A path template (``/v2/users/{id}``) as (is_name, text) pieces: a route's ``rewrite`` and
    the ``transform`` policy's path ``replace`` are both read this way."""
    return tuple(
        (index % 2 == 1, piece) for index, piece in enumerate(re.split(r"\{([^}]*)\}", template)) if piece
    )
