"""The per-request work of the JSON body mapping, kept free of pydantic so that mypyc can compile it.

``jsonmap.py`` is the mapping's public face (paths, ``JsonMapping``); what runs over each body is
here: reading the body (orjson, or the standard library when it holds an integer too long for
64 bits), walking the document for each operation and writing it back (bodies.py runs it for
requests and responses). Compiled, the walk over a parsed document costs a tenth of what it
costs as Python, and the long-integer test a byte loop instead of a regular expression that
tried a match at every digit (docs/benchmarks.md, "edge policy costs"). A body already in
orjson's form, under a mapping whose edits are local, is edited as bytes instead, to the same
bytes (jsonsplice.py), which costs half as much as reading and writing the document.
"""

from __future__ import annotations

import json
from typing import Any, Final

import orjson
from mypy_extensions import i64

from apigate.policies.transform.jsonsplice import NOT_SPLICED, splice_plan

# Operations as jsonmap.py compiles them: a path is a tuple of steps, each a field (str), an
# index (int, negative from the end) or every element (None, written ``[*]``).
Path = tuple[str | int | None, ...]

# An integer of this many digits may exceed 64 bits, which orjson would read as a float.
LONG_DIGITS: Final[i64] = 20
_MISSING: Final[object] = object()


class NotMapped(ValueError):
    """A body the mapping leaves as it is: ``reason`` is ``malformed`` (not JSON, or not UTF-8) or
    ``too_deep`` (nested deeper than can be written back)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def has_long_integer(body: bytes) -> bool:
    """Whether ``body`` holds ``LONG_DIGITS`` ASCII digits in a row (anywhere: a string's digits
    count too, which only sends such a body the exact way).

    Any such run covers one position of every ``LONG_DIGITS`` in a row, so the loop looks at every
    twentieth byte and, at a digit, measures the run around it; the next run that could be long
    enough starts after this one's end. (Native integers: compiled, a read is a few instructions.)"""
    size: i64 = len(body)
    at: i64 = LONG_DIGITS - 1
    while at < size:
        byte: i64 = body[at]
        if byte < 48 or byte > 57:
            at += LONG_DIGITS
            continue
        start: i64 = at
        while start > 0 and _digit(body[start - 1]):
            start -= 1
        end: i64 = at + 1
        while end < size and _digit(body[end]):
            end += 1
        if end - start >= LONG_DIGITS:
            return True
        at = end + LONG_DIGITS
    return False


def _digit(byte: i64) -> bool:
    return 48 <= byte <= 57


def load(body: bytes, exact: bool) -> Any:
    """The parsed body (``exact``: by the standard library, so that integers keep every digit)."""
    if exact:
        try:
            return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
        except RecursionError:
            raise NotMapped("too_deep") from None
        except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise NotMapped("malformed") from None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise NotMapped("malformed") from None


def dump(document: Any, exact: bool) -> bytes:
    """``document`` written back the way ``load`` read it."""
    if exact:
        try:
            return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        except RecursionError:
            raise NotMapped("too_deep") from None
        except ValueError:  # a lone surrogate escape cannot be written as UTF-8
            raise NotMapped("malformed") from None
    try:
        return orjson.dumps(document)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (it reads deeper)
        raise NotMapped("too_deep") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class Operations:
    """The compiled operations, in the order they run: remove → rename → move → copy → set."""

    def __init__(
        self,
        remove: list[Path],
        rename: list[tuple[Path, str]],
        move: list[tuple[Path, Path]],
        copy: list[tuple[Path, Path]],
        set: list[tuple[Path, Any]],
    ) -> None:
        self.remove = remove
        self.rename = rename
        self.move = move
        self.copy = copy
        self.set = set
        # The same operations as edits of the bytes, for bodies in orjson's own form (None: not
        # a mapping whose edits are local; see jsonsplice.py).
        self.splice = splice_plan(remove, rename, move, copy, set)

    def apply(self, document: Any) -> bool:
        """Run the operations over ``document`` in place; whether anything changed. Never raises."""
        changed = False
        for path in self.remove:
            if remove(document, path):
                changed = True
        for path, name in self.rename:
            if rename(document, path, name):
                changed = True
        for source, destination in self.move:
            if transfer(document, source, destination, False):
                changed = True
        for source, destination in self.copy:
            if transfer(document, source, destination, True):
                changed = True
        for path, value in self.set:
            if put(document, path, value, False):
                changed = True
        return changed

    def map_body(self, body: bytes) -> bytes | None:
        """The mapped body, or None when nothing changed; ``NotMapped`` when it cannot be read or
        written back as JSON."""
        exact = has_long_integer(body)
        if not exact and self.splice is not None:
            spliced = self.splice.map_body(body)
            if spliced != NOT_SPLICED:
                return spliced
        document = load(body, exact)
        if not self.apply(document):
            return None
        return dump(document, exact)


# -- walking -------------------------------------------------------------------------------------------


