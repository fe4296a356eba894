"""`apigate tokens revoke|list`: JWTs refused by their jti."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from apigate.cli.context import StoreCommands, run_store_command
from apigate.cli.output import EXIT_OK, report, table, when

if TYPE_CHECKING:
    from apigate.consumers.service import ConsumerService
    from apigate.store.roles.tokens import RevokedToken


def add_commands(commands: Any) -> None:
    tokens = StoreCommands(commands, "tokens", "revoke JWTs by jti and list the revoked ones", cmd_tokens)
    revoke = tokens.action("revoke", "refuse tokens with this jti from now on")
    revoke.add_argument("jti")
    revoke.add_argument(
        "--until",
        metavar="WHEN",
        help="the token's exp (unix seconds), ISO 8601 or 30d...; default: for good",
    )
    revoke.add_argument("--reason", help="why (shown by `tokens list`)")
    tokens.action("list", "list revoked jtis (expired ones are purged)")


def parse_until(text: str) -> float:
    """A bare number is unix seconds (a JWT's exp); else an ISO 8601 time or a duration (30d)."""
    from apigate.consumers.service import parse_expiry

    try:
        return float(text)
    except ValueError:
        return parse_expiry(text)


def revoked_table(tokens: list[RevokedToken]) -> str:
    rows = [[t.jti, when(t.expires_at), when(t.created_at), t.reason or "-"] for t in tokens]
    return table(rows, ["JTI", "UNTIL", "REVOKED", "REASON"])


def cmd_tokens(args: argparse.Namespace) -> int:
    return run_store_command(args, tokens_action)


async def tokens_action(args: argparse.Namespace, service: ConsumerService) -> int:
    from apigate.consumers.service import revoked_token_dict

    if args.action == "revoke":
        until = parse_until(args.until) if args.until else None
        token = await service.revoke_token(args.jti, until=until, reason=args.reason)
        text = f"revoked tokens with jti {token.jti} until {when(token.expires_at)}"
        report(args.json, revoked_token_dict(token), text)
    else:  # list
        tokens = await service.list_revoked_tokens()
        report(args.json, [revoked_token_dict(t) for t in tokens], revoked_table(tokens))
    return EXIT_OK
