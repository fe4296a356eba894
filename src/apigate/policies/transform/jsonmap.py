"""JSON body mapping: set, remove, rename, move and copy fields named by paths.

A path names fields from the document's root: ``user.internal_id``, ``items[0].id``,
``items[-1]`` (the last element), ``items[*].price`` (that field of every element), ``[0].id``
when the document is an array. Names are the text between dots (no ``.``, ``[`` or ``]``).
Paths are compiled once, when the config is loaded (``parse_path``); a mapping
(``JsonMapping``) then runs over a parsed document in place and never raises, whatever the
document holds: a path that leads nowhere (a missing field, an index out of range, a string
where an object was expected) changes nothing.

Operations run in the order remove → rename → move → copy → set:

- ``remove``: delete the field or element (``items[*]`` empties the array);
- ``rename`` (path → new name): the field keeps its place in its object under the new name,
  replacing a field of that name;
- ``move`` and ``copy`` (path → path, no ``[*]``): the value goes to the destination (objects on
  the way are created), and ``move`` removes it from where it was;
- ``set`` (path → value): replace or add the field; objects on the way are created, and after
  ``[*]`` in every element.

``map_body`` is the same over bytes: ``bytes -> bytes | None`` (None: nothing to change, the body
goes as it came), raising ``NotMapped`` for a body that is not JSON it can read and write back.
A body is parsed with orjson; one holding an integer of 20 digits or more (beyond 64 bits,
which orjson would read as a float) is read and written with the standard library instead, so
that numbers keep every digit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

__all__ = ["JsonMapping", "NotMapped", "Path", "Step", "dump_json", "load_json", "parse_path"]

Step = str | int | None
"""One step of a path: an object's field (str), an array index (int, negative from the end), or
every element of an array (None, written ``[*]``)."""
Path = tuple[Step, ...]

_NAME: Final = re.compile(r"[^.\[\]]+")
_INDEX: Final = re.compile(r"\[(\*|-?[0-9]+)\]")
_LONG_INTEGER: Final = re.compile(rb"[0-9]{20}")
_MISSING: Final = object()


class NotMapped(ValueError):
    """A body the mapping leaves as it is: ``reason`` is ``malformed`` (not JSON, or not UTF-8) or
    ``too_deep`` (nested deeper than can be written back)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_path(text: str) -> Path:
    """The steps of a field path; a ValueError says what is wrong with it."""
    if not text:
        raise ValueError("a field path cannot be empty")
    steps: list[Step] = []
    position = 0
    while position < len(text):
        char = text[position]
        if char == "[":
            index = _INDEX.match(text, position)
            if index is None:
                raise ValueError(f"{text!r}: an index is written [N], [-N] or [*]")
            steps.append(None if index.group(1) == "*" else int(index.group(1)))
            position = index.end()
            continue
        if char == ".":
            if not steps:
                raise ValueError(f"{text!r}: a path starts with a field name or an index")
            position += 1
        elif steps:
            raise ValueError(f"{text!r}: a field or an index is followed by . or [ (items[0].id)")
        name = _NAME.match(text, position)
        if name is None:
            raise ValueError(f"{text!r}: a field name cannot be empty")
        steps.append(name.group(0))
        position = name.end()
    return tuple(steps)


def path_text(path: Path) -> str:
    """A path written back as text (for messages)."""
    out = ""
    for step in path:
        if isinstance(step, str):
            out += f".{step}" if out else step
        else:
            out += "[*]" if step is None else f"[{step}]"
    return out


@dataclass(frozen=True, slots=True)
class JsonMapping:
    """Compiled operations; ``apply`` runs them over a parsed document, ``map_body`` over bytes."""

    remove: Sequence[Path] = ()
    rename: Sequence[tuple[Path, str]] = ()
    move: Sequence[tuple[Path, Path]] = ()
    copy: Sequence[tuple[Path, Path]] = ()
    set: Sequence[tuple[Path, Any]] = ()

    @property
    def empty(self) -> bool:
        return not (self.remove or self.rename or self.move or self.copy or self.set)

    def apply(self, document: Any) -> bool:
        """Run the operations over ``document`` in place; whether anything changed. Never raises."""
        changed = False
        for path in self.remove:
            changed |= _remove(document, path)
        for path, name in self.rename:
            changed |= _rename(document, path, name)
        for source, destination in self.move:
            changed |= _transfer(document, source, destination, keep=False)
        for source, destination in self.copy:
            changed |= _transfer(document, source, destination, keep=True)
        for path, value in self.set:
            changed |= _set(document, path, value)
        return changed

    def map_body(self, body: bytes) -> bytes | None:
        """The mapped body, or None when nothing changed; ``NotMapped`` when it cannot be read or
        written back as JSON."""
        document, exact = load_json(body)
        if not self.apply(document):
            return None
        return dump_json(document, exact)