def _creatable_from(path: Path) -> int:
    """The first step from which missing objects may be created: after the last index, so that an
    object is never made where an array was meant."""
    position = len(path) - 1
    while position >= 0:
        if not isinstance(path[position], str):
            return position + 1
        position -= 1
    return 0


def parents(document: Any, path: Path, create: bool) -> list[Any]:
    """The nodes ``path`` reaches before its last step; with ``create``, missing objects on the
    way are made (only where fields, not indexes, follow)."""
    nodes: list[Any] = [document]
    creatable = _creatable_from(path) if create else len(path)
    last_position = len(path) - 1
    position = 0
    while position < last_position:
        step = path[position]
        reached: list[Any] = []
        for node in nodes:
            if step is None:
                if isinstance(node, list):
                    reached.extend(node)
            elif isinstance(step, int):
                if isinstance(node, list) and -len(node) <= step < len(node):
                    reached.append(node[step])
            elif isinstance(node, dict):
                child = node.get(step, _MISSING)
                if child is _MISSING and position >= creatable:
                    child = {}
                    node[step] = child
                if child is not _MISSING:
                    reached.append(child)
        if not reached:
            return reached
        nodes = reached
        position += 1
    return nodes


def targets(document: Any, path: Path, create: bool) -> list[tuple[Any, Any]]:
    """The (container, key or index) pairs ``path`` reaches; with ``create``, missing objects on
    the way are made (only where fields, not indexes, follow)."""
    last = path[len(path) - 1]
    pairs: list[tuple[Any, Any]] = []
    for node in parents(document, path, create):
        if last is None:
            if isinstance(node, list):
                for index in range(len(node)):
                    pairs.append((node, index))
        elif isinstance(last, int):
            if isinstance(node, list) and -len(node) <= last < len(node):
                pairs.append((node, last))
        elif isinstance(node, dict):
            pairs.append((node, last))
    return pairs


def remove(document: Any, path: Path) -> bool:
    changed = False
    last = path[len(path) - 1]
    if last is None:  # every element: the arrays are emptied
        for container in _distinct(targets(document, path, False)):
            if container:
                container.clear()
                changed = True
        return changed
    if isinstance(last, str):  # a field of each object reached: no (container, key) pairs made
        for node in parents(document, path, False):
            if isinstance(node, dict) and last in node:
                del node[last]
                changed = True
        return changed
    for container, key in targets(document, path, False):
        del container[key]  # an index in range of a list (targets checked both)
        changed = True
    return changed


def _distinct(pairs: list[tuple[Any, Any]]) -> list[Any]:
    seen: dict[int, Any] = {}
    for container, _ in pairs:
        seen.setdefault(id(container), container)
    return list(seen.values())


def rename(document: Any, path: Path, name: str) -> bool:
    changed = False
    for container, key in targets(document, path, False):
        if not isinstance(container, dict) or key not in container or key == name:
            continue
        # Rebuilt in order, so the field keeps its place under its new name.
        items = list(container.items())
        container.clear()
        for field, value in items:
            if field == name:
                continue  # replaced by the renamed field
            container[name if field == key else field] = value
        changed = True
    return changed


def transfer(document: Any, source: Path, destination: Path, keep: bool) -> bool:
    """Copy or move the one value at ``source`` to ``destination``. A move takes the value out
    first (as JSON Patch's move does), so a destination inside it cannot make a cycle; when the
    destination cannot be reached, the value goes back where it was."""
    found = targets(document, source, False)
    if len(found) != 1:
        return False
    container, key = found[0]
    value = container.get(key, _MISSING) if isinstance(container, dict) else container[key]
    if value is _MISSING:
        return False
    if keep:
        return put(document, destination, deep_copy(value), True)
    del container[key]
    if put(document, destination, value, True):
        return True
    if isinstance(container, dict):
        container[key] = value
    else:
        assert isinstance(key, int)
        container.insert(key if key >= 0 else len(container) + 1 + key, value)
    return False


def put(document: Any, path: Path, value: Any, fresh: bool) -> bool:
    """Put ``value`` at every place ``path`` reaches; a copy each unless it is ``fresh`` (made for
    this document) and goes to one place: a configured value is never handed to a document."""
    reached = targets(document, path, True)
    for container, key in reached:
        container[key] = value if fresh and len(reached) == 1 else deep_copy(value)
    return len(reached) > 0


def deep_copy(value: Any) -> Any:
    """A deep copy of a JSON value, without recursion (documents may nest deeply)."""
    if not isinstance(value, (dict, list)):
        return value
    root: Any = {} if isinstance(value, dict) else []
    pending: list[tuple[Any, Any]] = [(value, root)]
    while pending:
        source, target = pending.pop()
        items: Any = source.items() if isinstance(source, dict) else enumerate(source)
        for key, item in items:
            if isinstance(item, (dict, list)):
                fresh: Any = {} if isinstance(item, dict) else []
                pending.append((item, fresh))
                item = fresh
            if isinstance(target, dict):
                target[key] = item
            else:
                target.append(item)
    return root
