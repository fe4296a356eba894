"""`apigate webhooks list|show|replay|purge|secret|destinations`: inspect and operate stored webhook
events and the destinations they go to."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from apigate.cli.context import StoreCommands, config_for_store, config_path, run_store_command, store_only
from apigate.cli.output import EXIT_OK, CliError, print_json, report, table, when
from apigate.config.units import parse_duration
from apigate.store.roles.settings import SettingStore
from apigate.store.roles.webhooks import (
    EVENT_STATES,
    WebhookDestinationState,
    WebhookEventDetail,
    WebhookEventQuery,
    WebhookEventSummary,
    WebhookStore,
)

if TYPE_CHECKING:
    from apigate.consumers.service import ConsumerService
    from apigate.store import Store


def add_commands(commands: Any) -> None:
    webhooks = StoreCommands(
        commands, "webhooks", "list, inspect, replay and purge webhook events", cmd_webhooks
    )

    def filters(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--source", help="only this source's events")
        parser.add_argument(
            "--status", dest="event_state", choices=EVENT_STATES, help="only events in this state"
        )
        parser.add_argument("--type", dest="event_type", help="only events of this type")
        parser.add_argument("--since", metavar="AGE", help="received within this long, e.g. 1h, 7d")

    listing = webhooks.action("list", "events, newest first")
    filters(listing)
    listing.add_argument("--limit", type=int, default=100)
    show = webhooks.action("show", "one event, its deliveries and attempts")
    show.add_argument("source")
    show.add_argument("event_id")
    replay = webhooks.action("replay", "deliver matching events again, now")
    filters(replay)
    replay.add_argument("--event-id", help="only this event (with --source)")
    purge = webhooks.action("purge", "delete finished events older than --older-than")
    purge.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 30d")
    purge.add_argument("--source", help="only this source's events")
    webhooks.action("secret", "print the gateway's delivery signing secret")
    destinations = webhooks.action(
        "destinations", "destinations with their state and backlog; `destinations enable NAME` re-enables one"
    )
    destinations.add_argument("command", nargs="?", choices=["enable"], help="enable a disabled destination")
    destinations.add_argument("name", nargs="?", help="the destination to enable")


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


def detail_dict(detail: WebhookEventDetail) -> dict[str, Any]:
    """An event with its headers, body and every delivery's attempts (the store's fields, in order)."""
    return {
        **dataclasses.asdict(detail.summary),
        "headers": [list(pair) for pair in detail.headers],
        "body": detail.body.decode("utf-8", "replace"),
        "deliveries": [dataclasses.asdict(d) for d in detail.deliveries],
    }


def event_table(events: list[WebhookEventSummary]) -> str:
    rows = [
        [e.source, e.event_id, e.event_type or "-", e.state, when(e.received_at), str(e.size)] for e in events
    ]
    return table(rows, ["SOURCE", "EVENT ID", "TYPE", "STATE", "RECEIVED", "BYTES"])


def cmd_webhooks(args: argparse.Namespace) -> int:
    return run_store_command(args, webhooks_action)


async def webhooks_action(args: argparse.Namespace, service: ConsumerService[Store]) -> int:
    store = service.store
    if args.action == "list":
        events = await store.list_webhook_events(_query(args, args.limit))
        report(args.json, [dataclasses.asdict(e) for e in events], event_table(events))
    elif args.action == "show":
        detail = await store.get_webhook_event(args.source, args.event_id)
        if detail is None:
            raise CliError(f"no event {args.event_id!r} of source {args.source!r}")
        if args.json:
            print_json(detail_dict(detail))
        else:
            print(f"{args.source} {args.event_id}: {detail.summary.state}, {detail.summary.size} bytes")
            for d in detail.deliveries:
                print(f"  -> {d.destination}: {d.state} after {d.attempts} attempt(s)")
                for a in d.attempt_log:
                    outcome = a.status if a.status is not None else a.error
                    print(f"     #{a.attempt} {when(a.started_at)} {a.latency * 1000:.0f} ms {outcome}")
    elif args.action == "replay":
        count = await replay_in_batches(store, _query(args, None), time.time(), ReplayProgress(sys.stderr))
        report(args.json, {"replayed": count}, f"replaying {count} event(s)")
    elif args.action == "destinations":
        await _destinations_action(args, store)
    elif args.action == "purge":
        before = time.time() - parse_duration(args.older_than)
        count = await store.purge_webhook_events(before, args.source)
        report(args.json, {"purged": count}, f"purged {count} event(s)")
    else:
        await _secret_action(args, store)
    return EXIT_OK


# -- signing secret ---------------------------------------------------------------------------------
async def _secret_action(args: argparse.Namespace, store: SettingStore) -> None:
    """The secret the gateway signs deliveries with, chosen as the gateway chooses it. The secret
    alone goes to stdout (for scripts); where it comes from goes to stderr."""
    from apigate.webhooks.signing import signing_secret_in_effect

    config_read = not store_only(args)
    config = config_for_store(args) if config_read else None
    path = config_path(args.config) if config is not None else None
    secret = await signing_secret_in_effect(config.webhooks.signing_secret if config else None, store)
    if args.json:
        print_json(
            {
                "signing_secret": secret.value,
                "source": secret.origin,
                "created": secret.created,
                "config": None if path is None else str(path),
            }
        )
        return
    print(secret.value)
    if secret.origin == "config":
        origin = f"from webhooks.signing_secret in {path} (the store's secret, if any, is not used)"
    else:
        setting = f"webhooks.signing_secret in {path}" if path else "config"
        kept = "generated now and kept in the store" if secret.created else "kept in the store"
        origin = f"{kept} (no {setting})"
        if not config_read:
            origin += "; a webhooks.signing_secret in the config would win: pass -c FILE to check"
    print(f"apigate: signing secret {origin}", file=sys.stderr)


# -- bulk replay ------------------------------------------------------------------------------------
# Each batch is one transaction: a long replay holds no lock for long and can report its progress.
REPLAY_BATCH = 500


async def replay_in_batches(
    store: WebhookStore, query: WebhookEventQuery, now: float, progress: Callable[[int, int], None]
) -> int:
    """Replay the events matching ``query`` in batches, calling ``progress(done, total)`` after each;
    returns how many were replayed (an event that stopped matching meanwhile is left alone)."""
    matching = [(e.source, e.event_id) for e in await store.list_webhook_events(query)]
    replayed = 0
    for start in range(0, len(matching), REPLAY_BATCH):
        batch = tuple(matching[start : start + REPLAY_BATCH])
        replayed += await store.replay_webhook_events(dataclasses.replace(query, keys=batch), now)
        progress(start + len(batch), len(matching))
    return replayed


class ReplayProgress:
    """Replay progress on ``stream``: a bar redrawn in place on a terminal, a line per batch
    otherwise (logs and pipes get plain counts)."""

    WIDTH = 30

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.on_terminal = stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        if self.on_terminal:
            filled = self.WIDTH * done // total
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            self.stream.write(f"\rreplaying [{bar}] {done}/{total} events")
            if done == total:
                self.stream.write("\n")
        else:
            self.stream.write(f"replayed {done}/{total} events\n")
        self.stream.flush()


# -- destinations -----------------------------------------------------------------------------------
_STATE_FIELDS = ("disabled_at", "failing_since", "last_success_at", "last_error", "last_error_at", "pending")


def destination_dict(state: WebhookDestinationState, configured: set[str] | None) -> dict[str, Any]:
    """A destination for the listing; ``configured`` is None when the config is not known."""
    if configured is not None and state.name not in configured:
        status = "removed"  # its pending deliveries wait until it is configured again
    else:
        status = "enabled" if state.disabled_at is None else "disabled"
    return {
        "name": state.name,
        "state": status,
        "configured": None if configured is None else state.name in configured,
        **{field: getattr(state, field) for field in _STATE_FIELDS},
    }


def _configured_destinations(args: argparse.Namespace) -> set[str] | None:
    """The destinations of the config in use; None when ``--store`` alone bypasses the config."""
    if store_only(args):
        return None
    config = config_for_store(args)
    return None if config is None else set(config.webhooks.destinations)


async def _destinations_action(args: argparse.Namespace, store: WebhookStore) -> None:
    if args.command == "enable":
        if not args.name:
            raise CliError("destinations enable: name the destination to enable")
        was_disabled = await store.enable_webhook_destination(args.name, time.time())
        text = (
            f"{args.name} enabled: its pending deliveries are due now"
            if was_disabled
            else f"{args.name} was not disabled"
        )
        report(args.json, {"name": args.name, "enabled": True, "was_disabled": was_disabled}, text)
        return
    configured = _configured_destinations(args)
    known = {state.name: state for state in await store.list_webhook_destinations()}
    for name in configured or ():
        known.setdefault(name, WebhookDestinationState(name))  # configured, never attempted
    listed = [destination_dict(known[name], configured) for name in sorted(known)]
    if args.json:
        print_json(listed)
        return
    rows = [
        [
            d["name"],
            d["state"],
            when(d["disabled_at"]),
            when(d["failing_since"]),
            when(d["last_success_at"]),
            (d["last_error"] or "-")[:60],
            str(d["pending"]),
        ]
        for d in listed
    ]
    print(
        table(
            rows,
            ["DESTINATION", "STATE", "DISABLED", "FAILING SINCE", "LAST SUCCESS", "LAST ERROR", "PENDING"],
        )
    )
    if configured is None:
        print("(no config read: destinations removed from it are not told apart; pass -c FILE)")
