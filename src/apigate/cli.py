"""The `apigate` command: run a gateway, check a config, manage consumers, API keys and revoked tokens."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from apigate import __version__

if TYPE_CHECKING:
    from apigate.config.models import GatewayConfig
    from apigate.consumers.service import ConsumerService
    from apigate.store.roles.consumers import ApiKey, Consumer
    from apigate.store.roles.tokens import RevokedToken


def _config_path(given: str | None) -> Path | None:
    """-c wins; then $ROUTES_CONFIG; then ./apigate.yaml; else None (the embedded demo)."""
    if given:
        return Path(given)
    if os.environ.get("ROUTES_CONFIG"):
        return Path(os.environ["ROUTES_CONFIG"])
    local = Path("apigate.yaml")
    return local if local.exists() else None


def cmd_run(args: argparse.Namespace) -> int:
    from apigate.process import ConfigSource, run

    path = _config_path(args.config)
    if path is not None and not path.exists():
        print(f"apigate: config file {path} does not exist", file=sys.stderr)
        return 2
    return run(ConfigSource(path), args.workers)


def cmd_check(args: argparse.Namespace) -> int:
    from apigate.config.loader import ConfigError, load_config

    path = _config_path(args.config)
    if path is None:
        print("apigate: no config to check (give -c FILE)", file=sys.stderr)
        return 2
    try:
        config = load_config(path)
    except ConfigError as exc:
        count = len(exc.issues)
        print(f"{path}: {count} problem{'s' if count != 1 else ''}", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return 1
    print(f"{path}: OK ({len(config.routes)} routes, {len(config.upstreams)} upstreams)")
    return 0


def cmd_hash_password(args: argparse.Namespace) -> int:
    """Print a basic-auth password hash for a consumer's `password_hash` in the config."""
    from apigate.consumers.passwords import hash_password

    password = _read_secret("password")
    if password is None:
        return 1
    print(hash_password(password))
    return 0


def _read_secret(what: str) -> str | None:
    """A password or secret from a prompt (asked twice) on a terminal, else stdin's first line;
    never from the command line, where other users could read it. None (reported) if unusable."""
    if sys.stdin.isatty():
        import getpass

        secret = getpass.getpass(f"{what.capitalize()}: ")
        if getpass.getpass("Again: ") != secret:
            print(f"apigate: the {what}s differ", file=sys.stderr)
            return None
    else:
        secret = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if not secret:
        print(f"apigate: the {what} is empty", file=sys.stderr)
        return None
    return secret


# -- consumers and keys ------------------------------------------------------------------------------
class CliError(Exception):
    """A problem to report in one line (exit 1), without a traceback."""


def _store_and_state_urls(args: argparse.Namespace) -> tuple[str, str]:
    """--store and --state win; else the config's store.url and state.url (-c, $ROUTES_CONFIG,
    ./apigate.yaml); else the defaults. --store alone bypasses the config for both."""
    from apigate.config.models import StateConfig, StoreConfig

    if args.store:
        return args.store, args.state or StateConfig().url
    config = _config_for_store(args)
    store_url = config.store.url if config is not None else StoreConfig().url
    state_url = config.state.url if config is not None else StateConfig().url
    return store_url, args.state or state_url


def _config_for_store(args: argparse.Namespace) -> GatewayConfig | None:
    path = _config_path(args.config)
    if path is None:
        return None
    if not path.exists():
        raise CliError(f"config file {path} does not exist")
    from apigate.config.loader import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        raise CliError(f"the config {path} is not valid (use --store URL to bypass it):\n{exc}") from None


