"""`apigate webhooks list|show|replay|purge|secret`: inspect and operate stored webhook events."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from apigate.config.units import parse_duration
from apigate.store.base import EVENT_STATES, WebhookEventDetail, WebhookEventQuery, WebhookEventSummary

if TYPE_CHECKING:
    from apigate.consumers.service import ConsumerService


def add_webhook_commands(commands: Any, common: argparse.ArgumentParser, run: Callable[..., int]) -> None:
    """Register the commands; ``run(args, action)`` opens the store as the other store commands do."""
    webhooks = commands.add_parser("webhooks", help="list, inspect, replay and purge webhook events")
    actions = webhooks.add_subparsers(dest="action", required=True, metavar="ACTION")

    def filters(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--source", help="only this source's events")
        parser.add_argument(
            "--status", dest="event_state", choices=EVENT_STATES, help="only events in this state"
        )
        parser.add_argument("--type", dest="event_type", help="only events of this type")
        parser.add_argument("--since", metavar="AGE", help="received within this long, e.g. 1h, 7d")

    listing = actions.add_parser("list", parents=[common], help="events, newest first")
    filters(listing)
    listing.add_argument("--limit", type=int, default=100)
    show = actions.add_parser("show", parents=[common], help="one event, its deliveries and attempts")
    show.add_argument("source")
    show.add_argument("event_id")
    replay = actions.add_parser("replay", parents=[common], help="deliver matching events again, now")
    filters(replay)
    replay.add_argument("--event-id", help="only this event (with --source)")
    purge = actions.add_parser(
        "purge", parents=[common], help="delete finished events older than --older-than"
    )
    purge.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 30d")
    purge.add_argument("--source", help="only this source's events")
    actions.add_parser("secret", parents=[common], help="print the gateway's delivery signing secret")
    webhooks.set_defaults(func=lambda args: run(args, lambda service: webhooks_action(args, service)))


def _query(args: argparse.Namespace, limit: int | None) -> WebhookEventQuery:
    since = time.time() - parse_duration(args.since) if args.since else None
    return WebhookEventQuery(
        source=args.source,
        state=args.event_state,
        event_type=args.event_type,
        received_after=since,
        event_id=getattr(args, "event_id", None),
        limit=limit,
    )


def summary_dict(event: WebhookEventSummary) -> dict[str, Any]:
    return {
        "source": event.source,
        "event_id": event.event_id,
        "event_type": event.event_type,
        "received_at": event.received_at,
        "state": event.state,
        "size": event.size,
    }


def detail_dict(detail: WebhookEventDetail) -> dict[str, Any]:
    return {
        **summary_dict(detail.summary),
        "headers": [list(pair) for pair in detail.headers],
        "body": detail.body.decode("utf-8", "replace"),
        "deliveries": [
            {
                "destination": d.destination,
                "state": d.state,
                "attempts": d.attempts,
                "next_at": d.next_at,
                "attempt_log": [
                    {
                        "attempt": a.attempt,
                        "started_at": a.started_at,
                        "latency": a.latency,
                        "status": a.status,
                        "error": a.error,
                    }
                    for a in d.attempt_log
                ],
            }
            for d in detail.deliveries
        ],
    }


async def webhooks_action(args: argparse.Namespace, service: ConsumerService) -> int:
    from apigate.cli import CliError, _print_json, _table, _when

    store = service.store
    if args.action == "list":
        events = await store.list_webhook_events(_query(args, args.limit))
        if args.json:
            _print_json([summary_dict(e) for e in events])
        else:
            rows = [
                [e.source, e.event_id, e.event_type or "-", e.state, _when(e.received_at), str(e.size)]
                for e in events
            ]
            print(_table(rows, ["SOURCE", "EVENT ID", "TYPE", "STATE", "RECEIVED", "BYTES"]))
    elif args.action == "show":
        detail = await store.get_webhook_event(args.source, args.event_id)
        if detail is None:
            raise CliError(f"no event {args.event_id!r} of source {args.source!r}")
        if args.json:
            _print_json(detail_dict(detail))
        else:
            print(f"{args.source} {args.event_id}: {detail.summary.state}, {detail.summary.size} bytes")
            for d in detail.deliveries:
                print(f"  -> {d.destination}: {d.state} after {d.attempts} attempt(s)")
                for a in d.attempt_log:
                    outcome = a.status if a.status is not None else a.error
                    print(f"     #{a.attempt} {_when(a.started_at)} {a.latency * 1000:.0f} ms {outcome}")
    elif args.action == "replay":
        count = await store.replay_webhook_events(_query(args, None), time.time())
        _report(args, {"replayed": count}, f"replaying {count} event(s)")
    elif args.action == "purge":
        before = time.time() - parse_duration(args.older_than)
        count = await store.purge_webhook_events(before, args.source)
        _report(args, {"purged": count}, f"purged {count} event(s)")
    else:  # secret
        from apigate.webhooks.signing import SECRET_SETTING, new_secret

        secret = await store.set_setting(SECRET_SETTING, new_secret(), only_if_absent=True)
        _report(args, {"signing_secret": secret}, secret)
    return 0


def _report(args: argparse.Namespace, value: dict[str, Any], text: str) -> None:
    from apigate.cli import _print_json

    if args.json:
        _print_json(value)
    else:
        print(text)
