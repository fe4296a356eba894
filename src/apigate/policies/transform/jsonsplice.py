"""The JSON body mapping as edits of the body's bytes, for bodies already in the form orjson writes.

Reading a 2 KB body into Python objects and writing it back costs about 135,000 instructions
(orjson; docs/benchmarks.md), most of them making and freeing objects the mapping never looks at.
A body that is compact JSON exactly as orjson would write it (no whitespace, the escapes orjson
writes, numbers in its form, no repeated key) comes back byte for byte from ``dumps(loads(body))``,
so the mapped document's bytes are the body's with the mapped places cut, renamed, replaced or
added. One pass over the bytes here checks that form and finds those places; anything else (other
JSON, malformed bytes, deep nesting) makes ``SplicePlan.map_body`` answer ``NOT_SPLICED`` and
bodymap.py reads, maps and writes the document as it always did, so every outcome (malformed,
too deep, the exact form of numbers beyond 64 bits) stays that path's.

Only mappings whose effect on the bytes is local can be spliced (``splice_plan`` says None for
the others): ``remove``, ``rename`` and ``set`` of fields, through fields and ``[*]``, where no two
operations name the same place and no place is on the way to another (so the order the operations
run in cannot matter), and no ``move`` or ``copy``. tests/test_transform_splice.py holds the
splicer to the parse-map-write result on generated bodies and mappings.
"""

from __future__ import annotations

from typing import Any, Final

import orjson
from mypy_extensions import i64

# What a field of an object reached by the paths is to the mapping.
REMOVE: Final[i64] = 0
RENAME: Final[i64] = 1  # its key is written as ``replacement``
RENAMED_TO: Final[i64] = 2  # a rename's new name: the body is mapped the parsing way
SET: Final[i64] = 3  # its value is written as ``replacement``
THROUGH: Final[i64] = 4  # paths go on into its value (``node``)

# Deeper bodies take the parsing way, which knows what orjson can write back (254 levels).
MAX_DEPTH: Final[i64] = 100
MAX_FIELDS: Final[i64] = 62  # a node's fields are bits of one i64
NOT_SPLICED: Final[bytes] = b""  # map_body's answer for a body it leaves to the parsing way

_QUOTE: Final[i64] = 34
_BACKSLASH: Final[i64] = 92


class Field:
    """A field name the paths reach in an object, and what happens to it."""

    def __init__(self, name: bytes, action: i64, bit: i64) -> None:
        self.name = name  # the name as JSON writes it, without the quotes
        self.signature = key_signature(b'"' + name + b'"', 0, len(name) + 2)
        self.action = action
        self.bit = bit
        self.replacement = b""
        self.node: Node | None = None
        self.creatable = False  # a THROUGH field that a set makes when it is missing


class Node:
    """A place in the document the paths reach: an object (``fields``) or an array (``element``,
    the place of every element); never both."""

    def __init__(self) -> None:
        self.fields: list[Field] = []
        self.signature_bits: i64 = 0  # each field's ``signature_bit``: most keys are no field
        self.element: Node | None = None
        # Written at the end of the object, in the order the set operations make them, for the
        # fields that are missing: (the field's bit, ``"name":value``).
        self.creations: list[tuple[i64, bytes]] = []

    def field(self, body: bytes, key_start: i64, key_end: i64, signature: i64) -> Field | None:
        """The field named by the key at body[key_start:key_end] (quotes included), whose
        ``key_signature`` is ``signature``."""
        for candidate in self.fields:
            if candidate.signature == signature and _matches(body, key_start + 1, candidate.name):
                return candidate
        return None


class Edits:
    """The body's bytes with the edits made so far: pieces of it and what replaces the rest."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.pieces: list[bytes] = []
        self.copied: i64 = 0  # the body is in pieces up to here

    def replace(self, start: i64, end: i64, text: bytes) -> None:
        """body[start:end] written as ``text``; edits come in the order of the bytes."""
        self.pieces.append(self.body[self.copied : start])
        if text:
            self.pieces.append(text)
        self.copied = end

    def result(self) -> bytes | None:
        """The edited body, or None when there was nothing to edit."""
        if not self.pieces:
            return None
        self.pieces.append(self.body[self.copied :])
        return b"".join(self.pieces)


class SplicePlan:
    """The mapping's operations as a tree of the places they reach (see ``splice_plan``)."""

    def __init__(self, root: Node) -> None:
        self.root = root

    def map_body(self, body: bytes) -> bytes | None:
        """The mapped body, None when nothing changes, or ``NOT_SPLICED`` when the body is not in
        the form this reads."""
        if not body.isascii():
            try:
                body.decode("utf-8")  # as strict as orjson: no surrogates, no overlong forms
            except UnicodeDecodeError:
                return NOT_SPLICED
        edits = Edits(body)
        end = value_end(body, 0, self.root, 0, edits)
        if end != len(body):  # not the form, or bytes after the document
            return NOT_SPLICED
        return edits.result()


