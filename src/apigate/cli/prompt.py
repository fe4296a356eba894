"""Reading a password or secret the way no other user can see it."""

from __future__ import annotations

import sys

from apigate.cli.output import error


def read_secret(what: str) -> str | None:
    """A password or secret from a prompt (asked twice) on a terminal, else stdin's first line;
    never from the command line, where other users could read it. None (reported) if unusable."""
    if sys.stdin.isatty():
        import getpass

        secret = getpass.getpass(f"{what.capitalize()}: ")
        if getpass.getpass("Again: ") != secret:
            error(f"the {what}s differ")
            return None
    else:
        secret = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if not secret:
        error(f"the {what} is empty")
        return None
    return secret
