"""The `apigate` command: run a gateway, check a config."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from apigate import __version__


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