def string_end(body: bytes, at: i64) -> i64:
    """From after a string's opening quote: the position after its closing quote, or -1 when it
    is not a string as orjson writes it."""
    size: i64 = len(body)
    while at < size:
        byte: i64 = body[at]
        if byte <= _BACKSLASH:  # letters are above: one test for most bytes
            if byte == _QUOTE:
                return at + 1
            if byte == _BACKSLASH:
                at += 1
                if at >= size or not _written_escape(body, at):
                    return -1
            elif byte < 32:
                return -1
        at += 1
    return -1


def key_signature(body: bytes, key_start: i64, key_end: i64) -> i64:
    """A number made of a key's length and its first and last bytes (quotes excluded): equal
    keys have equal signatures, and keys of an object rarely share one."""
    length = key_end - key_start
    if length <= 2:
        return length
    first: i64 = body[key_start + 1]
    last: i64 = body[key_end - 2]
    return (length * 256 + first) * 256 + last


def signature_bit(signature: i64) -> i64:
    return 1 << (signature % 61)


def _written_escape(body: bytes, at: i64) -> bool:
    """Whether the escape whose letter is at ``at`` is one orjson writes: ``\\" \\\\ \\b \\f \\n
    \\r \\t``, and ``\\u00xx`` (lower-case) for the other control characters. (It writes ``/`` and
    every other character as itself.)"""
    byte: i64 = body[at]
    if byte in (_QUOTE, _BACKSLASH, 98, 102, 110, 114, 116):
        return True
    if byte != 117 or at + 4 >= len(body) or body[at + 1] != 48 or body[at + 2] != 48:
        return False
    high: i64 = body[at + 3]
    low: i64 = body[at + 4]
    if high != 48 and high != 49:
        return False
    if 48 <= low <= 57:
        code = (high - 48) * 16 + low - 48
    elif 97 <= low <= 102:
        code = (high - 48) * 16 + low - 87
    else:
        return False
    # \b \t \n \f \r have their short escapes; the 4 hex digits are skipped as escape letters
    return code != 8 and code != 9 and code != 10 and code != 12 and code != 13


def _digits_end(body: bytes, at: i64) -> i64:
    size: i64 = len(body)
    while at < size and 48 <= body[at] <= 57:
        at += 1
    return at


def number_end(body: bytes, at: i64) -> i64:
    """The end of the number starting at ``at`` if orjson writes it as it is, else -1: an integer
    of up to 18 digits (not ``-0``), or a decimal fraction without exponent whose value has one
    shortest form, this one (up to 15 significant digits, no trailing zero, at most 15 digits
    before the point and 4 zeros after ``0.``, where orjson's own form turns to exponents)."""
    negative = body[at] == 45
    start: i64 = at + 1 if negative else at
    if start >= len(body):
        return -1
    first: i64 = body[start]
    if first == 48:
        whole_end = start + 1
    elif 49 <= first <= 57:
        whole_end = _digits_end(body, start + 1)
    else:
        return -1
    whole_digits = whole_end - start
    if whole_end >= len(body) or body[whole_end] != 46:  # an integer
        if whole_digits > 18 or (negative and first == 48):
            return -1
        return _exponent_free(body, whole_end)
    fraction_start = whole_end + 1
    end = _digits_end(body, fraction_start)
    fraction_digits = end - fraction_start
    if fraction_digits == 0 or whole_digits > 15:
        return -1
    if fraction_digits == 1 and body[fraction_start] == 48:  # 1.0, -0.0: orjson's own form
        return _exponent_free(body, end)
    if body[end - 1] == 48:  # 1.50 is written 1.5
        return -1
    significant = whole_digits + fraction_digits
    if first == 48:
        zeros = _zeros_end(body, fraction_start) - fraction_start
        if zeros > 4:
            return -1
        significant = fraction_digits - zeros
    if significant > 15:
        return -1
    return _exponent_free(body, end)


def _zeros_end(body: bytes, at: i64) -> i64:
    while body[at] == 48:
        at += 1
    return at


def _exponent_free(body: bytes, end: i64) -> i64:
    if end < len(body) and (body[end] == 101 or body[end] == 69):
        return -1
    return end


def _matches(body: bytes, at: i64, text: bytes) -> bool:
    """Whether ``text`` is in ``body`` at ``at`` (a byte loop: cheaper compiled than a method call)."""
    if at + len(text) > len(body):
        return False
    index: i64 = 0
    size: i64 = len(text)
    while index < size:
        if body[at + index] != text[index]:
            return False
        index += 1
    return True


def _literal_end(body: bytes, at: i64, literal: bytes) -> i64:
    return at + len(literal) if _matches(body, at, literal) else -1


