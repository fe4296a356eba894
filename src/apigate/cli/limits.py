"""`apigate limits show|reset`: the counters of `rate-limit`, `spike-arrest` and `quota` on a shared
state (Redis), and those of memory-backed quotas in the store."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from apigate.cli.context import config_path, shown_url
from apigate.cli.output import EXIT_FAILED, EXIT_OK, CliError, error, print_json, report, table

if TYPE_CHECKING:
    from apigate.policies.limits.operations import Limit, SharedCounters, StoredQuotas

    Counters = SharedCounters | StoredQuotas


def add_commands(commands: Any) -> None:
    group = commands.add_parser("limits", help="show and reset rate-limit and quota counters (Redis, store)")
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
    if args.action == "reset" and not (args.key or args.all):
        raise CliError("say which counters to reset: --key KEY, or --all")
    return asyncio.run(_run(args, config, args.state or config.state.url))


async def _run(args: argparse.Namespace, config: Any, state_url: str) -> int:
    from apigate.config.compile import route_policies
    from apigate.policies.limits.operations import SharedCounters, StoredQuotas, limits_of
    from apigate.policies.limits.policy import CountingPolicy
    from apigate.state import open_state
    from apigate.store import open_store

    chains = route_policies(config)
    if args.route is not None and args.route not in chains:
        raise CliError(f"no route named {args.route!r} (routes: {', '.join(chains)})")
    policies = [
        policy
        for name, chain in chains.items()
        if args.route in (None, name)
        for policy in chain
        if isinstance(policy, CountingPolicy)
    ]
    shared = state_url != "memory://"
    # On Redis: what counts on the state backend (hybrid counters are merged there), by URL (a
    # policy may name its own). In the store: quotas that count in memory.
    on_redis: dict[str, list[CountingPolicy[Any]]] = {}
    for policy in policies:
        url = policy.config.state_url or state_url
        if url != "memory://" and policy.config.backend in ("state", "hybrid"):
            on_redis.setdefault(url, []).append(policy)
    in_store = [
        limit
        for limit in limits_of([p for p in policies if not shared or p.config.backend == "memory"])
        if limit.quota is not None
    ]
    if not on_redis and not in_store and not shared:
        raise CliError(
            "with state memory:// each gateway process keeps its own counters, which cannot be read "
            "from outside it; name a Redis in state.url (or --state) to share and inspect them"
        )
    places: list[tuple[Counters, list[Limit]]] = []
    states = {url: open_state(url) for url in on_redis}
    store = open_store(config.store.url) if in_store else None
    try:
        for url, state in states.items():
            await state.open()
            places.append((SharedCounters(state), limits_of(on_redis[url])))  # type: ignore[arg-type]
        if store is not None:
            try:
                await store.open()
            except Exception as exc:
                raise CliError(f"cannot open the store {shown_url(config.store.url)}: {exc}") from None
            places.append((StoredQuotas(store), in_store))
        if args.action == "show":
            return await _show(args, places)
        return await _reset(args, places)
    finally:
        for state in states.values():
            await state.close()
        if store is not None:
            await store.close()


async def _each(
    args: argparse.Namespace, places: list[tuple[Counters, list[Limit]]], now_ms: int
) -> AsyncIterator[tuple[Counters, Limit, str]]:
    """Every counter the command is about: where it is, its limit, its key."""
    for counters, limits in places:
        for limit in limits:
            keys = [args.key] if args.key is not None else await counters.keys_counted(limit, now_ms)
            for key in keys:
                yield counters, limit, key


def _now_ms() -> int:
    from apigate.policies.limits import clock

    return clock.source()() // 1_000_000  # the clock the gateway's limits read


async def _show(args: argparse.Namespace, places: list[tuple[Counters, list[Limit]]]) -> int:
    now_ms = _now_ms()
    found = []
    async for counters, limit, key in _each(args, places, now_ms):
        counter = await counters.read(limit, key, now_ms)
        if counter is not None:
            found.append(counter)
    rows = [
        [
            c.route or "*",
            c.policy,
            c.limit,
            c.key,
            f"{c.remaining}/{c.capacity}",
            f"{c.reset_seconds}s",
            c.period or "-",
        ]
        for c in found
    ]
    headings = ["ROUTE", "POLICY", "LIMIT", "KEY", "REMAINING", "RESET IN", "PERIOD"]
    text = table(rows, headings) if rows else "no counters"
    report(args.json, [c.as_dict() for c in found], text)
    return EXIT_OK


async def _reset(args: argparse.Namespace, places: list[tuple[Counters, list[Limit]]]) -> int:
    now_ms = _now_ms()
    done = []
    async for counters, limit, key in _each(args, places, now_ms):
        if await counters.reset(limit, key, now_ms):
            route, policy = limit.policy.scope or None, limit.policy.name
            done.append({"route": route, "policy": policy, "limit": limit.label, "key": key})
    if args.json:
        print_json(done)
    else:
        print(f"reset {len(done)} counter{'s' if len(done) != 1 else ''}")
    return EXIT_OK
