"""`apigate keys create|list|revoke|rotate`: a consumer's API keys (a new key is printed once)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from apigate.cli.context import StoreCommands, run_store_command
from apigate.cli.output import EXIT_OK, report, table, when

if TYPE_CHECKING:
    from apigate.consumers.service import ConsumerService, NewKey
    from apigate.store.roles.consumers import ApiKey


def add_commands(commands: Any) -> None:
    keys = StoreCommands(commands, "keys", "create, list, revoke and rotate API keys", cmd_keys)
    create = keys.action("create", "create a key (printed once)")
    create.add_argument("consumer_id")
    create.add_argument("--scope", action="append", metavar="S", help="a scope (repeat for more)")
    create.add_argument("--cidr", action="append", metavar="C", help="allowed client network (repeatable)")
    create.add_argument(
        "--window",
        action="append",
        metavar="W",
        help='allowed time window in UTC, e.g. "mon-fri 08:00-18:00"',
    )
    create.add_argument("--expires", metavar="WHEN", help="ISO 8601 time (UTC unless given) or 30d, 12h...")
    keys.action("list", "list keys (never the keys themselves)").add_argument("consumer_id", nargs="?")
    keys.action("revoke", "revoke a key now").add_argument("key_id")
    rotate = keys.action("rotate", "new key; the old one ends after --grace")
    rotate.add_argument("key_id")
    rotate.add_argument("--grace", default="24h", help="how long the old key stays valid (default 24h)")


def key_table(keys: list[ApiKey]) -> str:
    """Keys as a table: their prefix, never the keys themselves."""
    from apigate.consumers.service import key_status

    rows = [
        [
            k.id,
            k.consumer_id,
            k.prefix + "...",
            key_status(k),
            ",".join(k.scopes) or "-",
            when(k.expires_at),
            when(k.revoked_at),
        ]
        for k in keys
    ]
    return table(rows, ["ID", "CONSUMER", "PREFIX", "STATUS", "SCOPES", "EXPIRES", "REVOKED"])


def _created(new: NewKey) -> str:
    return f"created API key {new.key.id} for consumer {new.key.consumer_id}:\n  {new.plaintext}"


def _new_key_warning() -> None:
    print("apigate: store this API key now: it is not kept and will not be shown again.", file=sys.stderr)


def cmd_keys(args: argparse.Namespace) -> int:
    return run_store_command(args, keys_action)


async def keys_action(args: argparse.Namespace, service: ConsumerService) -> int:
    from apigate.consumers.service import key_dict, parse_duration, parse_expiry

    if args.action == "create":
        expires = parse_expiry(args.expires) if args.expires else None
        new = await service.create_key(
            args.consumer_id,
            scopes=args.scope or (),
            allowed_cidrs=args.cidr or (),
            time_windows=args.window or (),
            expires_at=expires,
        )
        report(args.json, {**key_dict(new.key), "key": new.plaintext}, _created(new))
        _new_key_warning()
    elif args.action == "list":
        keys = await service.list_keys(args.consumer_id)
        report(args.json, [key_dict(k) for k in keys], key_table(keys))
    elif args.action == "revoke":
        key = await service.revoke_key(args.key_id)
        text = f"revoked API key {key.id} of consumer {key.consumer_id} at {when(key.revoked_at)}"
        report(args.json, key_dict(key), text)
    else:  # rotate
        new, old = await service.rotate_key(args.key_id, grace=parse_duration(args.grace))
        value = {**key_dict(new.key), "key": new.plaintext, "old": key_dict(old)}
        text = f"{_created(new)}\nthe old key {old.id} stays valid until {when(old.revoked_at)}"
        report(args.json, value, text)
        _new_key_warning()
    return EXIT_OK