def value_end(body: bytes, at: i64, node: Node | None, depth: i64, edits: Edits) -> i64:
    """The end of the value at ``at`` (-1: not in orjson's form), with the edits ``node`` (the
    place the paths reach here, if any) makes in it."""
    if at >= len(body):
        return -1
    byte: i64 = body[at]
    if byte == _QUOTE:
        return string_end(body, at + 1)
    if byte == 123:
        if depth >= MAX_DEPTH:
            return -1
        reached = node if node is not None and node.element is None else None
        return object_end(body, at + 1, reached, depth + 1, edits)
    if byte == 91:
        if depth >= MAX_DEPTH:
            return -1
        element = node.element if node is not None else None
        return array_end(body, at + 1, element, depth + 1, edits)
    if byte == 45 or 48 <= byte <= 57:
        return number_end(body, at)
    if byte == 116:
        return _literal_end(body, at, b"true")
    if byte == 102:
        return _literal_end(body, at, b"false")
    if byte == 110:
        return _literal_end(body, at, b"null")
    return -1


def array_end(body: bytes, at: i64, element: Node | None, depth: i64, edits: Edits) -> i64:
    """From after ``[``: the position after the array's ``]``, each element edited by ``element``."""
    if at < len(body) and body[at] == 93:
        return at + 1
    while True:
        at = value_end(body, at, element, depth, edits)
        if at < 0 or at >= len(body):
            return -1
        byte: i64 = body[at]
        if byte == 93:
            return at + 1
        if byte != 44:
            return -1
        at += 1


def object_end(body: bytes, at: i64, node: Node | None, depth: i64, edits: Edits) -> i64:
    """From after ``{``: the position after the object's ``}``, with ``node``'s edits made.

    A removed member goes with one comma: the one before it when a member before it stays, else
    the one after it. Fields a set makes are added before the ``}``."""
    size: i64 = len(body)
    first_key = at
    kept = False  # a member before this one stays in the object
    present: i64 = 0  # the bits of node's fields the object has
    seen_low: i64 = 0  # two bits of each key's signature, to find a repeated key
    seen_high: i64 = 0
    if at < size and body[at] == 125:
        return _close(body, at, node, present, kept, edits)
    while True:
        if at >= size or body[at] != _QUOTE:
            return -1
        key_start = at
        key_end = string_end(body, at + 1)
        if key_end < 0 or key_end >= size or body[key_end] != 58:
            return -1
        signature = key_signature(body, key_start, key_end)
        low = signature_bit(signature)
        high: i64 = 1 << (signature * 7 % 59)
        if seen_low & low and seen_high & high and repeats_key(body, first_key, key_start, key_end):
            return -1  # orjson keeps one of them: the body is not in its form
        seen_low |= low
        seen_high |= high
        field: Field | None = None
        if node is not None and node.signature_bits & low:
            field = node.field(body, key_start, key_end, signature)
        if field is None:
            end = value_end(body, key_end + 1, None, depth, edits)
            kept = True
        else:
            present |= field.bit
            action = field.action
            if action == RENAMED_TO:
                return -1  # whether it goes depends on a later key: the parsing way decides
            end = value_end(body, key_end + 1, field.node, depth, edits)
            if end < 0 or end >= size:
                return -1
            if action == REMOVE:
                if kept:
                    edits.replace(key_start - 1, end, b"")
                elif body[end] == 44:
                    edits.replace(key_start, end + 1, b"")
                else:
                    edits.replace(key_start, end, b"")
            else:
                if action == RENAME:
                    edits.replace(key_start, key_end, field.replacement)
                elif action == SET:
                    edits.replace(key_end + 1, end, field.replacement)
                kept = True
        if end < 0 or end >= size:
            return -1
        byte: i64 = body[end]
        if byte == 125:
            return _close(body, end, node, present, kept, edits)
        if byte != 44:
            return -1
        at = end + 1


def _close(body: bytes, at: i64, node: Node | None, present: i64, kept: bool, edits: Edits) -> i64:
    """At an object's ``}``: the fields a set makes that the object lacks are added."""
    if node is not None:
        for bit, member in node.creations:
            if not present & bit:
                edits.replace(at, at, b"," + member if kept else member)
                kept = True
    return at + 1


def repeats_key(body: bytes, first_key: i64, key_start: i64, key_end: i64) -> bool:
    """Whether the key at key_start:key_end is one of the object's keys before it (rare: called
    when two bits of its signature were seen in the object)."""
    key = body[key_start:key_end]
    ignored = Edits(body)
    at = first_key
    while at < key_start:
        end = string_end(body, at + 1)
        if body[at:end] == key:
            return True
        at = value_end(body, end + 1, None, 0, ignored) + 1
    return False


# -- the plan, made once from the compiled operations -------------------------------------------------------


