"""`apigate limits show|reset`: the counters of `rate-limit` and `spike-arrest` on a shared state (Redis)."""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING, Any

from apigate.cli.context import config_path
from apigate.cli.output import EXIT_FAILED, EXIT_OK, CliError, error, print_json, report, table

if TYPE_CHECKING:
    from apigate.policies.limits.operations import Limit
    from apigate.state.redis import RedisState


def add_commands(commands: Any) -> None:
    group = commands.add_parser("limits", help="show and reset rate-limit counters (shared state)")
    group.set_defaults(func=cmd_limits)
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("-c", "--config", help="the gateway's config (default: like `run`)")
    options.add_argument("--state", help="state URL (redis://...); overrides the config's state.url")
    options.add_argument("--route", help="only this route's limits (its name, or its path if unnamed)")
    options.add_argument("--key", help="only this key (a client IP, a consumer id... as the limit counts)")
    options.add_argument("--json", action="store_true", help="print JSON for scripts")
    actions.add_parser("show", parents=[options], help="list counters: remaining allowance, reset")
    reset = actions.add_parser("reset", parents=[options], help="give keys a whole allowance again")
    reset.add_argument("--all", action="store_true", help="every key counted (instead of --key)")


def cmd_limits(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    try:
        return _limits(args)
    except (CliError, RedisError, OSError) as exc:
        error(str(exc) if isinstance(exc, CliError) else f"the state backend did not answer: {exc}")
        return EXIT_FAILED


def _limits(args: argparse.Namespace) -> int:
    from apigate.config.loader import ConfigError, load_config

    path = config_path(args.config)
    if path is None or not path.exists():
        raise CliError("give the gateway's config with -c FILE: the limits are read from it")
    try:
        config = load_config(path)
    except ConfigError as exc:
        raise CliError(f"the config {path} is not valid:\n{exc}") from None
    state_url = args.state or config.state.url
    if state_url == "memory://":
        raise CliError(
            "with state memory:// each gateway process keeps its own counters, which cannot be read "
            "from outside it; name a Redis in state.url (or --state) to share and inspect them"
        )
    if args.action == "reset" and not (args.key or args.all):
        raise CliError("say which counters to reset: --key KEY, or --all")
    return asyncio.run(_run(args, config, state_url))


async def _run(args: argparse.Namespace, config: Any, state_url: str) -> int:
    from apigate.config.compile import route_policies
    from apigate.policies.limits.operations import limits_of
    from apigate.policies.limits.policy import CountingPolicy
    from apigate.state import open_state

    chains = route_policies(config)
    if args.route is not None and args.route not in chains:
        raise CliError(f"no route named {args.route!r} (routes: {', '.join(chains)})")
    policies = [
        policy
        for name, chain in chains.items()
        if args.route in (None, name)
        for policy in chain
        if isinstance(policy, CountingPolicy) and policy.config.backend == "state"
    ]
    limits = limits_of(policies)
    state = open_state(state_url)
    await state.open()
    try:
        if args.action == "show":
            return await _show(args, state, limits)  # type: ignore[arg-type]
        return await _reset(args, state, limits)  # type: ignore[arg-type]
    finally:
        await state.close()


async def _keys(args: argparse.Namespace, state: RedisState, limit: Limit) -> list[str]:
    from apigate.policies.limits.operations import keys_counted

    return [args.key] if args.key is not None else await keys_counted(state, limit)


async def _show(args: argparse.Namespace, state: RedisState, limits: list[Limit]) -> int:
    from apigate.policies.limits import clock
    from apigate.policies.limits.operations import read

    now_ms = clock.source()() // 1_000_000  # the clock the gateway's limits read
    counters = []
    for limit in limits:
        for key in await _keys(args, state, limit):
            counter = await read(state, limit, key, now_ms)
            if counter is not None:
                counters.append(counter)
    rows = [
        [c.route or "*", c.policy, c.limit, c.key, f"{c.remaining}/{c.capacity}", f"{c.reset_seconds}s"]
        for c in counters
    ]
    text = (
        table(rows, ["ROUTE", "POLICY", "LIMIT", "KEY", "REMAINING", "RESET IN"]) if rows else "no counters"
    )
    report(args.json, [c.as_dict() for c in counters], text)
    return EXIT_OK


async def _reset(args: argparse.Namespace, state: RedisState, limits: list[Limit]) -> int:
    from apigate.policies.limits.operations import reset

    done = []
    for limit in limits:
        for key in await _keys(args, state, limit):
            if await reset(state, limit, key):
                done.append(
                    {
                        "route": limit.policy.scope or None,
                        "policy": limit.policy.name,
                        "limit": limit.label,
                        "key": key,
                    }
                )
    if args.json:
        print_json(done)
    else:
        print(f"reset {len(done)} counter{'s' if len(done) != 1 else ''}")
    return EXIT_OK
