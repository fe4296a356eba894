"""Webhook persistence on both stores, the group commit and the delivery worker's schedule.

SQLite on a temp file and PostgreSQL on a fresh database; the worker runs in process against a
real handler with an injected clock, so schedules are checked by value, not by waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from apigate.outbound import HttpClient
from apigate.store import Store, open_store
from apigate.store.groupcommit import GroupCommit
from apigate.store.postgres import PostgresStore
from apigate.store.roles.webhooks import DeliveryOutcome, NewWebhookEvent, WebhookEventQuery
from apigate.store.sqlite import SqliteStore
from apigate.webhooks import delivery
from apigate.webhooks.config import HttpDestinationConfig, RetryConfig
from apigate.webhooks.delivery import DeliveryWorker, Lane
from apigate.webhooks.destinations.http import HttpDestination, retry_after
from apigate.webhooks.runtime import kept_headers
from apigate.webhooks.signing import Signer, new_secret
from tests.support.cli import apigate_json
from tests.support.pg import fresh_database
from tests.support.webhook_handler import WebhookHandler

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]
NOW = 1_900_000_000.0


@pytest.fixture
def run() -> Iterator[Run]:
    with asyncio.Runner() as runner:
        yield runner.run


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path, run: Run) -> Iterator[Store]:
    if request.param == "sqlite":
        opened = open_store(f"sqlite:///{tmp_path / 'store.db'}")
        run(opened.open())
        yield opened
        run(opened.close())
        return
    with fresh_database() as url:
        opened = open_store(url)
        run(opened.open())
        yield opened
        run(opened.close())


def event(
    event_id: str, destinations: Sequence[str] = ("a",), received_at: float = NOW, **kw: Any
) -> NewWebhookEvent:
    return NewWebhookEvent(
        source=kw.get("source", "src"),
        event_id=event_id,
        event_type=kw.get("event_type", "thing.happened"),
        received_at=received_at,
        headers=(("content-type", "application/json"), ("x-tag", "é")),
        body=b'{"n":1}',
        destinations=tuple(destinations),
        first_due=received_at,
    )


def outcome(
    delivery_id: int,
    attempt: int,
    state: str,
    status: int | None = 200,
    next_at: float = NOW,
    schedule_start: int = 0,
    started_at: float = NOW,
) -> DeliveryOutcome:
    error = None if state == "delivered" else f"answered {status}"
    return DeliveryOutcome(
        delivery_id, "a", attempt, started_at, 0.01, status, error, state, next_at, schedule_start
    )


# -- store ------------------------------------------------------------------------------------------


def test_events_are_deduplicated_per_source_within_and_across_batches(store: Store, run: Run) -> None:
    assert run(store.add_webhook_events([event("e1"), event("e2"), event("e1")])) == [True, True, False]
    assert run(store.add_webhook_events([event("e1"), event("e1", source="other")])) == [False, True]
    assert len(run(store.list_webhook_events(WebhookEventQuery()))) == 3


def test_claims_count_the_attempt_and_hold_a_lease(store: Store, run: Run) -> None:
    run(store.add_webhook_events([event("e1", ("a", "b")), event("e2", ("a",))]))
    claims = run(store.claim_webhook_deliveries("a", 10, NOW, NOW + 30))
    assert [(c.event_id, c.attempt, c.body) for c in claims] == [("e1", 1, b'{"n":1}'), ("e2", 1, b'{"n":1}')]
    assert claims[0].headers == (("content-type", "application/json"), ("x-tag", "é"))
    assert run(store.claim_webhook_deliveries("a", 10, NOW + 29, NOW + 60)) == []  # leased
    again = run(store.claim_webhook_deliveries("a", 10, NOW + 31, NOW + 60))  # the claimer died
    assert [c.attempt for c in again] == [2, 2]
    # The first claimer's late outcome records its attempt but does not move the delivery on.
    run(store.record_webhook_outcomes([outcome(claims[0].delivery_id, 1, "delivered")]))
    detail = run(store.get_webhook_event("src", "e1"))
    assert detail is not None
    delivery = next(d for d in detail.deliveries if d.destination == "a")
    assert (delivery.state, [a.attempt for a in delivery.attempt_log]) == ("pending", [1])
    run(store.record_webhook_outcomes([outcome(again[0].delivery_id, 2, "delivered")]))
    run(store.record_webhook_outcomes([outcome(again[1].delivery_id, 2, "dead", 500)]))
    states = {s.event_id: s.state for s in run(store.list_webhook_events(WebhookEventQuery()))}
    assert states == {"e1": "pending", "e2": "dead"}  # e1 still waits for destination b


def test_listing_replay_and_purge(store: Store, run: Run) -> None:
    run(store.add_webhook_events([event("old", received_at=NOW - 100), event("new"), event("none", ())]))
    claims = run(store.claim_webhook_deliveries("a", 10, NOW, NOW + 30))
    by_id = {c.event_id: c for c in claims}
    run(store.record_webhook_outcomes([outcome(by_id["old"].delivery_id, 1, "dead", 500)]))
    run(store.record_webhook_outcomes([outcome(by_id["new"].delivery_id, 1, "pending", 503, NOW + 1000)]))
    listed = run(store.list_webhook_events(WebhookEventQuery()))
    assert [(s.event_id, s.state) for s in listed] == [
        ("none", "filtered"),
        ("new", "pending"),
        ("old", "dead"),
    ]
    assert [s.event_id for s in run(store.list_webhook_events(WebhookEventQuery(state="dead")))] == ["old"]
    assert run(store.list_webhook_events(WebhookEventQuery(received_before=NOW - 50)))[0].event_id == "old"
    assert run(store.list_webhook_events(WebhookEventQuery(event_type="other"))) == []

    assert run(store.replay_webhook_events(WebhookEventQuery(state="dead"), NOW + 40)) == 1
    replayed = run(store.claim_webhook_deliveries("a", 10, NOW + 40, NOW + 70))
    # The numbering goes on; the retry schedule starts again at its first step.
    assert [(c.event_id, c.attempt, c.schedule_step) for c in replayed] == [("old", 2, 1)]

    # Purge removes what is done and older than the cut; pending work is never purged.
    run(store.record_webhook_outcomes([outcome(replayed[0].delivery_id, 2, "delivered", schedule_start=1)]))
    assert run(store.purge_webhook_events(NOW + 1)) == 2  # "old" (delivered) and "none" (filtered)
    assert [s.event_id for s in run(store.list_webhook_events(WebhookEventQuery()))] == ["new"]
    assert run(store.add_webhook_events([event("old")])) == [True]  # its id may come again


def test_a_replay_during_an_attempt_is_not_undone_by_its_outcome(store: Store, run: Run) -> None:
    run(store.add_webhook_events([event("e1")]))
    [claim] = run(store.claim_webhook_deliveries("a", 10, NOW, NOW + 30))
    assert run(store.replay_webhook_events(WebhookEventQuery(event_id="e1"), NOW + 1)) == 1
    late = outcome(
        claim.delivery_id, claim.attempt, "dead", 500, schedule_start=claim.attempt - claim.schedule_step
    )
    run(store.record_webhook_outcomes([late]))  # the attempt that was in flight during the replay
    detail = run(store.get_webhook_event("src", "e1"))
    assert detail is not None
    [delivery] = detail.deliveries
    assert (delivery.state, [a.attempt for a in delivery.attempt_log]) == (
        "pending",
        [1],
    )  # recorded, not applied
    assert [c.attempt for c in run(store.claim_webhook_deliveries("a", 10, NOW + 1, NOW + 60))] == [2]


def test_delivery_lease_has_one_holder_until_it_expires(store: Store, run: Run) -> None:
    assert run(store.take_lease("delivery", "p1", NOW, NOW + 10))
    assert not run(store.take_lease("delivery", "p2", NOW + 5, NOW + 15))
    assert run(store.take_lease("delivery", "p1", NOW + 5, NOW + 15))  # renewal
    assert run(store.take_lease("delivery", "p2", NOW + 15, NOW + 25))  # p1 stopped renewing


# -- group commit -----------------------------------------------------------------------------------


def test_events_arriving_during_a_commit_share_the_next_one(store: Store, run: Run) -> None:
    groups: list[int] = []

    async def commit(items: Sequence[NewWebhookEvent]) -> list[bool]:
        groups.append(len(items))
        return await store.add_webhook_events(items)

    async def scenario() -> list[bool]:
        writer: GroupCommit[NewWebhookEvent, bool] = GroupCommit(commit)
        first = writer.submit(event("e0"))
        await asyncio.sleep(0)  # the first commit is now in flight
        rest = [writer.submit(event(f"e{n % 150}")) for n in range(1, 200)]
        return [await first, *await asyncio.gather(*rest)]

    results = run(scenario())
    assert results.count(True) == 150 and results.count(False) == 50
    assert groups == [1, 199]  # everything that arrived during the first commit shared the second


def test_an_exception_result_fails_only_its_own_item(run: Run) -> None:
    async def commit(items: Sequence[int]) -> list[int | Exception]:
        return [ValueError(n) if n == 2 else n for n in items]

    async def scenario() -> list[Any]:
        writer: GroupCommit[int, int] = GroupCommit(commit)
        return await asyncio.gather(*(writer.submit(n) for n in range(4)), return_exceptions=True)

    first, second, failed, last = run(scenario())
    assert (first, second, last) == (0, 1, 3) and isinstance(failed, ValueError)


def test_sqlite_webhook_writes_share_a_transaction_and_fail_alone(tmp_path: Path, run: Run) -> None:
    path = tmp_path / "store.db"
    store = SqliteStore(path)

    def failing(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO webhook_leases (name, holder, expires_at) VALUES ('lost', 'p1', 0)")
        raise ValueError("this write fails after its insert")

    async def scenario() -> list[Any]:
        await store.open()
        try:
            # Submitted in one turn of the loop, so one transaction takes all three.
            return await asyncio.gather(
                store.add_webhook_events([event("e1")]),
                store._write_webhooks(failing),
                store.take_lease("kept", "p1", NOW, NOW + 10),
                return_exceptions=True,
            )
        finally:
            await store.close()

    added, failed, leased = run(scenario())
    assert (added, leased) == ([True], True) and isinstance(failed, ValueError)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT name FROM webhook_leases").fetchall() == [("kept",)]
        assert conn.execute("SELECT event_id FROM webhook_events").fetchall() == [("e1",)]


def test_a_failed_commit_fails_every_item_of_its_group(run: Run) -> None:
    async def commit(items: Sequence[int]) -> list[int]:
        raise OSError("disk full")

    async def scenario() -> list[Any]:
        writer: GroupCommit[int, int] = GroupCommit(commit)
        return await asyncio.gather(*(writer.submit(n) for n in range(5)), return_exceptions=True)

    assert all(isinstance(result, OSError) for result in run(scenario()))


def test_a_commit_with_the_wrong_number_of_results_fails_its_group_instead_of_hanging(run: Run) -> None:
    async def commit(items: Sequence[int]) -> list[int]:
        return list(items)[:-1]

    async def scenario() -> list[Any]:
        writer: GroupCommit[int, int] = GroupCommit(commit)
        return await asyncio.gather(*(writer.submit(n) for n in range(3)), return_exceptions=True)

    assert all(isinstance(result, RuntimeError) for result in run(scenario()))


def test_a_cancelled_commit_fails_its_group_and_the_queue_still_drains(run: Run) -> None:
    stored: list[int] = []

    async def commit(items: Sequence[int]) -> list[int]:
        if 0 in items:
            raise asyncio.CancelledError  # as if the writer task were cancelled mid-commit
        stored.extend(items)
        return list(items)

    async def scenario() -> tuple[Any, Any]:
        writer: GroupCommit[int, int] = GroupCommit(commit)
        first = writer.submit(0)
        await asyncio.sleep(0)  # the commit of [0] is running
        later = writer.submit(1)
        done = await asyncio.gather(first, return_exceptions=True)
        return done[0], await asyncio.wait_for(later, 5)

    failed, result = run(scenario())
    assert isinstance(failed, RuntimeError) and result == 1 and stored == [1]


def test_kept_headers_drop_secrets_and_anything_posing_as_the_gateway() -> None:
    headers = [
        (b"x-github-event", b"push"),
        (b"x-hook-token", b"the-shared-secret"),
        (b"authorization", b"Basic dXNlcjpwYXNz"),
        (b"x-apigate-source", b"stripe"),
        (b"svix-signature", b"v1,abc"),
        (b"content-type", b"application/json"),
    ]
    assert kept_headers(headers, frozenset({"x-hook-token"})) == (
        ("x-github-event", "push"),
        ("content-type", "application/json"),
    )


# -- delivery worker --------------------------------------------------------------------------------


def test_retry_after_and_jitter_shape_the_next_attempt(store: Store, run: Run) -> None:
    handler = WebhookHandler(status=503, retry_after="120").start()
    clock = [NOW]
    try:

        async def scenario() -> None:
            client = HttpClient()
            destination = HttpDestination(HttpDestinationConfig(url=handler.url, timeout=2), client)
            worker = DeliveryWorker(store, Signer(new_secret()), 0.05, lambda: clock[0], lambda: 1.0)
            retry = RetryConfig(schedule=[0, 60, 300], jitter=0.5)
            worker.configure({"a": Lane(destination, retry, concurrency=1)}, {})
            await store.add_webhook_events([event("e1")])
            worker.start()
            try:
                await _wait_for_attempts(store, "e1", 1)
                # Retry-After 120 s is more than the schedule's 60 s, and wins.
                assert (await _next_at(store, "e1")) == NOW + 120
                handler.retry_after = None
                clock[0] = NOW + 120
                worker.wake()
                await _wait_for_attempts(store, "e1", 2)
                # No Retry-After: the schedule's 300 s, stretched by the largest jitter (x1.5).
                assert (await _next_at(store, "e1")) == NOW + 120 + 450
            finally:
                await worker.stop()
                await client.close()

        run(scenario())
    finally:
        handler.stop()


def test_a_replayed_dead_letter_gets_the_whole_schedule_again(store: Store, run: Run) -> None:
    handler = WebhookHandler(status=503).start()
    clock = [NOW]
    try:

        async def scenario() -> None:
            client = HttpClient()
            destination = HttpDestination(HttpDestinationConfig(url=handler.url, timeout=2), client)
            worker = DeliveryWorker(store, Signer(new_secret()), 0.05, lambda: clock[0], lambda: 0.5)
            retry = RetryConfig(schedule=[0, 60], jitter=0)
            worker.configure({"a": Lane(destination, retry, concurrency=1)}, {})
            await store.add_webhook_events([event("e1")])
            worker.start()

            async def fail_through_the_schedule(attempts: int) -> None:
                await _wait_for_attempts(store, "e1", attempts - 1)
                assert (await _next_at(store, "e1")) == clock[0] + 60
                clock[0] += 60
                worker.wake()
                await _wait_for_attempts(store, "e1", attempts)
                assert (await _state(store, "e1")) == "dead"

            try:
                await fail_through_the_schedule(2)
                assert await store.replay_webhook_events(WebhookEventQuery(event_id="e1"), clock[0]) == 1
                worker.wake()
                await fail_through_the_schedule(4)  # two more attempts, not one
                assert [a.attempt for a in await _attempts(store, "e1")] == [1, 2, 3, 4]
            finally:
                await worker.stop()
                await client.close()

        run(scenario())
    finally:
        handler.stop()


def test_while_intake_is_busy_a_lane_keeps_a_share_of_its_concurrency(
    store: Store, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery, "STOP_GRACE", 0.0)  # the held attempts are cut at the end
    handler = WebhookHandler(delay=60).start()  # holds every attempt: slots stay taken
    try:

        async def scenario() -> None:
            client = HttpClient()
            destination = HttpDestination(HttpDestinationConfig(url=handler.url, timeout=90), client)
            worker = DeliveryWorker(store, Signer(new_secret()), 0.05, lambda: NOW, intake_busy=lambda: True)
            worker.configure({"a": Lane(destination, RetryConfig(), concurrency=8)}, {})
            await store.add_webhook_events([event(f"e{n}") for n in range(8)])
            worker.start()
            try:
                async with asyncio.timeout(10):
                    while not await _claimed(store, 8):
                        await asyncio.sleep(0.02)
                # One claim took every slot the busy intake leaves, and none comes free meanwhile.
                assert await _claimed(store, 8) == 8 // delivery.INTAKE_FIRST_SHARE
            finally:
                await worker.stop()
                await client.close()

        run(scenario())
    finally:
        handler.stop()


async def _claimed(store: Store, events: int) -> int:
    details = [await store.get_webhook_event("src", f"e{n}") for n in range(events)]
    return sum(d is not None and d.deliveries[0].attempts > 0 for d in details)


async def _wait_for_attempts(store: Store, event_id: str, count: int) -> None:
    async with asyncio.timeout(10):
        while len(await _attempts(store, event_id)) < count:
            await asyncio.sleep(0.02)


async def _state(store: Store, event_id: str) -> str:
    detail = await store.get_webhook_event("src", event_id)
    assert detail is not None
    return detail.deliveries[0].state


async def _attempts(store: Store, event_id: str) -> list[Any]:
    detail = await store.get_webhook_event("src", event_id)
    return [] if detail is None else list(detail.deliveries[0].attempt_log)


async def _next_at(store: Store, event_id: str) -> float:
    detail = await store.get_webhook_event("src", event_id)
    assert detail is not None
    return detail.deliveries[0].next_at


def test_retry_after_reads_seconds_and_dates() -> None:
    assert retry_after(b"30", NOW) == 30.0
    assert retry_after(b"Wed, 21 Oct 2015 07:28:00 GMT", 1445412480.0 - 10) == 10.0
    assert retry_after(b"soon", NOW) is None
    assert retry_after(b"999999999", NOW) == 86400.0


# -- destination health: disabled after failing for its window, enabled again -----------------------


def test_health_tracks_outcomes_and_a_destination_is_disabled_once(store: Store, run: Run) -> None:
    run(store.add_webhook_events([event(f"e{n}") for n in range(3)]))
    first, second, third = run(store.claim_webhook_deliveries("a", 10, NOW, NOW + 30))
    run(store.record_webhook_outcomes([outcome(first.delivery_id, 1, "delivered", started_at=NOW)]))
    # Failures from before the last success do not start the clock; the first after it does.
    late = [outcome(second.delivery_id, 1, "pending", 503, NOW + 10, started_at=NOW - 5)]
    late.append(outcome(third.delivery_id, 1, "pending", 503, NOW + 10, started_at=NOW + 7))
    run(store.record_webhook_outcomes(late))
    [state] = run(store.list_webhook_destinations())
    assert (state.last_success_at, state.failing_since, state.last_error) == (NOW, NOW + 7, "answered 503")
    assert (state.disabled_at, state.pending) == (None, 2)

    assert run(store.disable_failing_webhook_destinations({"a": NOW + 6}, NOW + 100)) == []  # not long enough
    assert run(store.disable_failing_webhook_destinations({"a": NOW + 7}, NOW + 100)) == ["a"]
    assert run(store.disable_failing_webhook_destinations({"a": NOW + 50}, NOW + 200)) == []  # already
    assert run(store.claim_webhook_deliveries("a", 10, NOW + 100, NOW + 130)) == []  # due, but disabled
    assert run(store.list_webhook_destinations())[0].disabled_at == NOW + 100

    assert run(store.enable_webhook_destination("a", NOW + 300))
    assert not run(store.enable_webhook_destination("a", NOW + 300))
    [state] = run(store.list_webhook_destinations())
    assert (state.disabled_at, state.failing_since, state.pending) == (None, None, 2)  # a new window
    resumed = run(store.claim_webhook_deliveries("a", 10, NOW + 300, NOW + 330))
    assert [c.event_id for c in resumed] == ["e1", "e2"]  # due at once, in the order they arrived


def test_a_destination_failing_past_disable_after_is_disabled_and_the_cli_enables_it(
    store: Store, run: Run, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    handler = WebhookHandler(status=503).start()
    clock = [NOW]
    day = 86400.0
    lane = {"retry": RetryConfig(schedule=[0] + [day] * 20, jitter=0), "disable_after": 5 * day}

    async def scenario() -> None:
        await store.add_webhook_events([event("e1")])
        async with running_worker(store, handler, clock, **lane) as worker:
            for attempts in range(1, 7):  # one attempt a day: NOW, NOW + 1 day, ... NOW + 5 days
                await _wait_for_attempts(store, "e1", attempts)
                clock[0] += day
                worker.wake()
            async with asyncio.timeout(10):
                while (await store.list_webhook_destinations())[0].disabled_at is None:
                    await asyncio.sleep(0.02)
            await store.add_webhook_events([event("e2")])  # accepted and kept while it is disabled
            listed = await asyncio.to_thread(apigate_json, tmp_path, store_url(store), *DESTINATIONS)
            assert [(d["name"], d["state"], d["pending"], d["last_error"]) for d in listed] == [
                ("a", "disabled", 2, "answered 503")
            ]
            assert listed[0]["disabled_at"] == NOW + 5 * day and listed[0]["failing_since"] == NOW
            assert handler.requested == ["e1"] * 6  # nothing went to it since

            handler.status = 200
            enabled = await asyncio.to_thread(
                apigate_json, tmp_path, store_url(store), *DESTINATIONS, "enable", "a"
            )
            assert enabled == {"name": "a", "enabled": True, "was_disabled": True}
            worker.wake()
            await asyncio.to_thread(handler.wait_for, lambda seen: len(seen) == 2)

    try:
        with caplog.at_level("ERROR", logger="apigate.webhooks"):
            run(scenario())
    finally:
        handler.stop()
    assert [d.webhook_id for d in handler.snapshot()] == ["e1", "e2"]
    disabled = [r for r in caplog.records if "disabled" in r.getMessage()]
    assert len(disabled) == 1 and disabled[0].levelname == "ERROR"


# -- FIFO: one at a time, in the order received ------------------------------------------------------


def test_fifo_claims_hand_out_only_the_oldest_pending_event_of_a_source(store: Store, run: Run) -> None:
    fifo = frozenset({"src"})
    run(store.add_webhook_events([event("e0"), event("e1"), event("x0", source="other")]))
    claims = run(store.claim_webhook_deliveries("a", 10, NOW, NOW + 30, fifo))
    assert [c.event_id for c in claims] == ["e0", "x0"]  # "other" is not FIFO: nothing holds it back
    assert run(store.claim_webhook_deliveries("a", 10, NOW + 1, NOW + 30, fifo)) == []  # e0 is leased
    run(
        store.record_webhook_outcomes(
            [
                outcome(claims[0].delivery_id, 1, "pending", 503, NOW + 60),
                outcome(claims[1].delivery_id, 1, "delivered"),
            ]
        )
    )
    assert run(store.claim_webhook_deliveries("a", 10, NOW + 1, NOW + 30, fifo)) == []  # e0 waits: e1 too
    [retried] = run(store.claim_webhook_deliveries("a", 10, NOW + 60, NOW + 90, fifo))
    assert (retried.event_id, retried.attempt) == ("e0", 2)
    run(store.record_webhook_outcomes([outcome(retried.delivery_id, 2, "dead", 503)]))
    assert [c.event_id for c in run(store.claim_webhook_deliveries("a", 10, NOW + 60, NOW + 90, fifo))] == [
        "e1"
    ]  # a dead head lets the next one go


def test_fifo_keeps_the_order_while_the_head_fails_then_succeeds(store: Store, run: Run) -> None:
    handler = WebhookHandler(status=503).start()
    clock = [NOW]
    retry = RetryConfig(schedule=[0] + [60] * 10, jitter=0)
    ids = [f"e{n}" for n in range(5)]

    async def scenario() -> None:
        await store.add_webhook_events([event(i) for i in ids])
        async with running_worker(
            store, handler, clock, retry=retry, fifo_sources=frozenset({"src"})
        ) as worker:
            for attempts in (1, 2):
                await _wait_for_attempts(store, "e0", attempts)
                clock[0] += 60
                worker.wake()
            await _wait_for_attempts(store, "e0", 3)
            handler.status = 200
            clock[0] += 60
            worker.wake()
            await asyncio.to_thread(handler.wait_for, lambda seen: len(seen) == len(ids))

    try:
        run(scenario())
    finally:
        handler.stop()
    assert handler.requested == ["e0"] * 4 + ids[1:]  # nothing behind e0 went out before it
    assert [d.webhook_id for d in handler.snapshot()] == ids


@contextlib.asynccontextmanager
async def running_worker(
    store: Store, handler: WebhookHandler, clock: list[float], retry: RetryConfig, **lane: Any
) -> AsyncIterator[DeliveryWorker]:
    """A delivery worker with one lane "a" to ``handler``, on the clock ``clock[0]``, no jitter."""
    client = HttpClient()
    destination = HttpDestination(HttpDestinationConfig(url=handler.url, timeout=2), client)
    worker = DeliveryWorker(store, Signer(new_secret()), 0.05, lambda: clock[0], lambda: 0.5)
    worker.configure({"a": Lane(destination, retry, concurrency=4, **lane)}, {})
    worker.start()
    try:
        yield worker
    finally:
        await worker.stop()
        await client.close()


DESTINATIONS = ("webhooks", "destinations")


def store_url(store: Store) -> str:
    """The URL the command line opens the same store with."""
    assert isinstance(store, SqliteStore | PostgresStore)
    return f"sqlite:///{store.path}" if isinstance(store, SqliteStore) else store.dsn
