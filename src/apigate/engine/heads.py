# cython: boundscheck=False, wraparound=False, annotation_typing=False
"""Plain HTTP/1.1 heads read in one pass, instead of one llhttp callback per header.

httptools calls back into Python for every header, which costs more than the proxying around
it. When this module is compiled (Cython, see setup.py), reading a whole head is one byte loop
in C. The readers accept only heads that llhttp would accept and read the same way, and answer
None for anything else, so that llhttp reads it (errors included): incomplete or oversized
heads, non-ASCII or control bytes, bare CR or LF, obs-fold, invalid names, absolute-form
targets, Transfer-Encoding, Upgrade, repeated or non-decimal Content-Length, Connection values
other than close or keep-alive, 1xx answers and bodies that end when the connection closes.

Uncompiled, the same code runs as Python: it is the reference the tests compare with llhttp.
The engine then leaves every head to llhttp (``COMPILED`` is false), which is faster than a
byte loop in Python.
"""

from __future__ import annotations

try:
    import cython

    COMPILED: bool = cython.compiled
except ImportError:  # Cython builds this module; running it as Python does not need it
    COMPILED = False

# Byte classes. A name is made of token characters (RFC 9110 §5.6.2); a value, a request
# target or a reason phrase of visible ASCII and spaces (a target without spaces, see below).
_TOKEN = 1
_TEXT = 2
_TOKEN_CHARS = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!#$%&'*+-.^_`|~"
_CLASSES: bytes = bytes(
    (_TOKEN | _TEXT if c in _TOKEN_CHARS else _TEXT if 32 <= c < 127 else 0) for c in range(256)
)
_CR = 13
_LF = 10
_SP = 32
_TAB = 9
_COLON = 58
_SLASH = 47
_DIGIT_0 = 48
_DIGIT_9 = 57

# Lowercased header names, one shared object per name, so that a name's hash is computed once
# and not on every lookup. A name's slot is a hash of its lowercased bytes; a new name in a
# taken slot replaces the old one, so that odd names cannot grow the table.
_NAME_SLOTS = 1024
_names: list = [b""] * _NAME_SLOTS
_LOWER: bytes = bytes(range(256)).lower()
_CONTENT_LENGTH = 1
_CONNECTION = 2
_REFUSED = 3
_FRAMING: dict[bytes, int] = {
    b"content-length": _CONTENT_LENGTH,
    b"connection": _CONNECTION,
    b"transfer-encoding": _REFUSED,
    b"upgrade": _REFUSED,
    b"proxy-connection": _REFUSED,  # llhttp reads it as Connection: left to it, rare as it is
}
_METHODS: dict[bytes, str] = {
    m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
}
_VERSIONS: dict[bytes, str] = {b"HTTP/1.1": "1.1", b"HTTP/1.0": "1.0"}
_MAX_DIGITS = 15  # a longer Content-Length is left to llhttp's overflow check


def _lower_name(s: bytes, start: int, stop: int) -> bytes:
    """The lowercased name at ``s[start:stop]``, as the shared object for that name."""
    lower = _LOWER
    slot = 0
    for i in range(start, stop):
        slot = (slot * 31 + lower[s[i]]) & (_NAME_SLOTS - 1)
    name = _names[slot]
    known = name
    if len(name) == stop - start:
        for i in range(start, stop):
            if known[i - start] != lower[s[i]]:
                break
        else:
            return name
    name = s[start:stop].lower()
    _names[slot] = name
    return name


# In the functions below, ``s`` and ``classes`` are the bytes of ``data`` and ``_CLASSES``:
# compiled, they are C pointers (see heads.pxd), so that reading a byte or cutting a slice is a
# plain memory access; as Python they are the bytes objects themselves.


