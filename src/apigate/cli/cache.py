"""`apigate cache purge`: drop cached responses everywhere the gateway keeps them.

With Redis in ``state.url`` (or ``--state``) the entries go from Redis and a notice on Redis
reaches every worker of every node (policies/cache/purge.py). With ``state: memory://`` the
workers of a node share no channel: the command asks the node's admin listener (``admin.listen``
and ``admin.token`` of the config, or ``--admin URL`` and ``$APIGATE_ADMIN_TOKEN``), which asks
each worker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

import orjson

from apigate.cli.context import config_path
from apigate.cli.output import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CliError, error, report

if TYPE_CHECKING:
    from apigate.config.models import GatewayConfig
    from apigate.policies.cache.purge import Purge

ADMIN_TIMEOUT = 10.0


def add_commands(commands: Any) -> None:
    group = commands.add_parser("cache", help="purge cached responses (every worker, every node)")
    group.set_defaults(func=cmd_cache)
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    purge = actions.add_parser(
        "purge", help="drop cached responses: --all, --route NAME, --prefix /path or --url URL"
    )
    what = purge.add_mutually_exclusive_group(required=True)
    what.add_argument("--all", action="store_true", help="every cached response")
    what.add_argument("--route", help="the responses a route stored (its name, or its path if unnamed)")
    what.add_argument("--prefix", help="the responses whose path starts with this (/catalog/)")
    what.add_argument("--url", help="one URL's responses, every variant and caller: http://host/path?q")
    purge.add_argument("--host", help="with --prefix: only on this host (as clients send it in Host)")
    purge.add_argument("-c", "--config", help="the gateway's config (default: like `run`)")
    purge.add_argument("--state", help="state URL (redis://...); overrides the config's state.url")
    purge.add_argument(
        "--admin", help="the node's admin listener (http://127.0.0.1:8001) when state is memory://"
    )
    purge.add_argument("--json", action="store_true", help="print JSON for scripts")


def cmd_cache(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    from apigate.policies.cache.purge import PurgeError
    from apigate.state import StateUnavailable

    try:
        what = _what(args)
    except PurgeError as exc:
        error(str(exc))
        return EXIT_USAGE
    try:
        config = _config(args)
        if args.route is not None and config is not None:
            _check_route(config, args.route)
        state_url = args.state or (config.state.url if config is not None else "memory://")
        if state_url != "memory://":
            answer = asyncio.run(_purge_on_redis(what, state_url))
        else:
            answer = _purge_through_admin(args, config, what)
    except (CliError, ValueError) as exc:  # ValueError: a state URL that cannot be read
        error(str(exc))
        return EXIT_FAILED
    except (RedisError, StateUnavailable, OSError) as exc:
        error(f"Redis did not answer, nothing was purged there: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    report(args.json, answer, answer.pop("text"))
    return EXIT_OK


def _what(args: argparse.Namespace) -> Purge:
    from apigate.policies.cache.purge import (
        PurgeError,
        purge_everything,
        purge_prefix,
        purge_route,
        purge_url,
    )

    if args.host is not None and args.prefix is None:
        raise PurgeError("--host goes with --prefix (a --url names its host)")
    if args.all:
        return purge_everything()
    if args.route is not None:
        return purge_route(args.route)
    if args.prefix is not None:
        return purge_prefix(args.prefix, args.host)
    return purge_url(args.url)


def _config(args: argparse.Namespace) -> GatewayConfig | None:
    """The gateway's config, found as `run` finds it; None when there is none and --state or
    --admin says where to go."""
    from apigate.config.loader import ConfigError, load_config

    path = config_path(args.config)
    if path is None or not path.exists():
        if args.state or args.admin:
            return None
        raise CliError("give the gateway's config with -c FILE (or --state URL, or --admin URL)")
    try:
        return load_config(path)
    except ConfigError as exc:
        raise CliError(f"the config {path} is not valid:\n{exc}") from None


def _check_route(config: GatewayConfig, route: str) -> None:
    names = [r.display_name for r in config.routes]
    if route not in names:
        raise CliError(f"no route named {route!r} (routes: {', '.join(names) or 'none'})")


async def _purge_on_redis(what: Purge, state_url: str) -> dict[str, Any]:
    from apigate.policies.cache.purge import purge
    from apigate.state import open_state
    from apigate.state.redis import describe

    state = open_state(state_url)
    await state.open()
    try:
        await state.ping()
        done = await purge(what, state)
    finally:
        await state.close()
    where = describe(state_url)
    return {
        "purge": what.describe(),
        "redis_entries_removed": done.redis,
        "announced_on": where,
        "text": f"purged {what.describe()}: {done.redis} entries removed from Redis at {where}; "
        "every gateway on it was told",
    }


def _purge_through_admin(
    args: argparse.Namespace, config: GatewayConfig | None, what: Purge
) -> dict[str, Any]:
    """POST the purge to the node's admin listener, which asks each of its workers."""
    token = os.environ.get("APIGATE_ADMIN_TOKEN") or None
    if args.admin:
        base = args.admin.rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise CliError(f"--admin takes the admin listener's http:// or https:// URL, got {base!r}")
    elif config is not None and config.admin is not None:
        listen = config.admin.listen
        host = "127.0.0.1" if listen.host in ("0.0.0.0", "::", "") else listen.host
        base = f"http://[{host}]:{listen.port}" if ":" in host else f"http://{host}:{listen.port}"
        if config.admin.token is not None:
            token = config.admin.token.get_secret_value()
    else:
        raise CliError(
            "with state memory:// the purge goes through the node's admin listener, and the config "
            "has none (admin: null): name a Redis in state.url, or give --admin URL"
        )
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        base + "/api/cache/purge", data=orjson.dumps(what.notice()), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=ADMIN_TIMEOUT) as response:
            answer = orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:500].decode("utf-8", "replace")
        raise CliError(f"the admin listener at {base} refused the purge ({exc.code}): {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(
            f"the admin listener at {base} cannot be reached ({exc}); is the gateway running?"
        ) from None
    workers, purged = int(answer.get("workers", 0)), int(answer.get("purged", 0))
    return {
        "purge": what.describe(),
        "workers": workers,
        "entries_removed": purged,
        "admin": base,
        "text": f"purged {what.describe()}: {purged} entries removed in {workers} worker(s) "
        f"of the node at {base}",
    }