def load_json(body: bytes) -> tuple[Any, bool]:
    """The document ``body`` holds, and whether it must be written back exactly (it holds an
    integer beyond 64 bits); ``NotMapped`` when it is not JSON that can be read."""
    exact = _LONG_INTEGER.search(body) is not None
    return (_load_exact(body) if exact else _load(body)), exact


def dump_json(document: Any, exact: bool = False) -> bytes:
    """``document`` as compact UTF-8 JSON; ``NotMapped("too_deep")`` when it nests deeper than can
    be written. ``exact`` (``load_json`` said so) writes it with the standard library."""
    return _dump_exact(document) if exact else _dump(document)


def _load(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise NotMapped("malformed") from None


def _dump(document: Any) -> bytes:
    try:
        return orjson.dumps(document)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (it reads deeper)
        raise NotMapped("too_deep") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _load_exact(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise NotMapped("too_deep") from None
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise NotMapped("malformed") from None


def _dump_exact(document: Any) -> bytes:
    try:
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except RecursionError:
        raise NotMapped("too_deep") from None
    except ValueError:  # a lone surrogate escape cannot be written as UTF-8
        raise NotMapped("malformed") from None


# -- walking -------------------------------------------------------------------------------------------


def _creatable_from(path: Path) -> int:
    """The first step from which missing objects may be created: after the last index, so that an
    object is never made where an array was meant."""
    for position in range(len(path) - 1, -1, -1):
        if not isinstance(path[position], str):
            return position + 1
    return 0


def _targets(document: Any, path: Path, create: bool) -> list[tuple[Any, str | int]]:
    """The (container, key or index) pairs ``path`` reaches; with ``create``, missing objects on
    the way are made (only where fields, not indexes, follow)."""
    nodes = [document]
    creatable = _creatable_from(path) if create else len(path)
    for position in range(len(path) - 1):
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
                    child = node[step] = {}
                if child is not _MISSING:
                    reached.append(child)
        if not reached:
            return []
        nodes = reached
    last = path[-1]
    pairs: list[tuple[Any, str | int]] = []
    for node in nodes:
        if last is None:
            if isinstance(node, list):
                pairs.extend((node, index) for index in range(len(node)))
        elif isinstance(last, int):
            if isinstance(node, list) and -len(node) <= last < len(node):
                pairs.append((node, last))
        elif isinstance(node, dict):
            pairs.append((node, last))
    return pairs


def _remove(document: Any, path: Path) -> bool:
    changed = False
    if path[-1] is None:  # every element: the arrays are emptied
        for container in _distinct(_targets(document, path, False)):
            if container:
                container.clear()
                changed = True
        return changed
    for container, key in _targets(document, path, False):
        if isinstance(container, dict):
            if key in container:
                del container[key]
                changed = True
        else:
            del container[key]
            changed = True
    return changed


def _distinct(pairs: list[tuple[Any, str | int]]) -> list[Any]:
    seen: dict[int, Any] = {}
    for container, _ in pairs:
        seen.setdefault(id(container), container)
    return list(seen.values())


def _rename(document: Any, path: Path, name: str) -> bool:
    changed = False
    for container, key in _targets(document, path, False):
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


def _transfer(document: Any, source: Path, destination: Path, keep: bool) -> bool:
    """Copy or move the one value at ``source`` to ``destination``. A move takes the value out
    first (as JSON Patch's move does), so a destination inside it cannot make a cycle; when the
    destination cannot be reached, the value goes back where it was."""
    found = _targets(document, source, False)
    if len(found) != 1:
        return False
    container, key = found[0]
    value = container.get(key, _MISSING) if isinstance(container, dict) else container[key]
    if value is _MISSING:
        return False
    if keep:
        return _set(document, destination, _copy(value), fresh=True)
    del container[key]
    if _set(document, destination, value, fresh=True):
        return True
    if isinstance(container, dict):
        container[key] = value
    else:
        assert isinstance(key, int)
        container.insert(key if key >= 0 else len(container) + 1 + key, value)
    return False


def _set(document: Any, path: Path, value: Any, fresh: bool = False) -> bool:
    """Put ``value`` at every place ``path`` reaches; a copy each unless it is ``fresh`` (made for
    this document) and goes to one place: a configured value is never handed to a document."""
    targets = _targets(document, path, True)
    for container, key in targets:
        container[key] = value if fresh and len(targets) == 1 else _copy(value)
    return bool(targets)


def _copy(value: Any) -> Any:
    """A deep copy of a JSON value, without recursion (documents may nest deeply)."""
    if not isinstance(value, dict | list):
        return value
    root: Any = {} if isinstance(value, dict) else []
    pending: list[tuple[Any, Any]] = [(value, root)]
    while pending:
        source, target = pending.pop()
        items = source.items() if isinstance(source, dict) else enumerate(source)
        for key, item in items:
            if isinstance(item, dict | list):
                fresh: Any = {} if isinstance(item, dict) else []
                pending.append((item, fresh))
                item = fresh
            if isinstance(target, dict):
                target[key] = item
            else:
                target.append(item)
    return root
