"""`apigate run` starts the gateway; `apigate check` validates a config and reports every problem."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from apigate.cli.context import config_path
from apigate.cli.output import EXIT_FAILED, EXIT_OK, EXIT_USAGE, error


def add_commands(commands: Any) -> None:
    run = commands.add_parser("run", help="start the gateway")
    run.add_argument(
        "-c",
        "--config",
        help="YAML config (default: $ROUTES_CONFIG, else ./apigate.yaml, else ./routes.yaml, "
        "else the embedded demo)",
    )
    run.add_argument("--workers", type=int, default=None, help="worker processes (default: the config's)")
    run.set_defaults(func=cmd_run)

    check = commands.add_parser("check", help="validate a config file and report every problem")
    check.add_argument("-c", "--config", help="YAML config to check")
    check.set_defaults(func=cmd_check)


def cmd_run(args: argparse.Namespace) -> int:
    from apigate.process import ConfigSource, run

    if args.workers is not None and args.workers < 1:
        error("--workers must be at least 1")
        return EXIT_USAGE
    path = config_path(args.config)
    if path is not None and not path.exists():
        error(f"config file {path} does not exist")
        return EXIT_USAGE
    return run(ConfigSource(path), args.workers)


def cmd_check(args: argparse.Namespace) -> int:
    from apigate.config.loader import ConfigError, load_config

    path = config_path(args.config)
    if path is None:
        error("no config to check (give -c FILE)")
        return EXIT_USAGE
    try:
        config = load_config(path)
    except ConfigError as exc:
        count = len(exc.issues)
        print(f"{path}: {count} problem{'s' if count != 1 else ''}", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{path}: OK ({len(config.routes)} routes, {len(config.upstreams)} upstreams)")
    return EXIT_OK
