"""`apigate hash-password`: a basic-auth password hash for a consumer's `password_hash` in the config."""

from __future__ import annotations

import argparse
from typing import Any

from apigate.cli.output import EXIT_FAILED, EXIT_OK
from apigate.cli.prompt import read_secret


def add_commands(commands: Any) -> None:
    hashing = commands.add_parser(
        "hash-password", help="read a password (stdin, or a prompt) and print its basic-auth hash"
    )
    hashing.set_defaults(func=cmd_hash_password)


def cmd_hash_password(args: argparse.Namespace) -> int:
    from apigate.consumers.passwords import hash_password

    password = read_secret("password")
    if password is None:
        return EXIT_FAILED
    print(hash_password(password))
    return EXIT_OK
