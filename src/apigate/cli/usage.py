"""`apigate usage`: requests, errors, bytes and latency from the store's usage analytics, over a
time range, per bucket and per consumer, key, tenant or route."""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING, Any

from apigate.cli.context import run_store_command
from apigate.cli.output import EXIT_OK, EXIT_USAGE, error, report, table
from apigate.observe.usage_queries import (
    TOTAL,
    ParameterNames,
    UsageQueryError,
    answer,
    build_query,
    row_dict,
)
from apigate.store.roles.usage import GRANULARITIES, GROUP_COLUMNS, UsageRow

if TYPE_CHECKING:
    from apigate.consumers.service import ConsumerService
    from apigate.store import Store

PARAMETERS = ParameterNames(start="--from", end="--to", group_by="--by", granularity="--granularity")
RELATIVE_TIME = re.compile(r"^-\d+(\.\d+)?[a-z]*$")
_COUNT_COLUMNS = ("requests", "client_errors", "server_errors", "bytes_in", "bytes_out", "latency_avg_ms")


def add_commands(commands: Any) -> None:
    parser = commands.add_parser(
        "usage",
        help="requests, errors, bytes and latency per consumer, key, tenant and route",
        description="Read usage analytics from the store. Times: ISO (2026-03-29T10:00:00Z; UTC "
        "without an offset), now, or relative (-1h, -30m, -7d).",
    )
    parser.set_defaults(func=cmd_usage)
    # `--from -1h` takes -1h as the value: argparse reads an argument that looks like a negative
    # number as a value, and relative times are negative numbers with a unit.
    parser._negative_number_matcher = RELATIVE_TIME
    parser.add_argument(
        "--from", dest="start", metavar="TIME", help="start of the range (default: an hour before --to)"
    )
    parser.add_argument(
        "--to", dest="end", metavar="TIME", help="end of the range, not included (default: now)"
    )
    parser.add_argument(
        "--by",
        dest="group_by",
        metavar="FIELDS",
        help=f"group by these, comma-separated: {', '.join(GROUP_COLUMNS)}",
    )
    parser.add_argument(
        "--granularity",
        metavar="STEP",
        help=f"{', '.join([*GRANULARITIES, TOTAL])} (default: by the range's length)",
    )
    parser.add_argument("-c", "--config", help="read store.url from this config (default: like `run`)")
    parser.add_argument("--store", help="store URL (sqlite:///file.db, postgresql://...); overrides -c")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def cmd_usage(args: argparse.Namespace) -> int:
    # Checked before the store is opened: a wrong parameter is a usage error, whatever the store.
    try:
        args.query = build_query(
            {
                "--from": args.start,
                "--to": args.end,
                "--by": args.group_by,
                "--granularity": args.granularity,
            },
            PARAMETERS,
        )
    except UsageQueryError as exc:
        error(str(exc))
        return EXIT_USAGE
    args.state = None  # usage announces nothing to running gateways
    return run_store_command(args, usage_action)


async def usage_action(args: argparse.Namespace, service: ConsumerService[Store]) -> int:
    query = args.query
    rows = await service.store.query_usage(query)
    report(args.json, answer(query, rows), usage_table(rows, query.group_by))
    return EXIT_OK


def usage_table(rows: list[UsageRow], group_by: tuple[str, ...]) -> str:
    header = ["START", "STEP", *(name.upper() for name in group_by), *(c.upper() for c in _COUNT_COLUMNS)]
    lines = []
    for row in rows:
        shown = row_dict(row)
        lines.append(
            [
                shown["start"],
                shown["granularity"],
                *(shown[name] or "-" for name in group_by),
                *(str(shown[column]) for column in _COUNT_COLUMNS),
            ]
        )
    return table(lines, header)
