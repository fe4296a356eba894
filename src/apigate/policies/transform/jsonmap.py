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

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from apigate.policies.transform.bodymap import NotMapped, Operations, dump, has_long_integer, load

__all__ = ["JsonMapping", "NotMapped", "Path", "Step", "dump_json", "load_json", "parse_path"]

Step = str | int | None
"""One step of a path: an object's field (str), an array index (int, negative from the end), or
every element of an array (None, written ``[*]``)."""
Path = tuple[Step, ...]

_NAME: Final = re.compile(r"[^.\[\]]+")
_INDEX: Final = re.compile(r"\[(\*|-?[0-9]+)\]")


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
    """Compiled operations; ``apply`` runs them over a parsed document, ``map_body`` over bytes.
    Both run in ``bodymap.py`` (compiled with mypyc), over the operations made once here."""

    remove: Sequence[Path] = ()
    rename: Sequence[tuple[Path, str]] = ()
    move: Sequence[tuple[Path, Path]] = ()
    copy: Sequence[tuple[Path, Path]] = ()
    set: Sequence[tuple[Path, Any]] = ()
    operations: Operations = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        operations = Operations(
            list(self.remove), list(self.rename), list(self.move), list(self.copy), list(self.set)
        )
        object.__setattr__(self, "operations", operations)  # frozen: set once, here

    @property
    def empty(self) -> bool:
        return not (self.remove or self.rename or self.move or self.copy or self.set)

    def apply(self, document: Any) -> bool:
        """Run the operations over ``document`` in place; whether anything changed. Never raises."""
        return self.operations.apply(document)

    def map_body(self, body: bytes) -> bytes | None:
        """The mapped body, or None when nothing changed; ``NotMapped`` when it cannot be read or
        written back as JSON."""
        return self.operations.map_body(body)


def load_json(body: bytes) -> tuple[Any, bool]:
    """The document ``body`` holds, and whether it must be written back exactly (it holds an
    integer beyond 64 bits); ``NotMapped`` when it is not JSON that can be read."""
    exact = has_long_integer(body)
    return load(body, exact), exact


def dump_json(document: Any, exact: bool = False) -> bytes:
    """``document`` as compact UTF-8 JSON; ``NotMapped("too_deep")`` when it nests deeper than can
    be written. ``exact`` (``load_json`` said so) writes it with the standard library."""
    return dump(document, exact)
