"""What every command prints: tables, JSON for scripts, times, and one-line errors with their exit codes."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any

import orjson

# Exit codes, the same for every command.
EXIT_OK = 0
EXIT_FAILED = 1  # the command ran and could not do what was asked
EXIT_USAGE = 2  # the command line or the files it names are wrong
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


class CliError(Exception):
    """A problem to report in one line (exit 1), without a traceback."""


def error(message: str) -> None:
    """One line on stderr, prefixed with the program's name."""
    print(f"apigate: {message}", file=sys.stderr)


def when(at: float | None) -> str:
    """A unix time in UTC, to the second; "-" for none."""
    if at is None:
        return "-"
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def table(rows: list[list[str]], header: list[str]) -> str:
    """Left-aligned columns two spaces apart; "(none)" for no rows."""
    if not rows:
        return "(none)"
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


def print_json(value: Any) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def report(as_json: bool, value: Any, text: str) -> None:
    """``value`` as JSON for scripts (--json), else ``text`` for people."""
    if as_json:
        print_json(value)
    else:
        print(text)
