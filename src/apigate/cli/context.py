"""Where a command finds its config, its store and its state, and how a store command runs."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from apigate.cli.output import EXIT_FAILED, EXIT_INTERRUPTED, CliError, error

if TYPE_CHECKING:
    from apigate.config.models import GatewayConfig
    from apigate.consumers.service import ConsumerService

# What a store command does once the store is open: (its arguments, the service over the store) -> exit code.
StoreAction = Callable[[argparse.Namespace, "ConsumerService"], Awaitable[int]]


def config_path(given: str | None) -> Path | None:
    """-c wins; then $ROUTES_CONFIG; then ./apigate.yaml; then ./routes.yaml (where the Pactown
    gateway looks when $ROUTES_CONFIG is unset); else None (the embedded demo)."""
    if given:
        return Path(given)
    if os.environ.get("ROUTES_CONFIG"):
        return Path(os.environ["ROUTES_CONFIG"])
    for local in (Path("apigate.yaml"), Path("routes.yaml")):
        if local.exists():
            return local
    return None


class StoreCommands:
    """A command group whose actions all work on the store: `apigate NAME ACTION [store options]`."""

    def __init__(
        self, commands: Any, name: str, summary: str, run: Callable[[argparse.Namespace], int]
    ) -> None:
        group = commands.add_parser(name, help=summary)
        group.set_defaults(func=run)
        self._actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
        self._options = options = argparse.ArgumentParser(add_help=False)
        options.add_argument("-c", "--config", help="read store.url from this config (default: like `run`)")
        options.add_argument("--store", help="store URL (sqlite:///file.db, postgresql://...); overrides -c")
        options.add_argument("--state", help="state URL (redis://...) to announce changes on; overrides -c")
        options.add_argument("--json", action="store_true", help="print JSON for scripts")

    def action(self, name: str, summary: str) -> argparse.ArgumentParser:
        return self._actions.add_parser(name, parents=[self._options], help=summary)


def store_only(args: argparse.Namespace) -> bool:
    """--store without -c: the command reads no config at all."""
    return bool(args.store) and not args.config


def config_for_store(args: argparse.Namespace) -> GatewayConfig | None:
    """The config a store command reads (found as `run` finds it); None when there is none."""
    path = config_path(args.config)
    if path is None:
        return None
    if not path.exists():
        raise CliError(f"config file {path} does not exist")
    from apigate.config.loader import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        raise CliError(f"the config {path} is not valid (use --store URL to bypass it):\n{exc}") from None


def store_and_state_urls(args: argparse.Namespace) -> tuple[str, str]:
    """--store and --state win; else the config's store.url and state.url (-c, $ROUTES_CONFIG,
    ./apigate.yaml); else the defaults. --store alone bypasses the config for both."""
    from apigate.config.models import StateConfig, StoreConfig

    if args.store:
        return args.store, args.state or StateConfig().url
    config = config_for_store(args)
    store_url = config.store.url if config is not None else StoreConfig().url
    state_url = config.state.url if config is not None else StateConfig().url
    return store_url, args.state or state_url


def shown_url(url: str) -> str:
    """The store URL without a password, for messages."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url


def run_store_command(args: argparse.Namespace, action: StoreAction) -> int:
    """Open the store (and a shared state, to announce changes), run ``action``, close them; every
    failure becomes one line on stderr and exit 1."""
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
            raise CliError(f"cannot open the store {shown_url(url)}: {exc}") from None
        try:
            if state.shared:
                await state.open()
            return await action(args, ConsumerService(store, state=state if state.shared else None))
        finally:
            await store.close()
            await state.close()

    try:
        url, state_url = store_and_state_urls(args)
        return asyncio.run(main(url, state_url))
    except (CliError, ConsumerError, ValueError) as exc:  # ValueError: e.g. an unsupported store URL
        error(str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        error(f"the store failed: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