def _shown_url(url: str) -> str:
    """The store URL without a password, for messages."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url


def _run_store_command(args: argparse.Namespace, action: Callable[[ConsumerService], Awaitable[int]]) -> int:
    from apigate.consumers.service import ConsumerError, ConsumerService
    from apigate.state import open_state
    from apigate.store import open_store

    async def main(url: str, state_url: str) -> int:
        store = open_store(url)
        # Only a shared backend (Redis) carries change notices to running gateways.
        state = open_state(state_url)
        try:
            await store.open()
        except Exception as exc:
            raise CliError(f"cannot open the store {_shown_url(url)}: {exc}") from None
        try:
            if state.shared:
                await state.open()
            return await action(ConsumerService(store, state=state if state.shared else None))
        finally:
            await store.close()
            await state.close()

    try:
        url, state_url = _store_and_state_urls(args)
        return asyncio.run(main(url, state_url))
    except (CliError, ConsumerError) as exc:
        print(f"apigate: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # e.g. an unsupported store URL
        print(f"apigate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        print(f"apigate: the store failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _when(at: float | None) -> str:
    if at is None:
        return "-"
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _table(rows: list[list[str]], header: list[str]) -> str:
    if not rows:
        return "(none)"
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


def _print_json(value: Any) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def _consumer_rows(consumers: list[Consumer]) -> str:
    rows = [
        [c.id, c.tenant or "-", ",".join(c.groups) or "-", "yes" if c.disabled else "no", _when(c.created_at)]
        for c in consumers
    ]
    return _table(rows, ["ID", "TENANT", "GROUPS", "DISABLED", "CREATED"])


def _key_rows(keys: list[ApiKey]) -> str:
    from apigate.consumers.service import key_status

    rows = [
        [
            k.id,
            k.consumer_id,
            k.prefix + "...",
            key_status(k),
            ",".join(k.scopes) or "-",
            _when(k.expires_at),
            _when(k.revoked_at),
        ]
        for k in keys
    ]
    return _table(rows, ["ID", "CONSUMER", "PREFIX", "STATUS", "SCOPES", "EXPIRES", "REVOKED"])


def _new_key_warning() -> None:
    print(
        "apigate: store this API key now: it is not kept and will not be shown again.",
        file=sys.stderr,
    )


def cmd_consumers(args: argparse.Namespace) -> int:
    from apigate.consumers.service import consumer_dict, credential_dict, key_dict, parse_metadata

    secret = None
    if args.action in ("set-secret", "set-password"):
        secret = _read_secret("client secret" if args.action == "set-secret" else "password")
        if secret is None:
            return 1

    async def action(service: ConsumerService) -> int:
        if args.action in ("set-secret", "set-password"):
            assert secret is not None
            if args.action == "set-secret":
                credential = await service.set_secret(args.id, secret, args.scope or ())
            else:
                credential = await service.set_password(args.id, args.username, secret, args.scope or ())
            if args.json:
                _print_json(credential_dict(credential))
            else:
                print(f"set the {credential.kind} {credential.id} of consumer {credential.consumer_id}")
        elif args.action == "create":
            consumer = await service.create_consumer(
                args.id, tenant=args.tenant, groups=args.group or (), metadata=parse_metadata(args.meta or ())
            )
            if args.json:
                _print_json(consumer_dict(consumer))
            else:
                print(f"created consumer {consumer.id}")
        elif args.action == "list":
            consumers = await service.list_consumers(args.tenant)
            if args.json:
                _print_json([consumer_dict(c) for c in consumers])
            else:
                print(_consumer_rows(consumers))
        elif args.action == "show":
            consumer = await service.get_consumer(args.id)
            keys = await service.list_keys(args.id)
            if args.json:
                _print_json({**consumer_dict(consumer), "keys": [key_dict(k) for k in keys]})
            else:
                print(f"id:        {consumer.id}")
                print(f"tenant:    {consumer.tenant or '-'}")
                print(f"groups:    {', '.join(consumer.groups) or '-'}")
                meta = ", ".join(f"{k}={v}" for k, v in consumer.metadata.items())
                print(f"metadata:  {meta or '-'}")
                print(f"disabled:  {'yes' if consumer.disabled else 'no'}")
                print(f"created:   {_when(consumer.created_at)}")
                print(f"keys:\n{_key_rows(keys)}")
        else:  # delete
            await service.delete_consumer(args.id)
            if args.json:
                _print_json({"deleted": args.id})
            else:
                print(f"deleted consumer {args.id} and its API keys")
        return 0

    return _run_store_command(args, action)


def cmd_keys(args: argparse.Namespace) -> int:
    from apigate.consumers.service import key_dict, parse_duration, parse_expiry

    async def action(service: ConsumerService) -> int:
        if args.action == "create":
            expires = parse_expiry(args.expires) if args.expires else None
            new = await service.create_key(
                args.consumer_id,
                scopes=args.scope or (),
                allowed_cidrs=args.cidr or (),
                time_windows=args.window or (),
                expires_at=expires,
            )
            if args.json:
                _print_json({**key_dict(new.key), "key": new.plaintext})
            else:
                print(f"created API key {new.key.id} for consumer {new.key.consumer_id}:")
                print(f"  {new.plaintext}")
            _new_key_warning()
        elif args.action == "list":
            keys = await service.list_keys(args.consumer_id)
            if args.json:
                _print_json([key_dict(k) for k in keys])
            else:
                print(_key_rows(keys))
        elif args.action == "revoke":
            key = await service.revoke_key(args.key_id)
            if args.json:
                _print_json(key_dict(key))
            else:
                print(f"revoked API key {key.id} of consumer {key.consumer_id} at {_when(key.revoked_at)}")
        else:  # rotate
            new, old = await service.rotate_key(args.key_id, grace=parse_duration(args.grace))
            if args.json:
                _print_json({**key_dict(new.key), "key": new.plaintext, "old": key_dict(old)})
            else:
                print(f"created API key {new.key.id} for consumer {new.key.consumer_id}:")
                print(f"  {new.plaintext}")
                print(f"the old key {old.id} stays valid until {_when(old.revoked_at)}")
            _new_key_warning()
        return 0

    return _run_store_command(args, action)


def _parse_until(text: str) -> float:
    """A bare number is unix seconds (a JWT's exp); else an ISO 8601 time or a duration (30d)."""
    from apigate.consumers.service import parse_expiry

    try:
        return float(text)
    except ValueError:
        return parse_expiry(text)


def _revoked_rows(tokens: list[RevokedToken]) -> str:
    rows = [[t.jti, _when(t.expires_at), _when(t.created_at), t.reason or "-"] for t in tokens]
    return _table(rows, ["JTI", "UNTIL", "REVOKED", "REASON"])


def cmd_tokens(args: argparse.Namespace) -> int:
    from apigate.consumers.service import revoked_token_dict

    async def action(service: ConsumerService) -> int:
        if args.action == "revoke":
            until = _parse_until(args.until) if args.until else None
            token = await service.revoke_token(args.jti, until=until, reason=args.reason)
            if args.json:
                _print_json(revoked_token_dict(token))
            else:
                print(f"revoked tokens with jti {token.jti} until {_when(token.expires_at)}")
        else:  # list
            tokens = await service.list_revoked_tokens()
            if args.json:
                _print_json([revoked_token_dict(t) for t in tokens])
            else:
                print(_revoked_rows(tokens))
        return 0

    return _run_store_command(args, action)


def _add_store_commands(commands: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help="read store.url from this config (default: like `run`)")
    common.add_argument("--store", help="store URL (sqlite:///file.db, postgresql://...); overrides -c")
    common.add_argument("--state", help="state URL (redis://...) to announce changes on; overrides -c")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")

    consumers = commands.add_parser("consumers", help="create, list, show and delete consumers")
    actions = consumers.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", parents=[common], help="create a consumer")
    create.add_argument("id", help="1-200 characters: letters, digits and . _ : @ + -")
    create.add_argument("--tenant", help="the tenant the consumer belongs to")
    create.add_argument("--group", action="append", metavar="G", help="a group (repeat for more)")
    create.add_argument("--meta", action="append", metavar="K=V", help="metadata entry (repeat for more)")
    listing = actions.add_parser("list", parents=[common], help="list consumers")
    listing.add_argument("--tenant", help="only this tenant's consumers")
    show = actions.add_parser("show", parents=[common], help="a consumer and its API keys")
    show.add_argument("id")
    delete = actions.add_parser("delete", parents=[common], help="delete a consumer and its API keys")
    delete.add_argument("id")
    set_secret = actions.add_parser(
        "set-secret",
        parents=[common],
        help="set the consumer's client secret for oauth2-token (read from stdin or a prompt)",
    )
    set_secret.add_argument("id")
    set_secret.add_argument("--scope", action="append", metavar="S", help="a scope tokens may carry (repeat)")
    set_password = actions.add_parser(
        "set-password",
        parents=[common],
        help="set a login's password for oauth2-token and basic-auth (read from stdin or a prompt)",
    )
    set_password.add_argument("id")
    set_password.add_argument("username", help="the login name: letters, digits and . _ @ + -")
    set_password.add_argument(
        "--scope", action="append", metavar="S", help="a scope tokens may carry (repeat)"
    )
    consumers.set_defaults(func=cmd_consumers)

    keys = commands.add_parser("keys", help="create, list, revoke and rotate API keys")
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", parents=[common], help="create a key (printed once)")
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
    listing = actions.add_parser("list", parents=[common], help="list keys (never the keys themselves)")
    listing.add_argument("consumer_id", nargs="?")
    revoke = actions.add_parser("revoke", parents=[common], help="revoke a key now")
    revoke.add_argument("key_id")
    rotate = actions.add_parser("rotate", parents=[common], help="new key; the old one ends after --grace")
    rotate.add_argument("key_id")
    rotate.add_argument("--grace", default="24h", help="how long the old key stays valid (default 24h)")
    keys.set_defaults(func=cmd_keys)

    tokens = commands.add_parser("tokens", help="revoke JWTs by jti and list the revoked ones")
    actions = tokens.add_subparsers(dest="action", required=True, metavar="ACTION")
    revoke = actions.add_parser("revoke", parents=[common], help="refuse tokens with this jti from now on")
    revoke.add_argument("jti")
    revoke.add_argument(
        "--until",
        metavar="WHEN",
        help="the token's exp (unix seconds), ISO 8601 or 30d...; default: for good",
    )
    revoke.add_argument("--reason", help="why (shown by `tokens list`)")
    actions.add_parser("list", parents=[common], help="list revoked jtis (expired ones are purged)")
    tokens.set_defaults(func=cmd_tokens)

    # -- webhooks (the commands live with the webhooks package) --
    from apigate.webhooks.cli import add_webhook_commands

    add_webhook_commands(commands, common, _run_store_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apigate", description="A self-hosted API gateway and webhook handler."
    )
    parser.add_argument("--version", action="version", version=f"apigate {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("APIGATE_LOG_LEVEL", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="start the gateway")
    run.add_argument("-c", "--config", help="YAML config (default: ./apigate.yaml, else the embedded demo)")
    run.add_argument("--workers", type=int, default=None, help="worker processes (default: the config's)")
    run.set_defaults(func=cmd_run)

    check = commands.add_parser("check", help="validate a config file and report every problem")
    check.add_argument("-c", "--config", help="YAML config to check")
    check.set_defaults(func=cmd_check)

    hashing = commands.add_parser(
        "hash-password", help="read a password (stdin, or a prompt) and print its basic-auth hash"
    )
    hashing.set_defaults(func=cmd_hash_password)
    _add_store_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if getattr(args, "workers", None) is not None and args.workers < 1:
        print("apigate: --workers must be at least 1", file=sys.stderr)
        return 2
    return args.func(args)