def _read_headers(data, p, limit):
    """(end of head, headers, Content-Length or -1, Connection close, Connection keep-alive)."""
    s = data
    classes = _CLASSES
    n = min(len(data), limit)
    headers = []
    length = -1
    close = keep_alive = False
    while True:
        if p + 1 >= n:
            return None
        if s[p] == _CR:
            if s[p + 1] != _LF:
                return None
            return p + 2, headers, length, close, keep_alive
        start = p
        while p < n and classes[s[p]] & _TOKEN:
            p += 1
        if p == start or p >= n or s[p] != _COLON:
            return None
        name = _lower_name(s, start, p)
        p += 1
        while p < n and (s[p] == _SP or s[p] == _TAB):
            p += 1
        start = p
        if COMPILED:  # C from heads.pxd: 8 bytes a step over long tokens and cookies
            p = _skip_plain_words(s, p, n)  # noqa: F821 - defined only when compiled
        while p < n and (classes[s[p]] & _TEXT or s[p] == _TAB):
            p += 1
        if p + 1 >= n or s[p] != _CR or s[p + 1] != _LF:
            return None
        stop = p
        p += 2
        kind = _FRAMING.get(name)
        if kind is not None:
            if kind == _CONTENT_LENGTH:
                if length >= 0 or stop == start or stop - start > _MAX_DIGITS:
                    return None
                length = 0
                for i in range(start, stop):
                    if not _DIGIT_0 <= s[i] <= _DIGIT_9:
                        return None
                    length = length * 10 + (s[i] - _DIGIT_0)
            elif kind == _CONNECTION:
                token = s[start:stop].lower()
                if token == b"close":
                    close = True
                elif token == b"keep-alive":
                    keep_alive = True
                else:
                    return None
            else:
                return None
        headers.append((name, s[start:stop]))


def read_request(data: bytes, limit: int) -> tuple | None:
    """(method, target, headers, version, keep-alive, body length, end of head) of the request
    at the start of ``data``, if it is plain and its head ends within ``limit`` bytes; else None."""
    s = data
    classes = _CLASSES
    n = min(len(data), limit)
    p = 0
    while p < n and s[p] != _SP:
        p += 1
    method = _METHODS.get(s[:p])
    if method is None or p + 1 >= n or s[p + 1] != _SLASH:
        return None
    p += 1
    start = p
    while p < n and s[p] != _SP and classes[s[p]] & _TEXT:
        p += 1
    if p + 10 >= n or s[p] != _SP or s[p + 9] != _CR or s[p + 10] != _LF:
        return None
    version = _VERSIONS.get(s[p + 1 : p + 9])
    if version is None:
        return None
    found = _read_headers(data, p + 11, limit)
    if found is None:
        return None
    end, headers, length, close, keep_alive = found
    if end + len(headers) > limit:
        return (
            None  # near the limit, llhttp's own count (4 bytes a header beyond name and value) decides on 431
        )
    keep_alive = keep_alive if version == "1.0" else not close
    return method, s[start:p], headers, version, keep_alive, max(length, 0), end


def read_response(data: bytes, limit: int) -> tuple | None:
    """(status, headers, keep-alive, body length, end of head) of the final response at the start
    of ``data``, if it is plain and its head ends within ``limit`` bytes; else None."""
    s = data
    classes = _CLASSES
    n = min(len(data), limit)
    if n < 13 or s[8] != _SP or s[12] != _SP:
        return None
    version = _VERSIONS.get(s[:8])
    if version is None:
        return None
    status = 0
    for p in range(9, 12):
        if not _DIGIT_0 <= s[p] <= _DIGIT_9:
            return None
        status = status * 10 + (s[p] - _DIGIT_0)
    p = 13
    while p < n and (classes[s[p]] & _TEXT or s[p] == _TAB):
        p += 1
    if status < 200 or p + 1 >= n or s[p] != _CR or s[p + 1] != _LF:
        return None
    found = _read_headers(data, p + 2, limit)
    if found is None:
        return None
    end, headers, length, close, keep_alive = found
    if end + len(headers) > limit:
        return None  # as for requests: llhttp decides near the limit
    if status == 204 or status == 304:
        length = 0
    elif length < 0:
        return None  # the body ends when the connection closes: llhttp knows how
    return status, headers, keep_alive if version == "1.0" else not close, length, end
