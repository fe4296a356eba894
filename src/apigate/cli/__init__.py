"""The `apigate` command: run a gateway, check a config, manage consumers, API keys, revoked
tokens, rate-limit counters, cached responses and webhook events, and read usage analytics. Each
command group has its module here; `output` and `context` are what they share."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from apigate import __version__
from apigate.cli import cache, consumers, hash_password, keys, limits, run, tokens, usage, webhooks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apigate", description="A self-hosted API gateway and webhook handler."
    )
    parser.add_argument("--version", action="version", version=f"apigate {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("APIGATE_LOG_LEVEL", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)
    for group in (run, hash_password, consumers, keys, tokens, limits, cache, webhooks, usage):
        group.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return args.func(args)
