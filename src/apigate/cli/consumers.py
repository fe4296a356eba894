"""`apigate consumers create|list|show|delete|set-secret|set-password`: the consumers in the store."""

from __future__ import annotations

import argparse
import functools
from typing import TYPE_CHECKING, Any

from apigate.cli.context import StoreCommands, run_store_command
from apigate.cli.keys import key_table
from apigate.cli.output import EXIT_FAILED, EXIT_OK, report, table, when
from apigate.cli.prompt import read_secret

if TYPE_CHECKING:
    from apigate.consumers.service import ConsumerService
    from apigate.store.roles.consumers import Consumer


def add_commands(commands: Any) -> None:
    consumers = StoreCommands(commands, "consumers", "create, list, show and delete consumers", cmd_consumers)
    create = consumers.action("create", "create a consumer")
    create.add_argument("id", help="1-200 characters: letters, digits and . _ : @ + -")
    create.add_argument("--tenant", help="the tenant the consumer belongs to")
    create.add_argument("--group", action="append", metavar="G", help="a group (repeat for more)")
    create.add_argument("--meta", action="append", metavar="K=V", help="metadata entry (repeat for more)")
    consumers.action("list", "list consumers").add_argument("--tenant", help="only this tenant's consumers")
    consumers.action("show", "a consumer and its API keys").add_argument("id")
    consumers.action("delete", "delete a consumer and its API keys").add_argument("id")
    set_secret = consumers.action(
        "set-secret", "set the consumer's client secret for oauth2-token (read from stdin or a prompt)"
    )
    set_secret.add_argument("id")
    set_secret.add_argument("--scope", action="append", metavar="S", help="a scope tokens may carry (repeat)")
    set_password = consumers.action(
        "set-password", "set a login's password for oauth2-token and basic-auth (read from stdin or a prompt)"
    )
    set_password.add_argument("id")
    set_password.add_argument("username", help="the login name: letters, digits and . _ @ + -")
    set_password.add_argument(
        "--scope", action="append", metavar="S", help="a scope tokens may carry (repeat)"
    )


def consumer_table(consumers: list[Consumer]) -> str:
    rows = [
        [c.id, c.tenant or "-", ",".join(c.groups) or "-", "yes" if c.disabled else "no", when(c.created_at)]
        for c in consumers
    ]
    return table(rows, ["ID", "TENANT", "GROUPS", "DISABLED", "CREATED"])


def cmd_consumers(args: argparse.Namespace) -> int:
    if args.action not in ("set-secret", "set-password"):
        return run_store_command(args, consumers_action)
    # The secret is read before the store opens: a prompt does not hold a connection.
    secret = read_secret("client secret" if args.action == "set-secret" else "password")
    if secret is None:
        return EXIT_FAILED

    return run_store_command(args, functools.partial(set_credential, secret=secret))


async def set_credential(args: argparse.Namespace, service: ConsumerService, secret: str) -> int:
    from apigate.consumers.service import credential_dict

    if args.action == "set-secret":
        credential = await service.set_secret(args.id, secret, args.scope or ())
    else:
        credential = await service.set_password(args.id, args.username, secret, args.scope or ())
    text = f"set the {credential.kind} {credential.id} of consumer {credential.consumer_id}"
    report(args.json, credential_dict(credential), text)
    return EXIT_OK


async def consumers_action(args: argparse.Namespace, service: ConsumerService) -> int:
    from apigate.consumers.service import consumer_dict, key_dict, parse_metadata

    if args.action == "create":
        consumer = await service.create_consumer(
            args.id, tenant=args.tenant, groups=args.group or (), metadata=parse_metadata(args.meta or ())
        )
        report(args.json, consumer_dict(consumer), f"created consumer {consumer.id}")
    elif args.action == "list":
        consumers = await service.list_consumers(args.tenant)
        report(args.json, [consumer_dict(c) for c in consumers], consumer_table(consumers))
    elif args.action == "show":
        consumer = await service.get_consumer(args.id)
        keys = await service.list_keys(args.id)
        meta = ", ".join(f"{k}={v}" for k, v in consumer.metadata.items())
        text = "\n".join(
            [
                f"id:        {consumer.id}",
                f"tenant:    {consumer.tenant or '-'}",
                f"groups:    {', '.join(consumer.groups) or '-'}",
                f"metadata:  {meta or '-'}",
                f"disabled:  {'yes' if consumer.disabled else 'no'}",
                f"created:   {when(consumer.created_at)}",
                f"keys:\n{key_table(keys)}",
            ]
        )
        report(args.json, {**consumer_dict(consumer), "keys": [key_dict(k) for k in keys]}, text)
    else:  # delete
        await service.delete_consumer(args.id)
        report(args.json, {"deleted": args.id}, f"deleted consumer {args.id} and its API keys")
    return EXIT_OK
