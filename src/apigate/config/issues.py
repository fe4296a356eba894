"""One problem with a config, located by its field path: what the loader, the cross-model checks
and the policy registry report. A leaf: every layer that validates config may import it."""

from __future__ import annotations

from pydantic import BaseModel


class ConfigIssue(BaseModel):
    """One problem with a config, located by its field path (and line, once the loader knows it)."""

    loc: tuple[str | int, ...]
    message: str
    line: int | None = None

    def path(self) -> str:
        out = ""
        for part in self.loc:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
        return out or "(top level)"

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.path()}: {self.message}"
