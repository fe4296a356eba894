"""Request paths in one normal form: the form the router matches and the upstream receives.

An upstream decodes a path before it maps it to a handler, so routing on the path as sent would
let ``/jwt%2fsecret`` or ``/x/..%2fjwt/secret`` match a public route and reach a protected
handler. The gateway therefore routes on, and forwards, the path after:

- decoding escapes of unreserved characters, with upper-case hex for the escapes that stay
  (RFC 3986 §6.2.2.2 and §6.2.2.1); decoding happens once, so ``%252F`` stays ``%252F``;
- deciding encoded slashes (``%2F``, ``%5C``): refused, or decoded to ``/`` when
  ``unescape_slashes`` is set (Envoy's ``path_with_escaped_slashes_action`` REJECT_REQUEST and
  UNESCAPE_AND_FORWARD);
- removing dot segments (RFC 3986 §5.2.4) and collapsing ``//``; a trailing slash is kept.

Refused (``PathRefused``, answered ``400``): a malformed escape, a control character (raw or
``%00``-``%1F``, ``%7F``), a raw backslash, a path parameter on an empty or dot segment
(``/..;/``, ``/.;x/``, ``/;x/``, which servlet containers read as ``/../`` or ``//``), and, with
``unescape_slashes``, a ``;`` beside an encoded slash (such a server strips the parameter before it
decodes, so it would cut the segments elsewhere), and an encoded ``;`` (``%3B``), which a server
that decodes first reads as a parameter. A ``;`` elsewhere stays; the router compares
literal segments without their parameters (engine/router.py).
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["PathRefused", "normalize_path"]


class PathRefused(ValueError):
    """A request path that is not routed; the message says why (the client gets a 400)."""


# Already normal: "/"-separated segments of unreserved characters, ":", "@" and the sub-delims
# other than ";", none of them empty, "." or "..". One precompiled match decides this in C without
# allocating, where separate `in` tests would scan the path once per suspicious character;
# anything else (an escape, ";", "\", "//", a dot segment, a control or non-ASCII byte) takes the
# slow path, which returns such a path unchanged if it has nothing to change.
_NORMAL: Final = re.compile(r"(?:/(?!\.\.?(?:/|\Z))[A-Za-z0-9\-._~!$&'()*+,=:@]+)*/?")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX: Final = frozenset("0123456789abcdefABCDEF")


def normalize_path(path: str, unescape_slashes: bool = False) -> str:
    """The normal form of a request path (starting with ``/``); raises PathRefused."""
    if _NORMAL.fullmatch(path):
        return path
    if "\\" in path:
        raise PathRefused("request path: a backslash is refused (some servers read it as /)")
    if _CONTROL.search(path):
        raise PathRefused("request path: control characters are refused")
    unescaped_slash = False
    if "%" in path:
        path, unescaped_slash = _decode_escapes(path, unescape_slashes)
    if unescaped_slash and ";" in path:
        raise PathRefused("request path: a path parameter (;) beside an encoded slash is ambiguous")
    return _remove_dot_segments(path)


def _decode_escapes(path: str, unescape_slashes: bool) -> tuple[str, bool]:
    """Escapes of unreserved characters decoded, the others upper-cased; and whether a slash was."""
    pieces = path.split("%")
    out = [pieces[0]]
    unescaped_slash = False
    for piece in pieces[1:]:
        code = piece[:2]
        if len(code) < 2 or code[0] not in _HEX or code[1] not in _HEX:
            raise PathRefused("request path: malformed percent-escape (% must be followed by two hex digits)")
        value = int(code, 16)
        char = chr(value)
        if char in _UNRESERVED:
            out.append(char)
        elif char == "/" or char == "\\":
            if not unescape_slashes:
                raise PathRefused("request path: an encoded slash (%2F or %5C) is refused")
            out.append("/")
            unescaped_slash = True
        elif value < 0x20 or value == 0x7F:
            raise PathRefused("request path: encoded control characters are refused")
        elif char == ";":
            # A server that decodes before it strips path parameters would cut the segment here
            # while the gateway routes it whole (Spring Security's firewall refuses it too).
            raise PathRefused("request path: an encoded semicolon (%3B) is refused")
        else:
            out.append("%" + code.upper())
        out.append(piece[2:])
    return "".join(out), unescaped_slash


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 on a decoded path, with empty segments dropped and a trailing slash kept."""
    output: list[str] = []
    for segment in path.split("/"):
        if ";" in segment and segment.partition(";")[0] in ("", ".", ".."):
            raise PathRefused("request path: a path parameter (;) on an empty or dot segment is refused")
        if segment == "..":
            if output:
                output.pop()
        elif segment not in (".", ""):
            output.append(segment)
    result = "/" + "/".join(output)
    if path.endswith(("/", "/.", "/..")) and result != "/":
        result += "/"
    return result
