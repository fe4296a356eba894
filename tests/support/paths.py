"""How a typical upstream reads a request path, for tests that check the gateway routes alike."""

from __future__ import annotations

from urllib.parse import unquote_to_bytes


def upstream_decoding(path: str) -> str:
    """The path as a servlet container maps it: ``;`` parameters stripped from each raw segment,
    then fully percent-decoded once, a backslash read as ``/``, dot segments removed and empty
    segments dropped (a trailing slash kept)."""
    stripped = "/".join(segment.partition(";")[0] for segment in path.split("/"))
    decoded = unquote_to_bytes(stripped).decode("latin-1").replace("\\", "/")
    kept: list[str] = []
    for segment in decoded.split("/"):
        if segment == "..":
            kept = kept[:-1]
        elif segment not in ("", "."):
            kept.append(segment)
    trailing = decoded.endswith(("/", "/.", "/..")) and kept
    return "/" + "/".join(kept) + ("/" if trailing else "")