def splice_plan(
    remove: list[tuple[Any, ...]],
    rename: list[tuple[tuple[Any, ...], str]],
    move: list[Any],
    copy: list[Any],
    set: list[tuple[tuple[Any, ...], Any]],
) -> SplicePlan | None:
    """The operations as a ``SplicePlan``, or None when their effect cannot be made by splicing
    (see the module's text)."""
    if move or copy:
        return None
    places: list[tuple[tuple[Any, ...], i64, bytes]] = []  # (path, action, replacement)
    for path in remove:
        places.append((path, REMOVE, b""))
    for path, name in rename:
        if not path or path[len(path) - 1] == name:
            return None
        places.append((path, RENAME, _json(name)))
        places.append(((*path[: len(path) - 1], name), RENAMED_TO, b""))
    for path, value in set:
        written = _written(value, len(path))
        if written is None:
            return None
        places.append((path, SET, written))
    if not _apart([place[0] for place in places]):
        return None
    root = Node()
    for path, action, replacement in places:
        field = _add_place(root, path, action)
        if field is None:
            return None
        field.replacement = replacement
    for path, _ in set:
        _add_creations(root, path)
    _write_creations(root)
    return SplicePlan(root)


def _json(value: Any) -> bytes:
    return orjson.dumps(value)


def _written(value: Any, path_length: int) -> bytes | None:
    """A set value as orjson writes it, or None when it cannot be written or nests too deep for
    the document it joins."""
    try:
        written = orjson.dumps(value)
    except orjson.JSONEncodeError:
        return None
    return written if _depth(value) + path_length <= MAX_DEPTH else None


def _depth(value: Any) -> int:
    pending: list[tuple[Any, int]] = [(value, 1)]
    deepest = 0
    while pending:
        item, depth = pending.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            pending.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            pending.extend((child, depth + 1) for child in item)
    return deepest


def _apart(paths: list[tuple[Any, ...]]) -> bool:
    """Whether each path ends on a field, goes through fields and ``[*]`` only, and neither
    repeats another nor leads through another's place."""
    ends: set[tuple[Any, ...]] = set()
    for path in paths:
        if not path or not all(isinstance(step, str) or step is None for step in path):
            return False
        if not isinstance(path[len(path) - 1], str) or path in ends:
            return False
        ends.add(path)
    return not any(path[:length] in ends for path in paths for length in range(1, len(path)))


def _add_place(root: Node, path: tuple[Any, ...], action: i64) -> Field | None:
    node = root
    for step in path[: len(path) - 1]:
        if step is None:
            if node.fields:
                return None  # an object on one path, an array on another
            if node.element is None:
                node.element = Node()
            node = node.element
            continue
        through = _field(node, step, THROUGH)
        if through is None:
            return None
        if through.node is None:
            through.node = Node()
        node = through.node
    return _field(node, path[len(path) - 1], action)


def _field(node: Node, name: str, action: i64) -> Field | None:
    if node.element is not None:
        return None
    written = _json(name)[1:-1]
    for field in node.fields:
        if field.name == written:
            return field if field.action == action == THROUGH else None
    if len(node.fields) >= MAX_FIELDS:
        return None
    field = Field(written, action, 1 << len(node.fields))
    node.fields.append(field)
    node.signature_bits |= signature_bit(field.signature)
    return field


def _add_creations(root: Node, path: tuple[Any, ...]) -> None:
    """Mark what a set of ``path`` makes when it is missing: the fields after its last ``[*]``
    (bodymap.py's ``_creatable_from``), each added to its object's creations in the order the
    set operations first make it."""
    creatable_from = 0
    for position, step in enumerate(path):
        if step is None:
            creatable_from = position + 1
    node = root
    for position, step in enumerate(path):
        if step is None:
            assert node.element is not None
            node = node.element
            continue
        name = _json(step)[1:-1]
        field = next(field for field in node.fields if field.name == name)
        if position >= creatable_from:
            field.creatable = True
            if all(bit != field.bit for bit, _ in node.creations):
                node.creations.append((field.bit, b""))
        if field.node is not None:
            node = field.node


def _write_creations(node: Node) -> None:
    """Fill in each creation's ``"name":value`` (a made object holds its own creations)."""
    if node.element is not None:
        _write_creations(node.element)
    written: list[tuple[i64, bytes]] = []
    for bit, _ in node.creations:
        field = next(field for field in node.fields if field.bit == bit)
        if field.node is not None:
            _write_creations(field.node)
        value = field.replacement if field.action == SET else _made_object(field.node)
        written.append((bit, b'"' + field.name + b'":' + value))
    for field in node.fields:
        if field.node is not None and not field.creatable:
            _write_creations(field.node)
    node.creations = written


def _made_object(node: Node | None) -> bytes:
    assert node is not None
    return b"{" + b",".join(member for _, member in node.creations) + b"}"
