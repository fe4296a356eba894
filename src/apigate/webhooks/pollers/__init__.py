"""Sources whose provider pushes nothing: the gateway fetches their events and treats each one as
a webhook that arrived (the same commit, de-duplication by event id, destinations, filters,
retries and records).

Every gateway process runs a loop per polled source, but only the holder of the source's lease
polls (``webhook-poll:{source}`` in the store), so a cluster reads a provider's journal once; when
the holder dies its lease expires and another process takes over from the stored cursor. A
provider kind implements ``Poller.poll`` (base.py): fetch one page after the stored cursor, commit
its events, and only then advance the cursor, so a crash at any point re-reads a page whose events
the store already holds and acknowledges as duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Protocol

from apigate.outbound import HttpClient
from apigate.store.roles.leases import LeaseStore
from apigate.store.roles.settings import SettingStore
from apigate.webhooks.pollers.base import CommitPolled, PolledEvent, Poller, PollError
from apigate.webhooks.pollers.config import PollConfig
from apigate.webhooks.verify.model import Reason, Verdict, WebhookRequest

__all__ = ["PUSH_REFUSED", "CommitPolled", "PollError", "PolledEvent", "Poller", "PollerStore", "Pollers"]

log = logging.getLogger("apigate.webhooks")

MAX_BACKOFF = 300.0  # the longest pause after failures in a row
# A lease outlives one poll cycle: the pause, every request a cycle can make and the store writes,
# so a live holder renews it before it runs out and two processes never poll (or rotate the
# refresh token) at once. Allegro's worst cycle: event-stats and the page, each with a token
# refresh and, after a 401, another refresh and the retry: 8 requests.
LEASE_REQUESTS = 8
LEASE_SPARE = 5.0


class PollerStore(LeaseStore, SettingStore, Protocol):
    """What polling keeps in the store: one lease per source, and each poller's cursor and tokens."""


class PushRefused:
    """The verifier of a polled source's route: its events are fetched, so no POST is one of them."""

    credential_headers: frozenset[str] = frozenset()

    def verify(self, request: WebhookRequest) -> Verdict:
        return Verdict(
            False, Reason.SENDER_NOT_ALLOWED, "this source's events are polled; it takes no webhooks"
        )


PUSH_REFUSED = PushRefused()


def build_poller(
    source: str,
    config: PollConfig,
    store: PollerStore,
    client: HttpClient,
    commit: CommitPolled,
    clock: Callable[[], float],
) -> Poller:
    # Imported here: the config's models load pollers.config, which runs this package's __init__,
    # and a poller's module imports the webhooks config back.
    from apigate.webhooks.pollers.allegro import AllegroPoller

    return AllegroPoller(source, config, store, client, commit, clock)


class Pollers:
    """The poll loops of one process, one per polled source; ``configure`` follows reloads."""

    def __init__(
        self,
        store: PollerStore,
        client: HttpClient,
        commit: CommitPolled,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.client = client
        self.commit = commit
        self.clock = clock
        self.holder = uuid.uuid4().hex
        self._loops: dict[str, tuple[PollConfig, asyncio.Task[None]]] = {}

    def configure(self, polled: dict[str, PollConfig]) -> None:
        """Start loops for new sources, restart changed ones, stop removed ones."""
        for name, (config, task) in list(self._loops.items()):
            if polled.get(name) != config:
                task.cancel()
                del self._loops[name]
        for name, config in polled.items():
            if name not in self._loops:
                task = asyncio.get_running_loop().create_task(self._run(name, config), name=f"poll-{name}")
                self._loops[name] = (config, task)

    async def stop(self) -> None:
        loops, self._loops = list(self._loops.values()), {}
        for _, task in loops:
            task.cancel()
        for _, task in loops:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, source: str, config: PollConfig) -> None:
        poller = build_poller(source, config, self.store, self.client, self.commit, self.clock)
        lease = f"webhook-poll:{source}"
        lease_seconds = config.interval + LEASE_REQUESTS * config.timeout + LEASE_SPARE
        holding = False
        failures = 0
        try:
            while True:
                try:
                    now = self.clock()
                    taken = await self.store.take_lease(lease, self.holder, now, now + lease_seconds)
                except Exception:
                    failures += 1
                    log.exception("polled source %s: the store failed; trying again", source)
                    await asyncio.sleep(_backoff(config, failures))
                    continue
                if taken != holding:
                    log.info(
                        "polled source %s: %s", source, "this process polls" if taken else "another polls"
                    )
                    holding = taken
                if not holding:
                    await asyncio.sleep(lease_seconds / 3)
                    continue
                try:
                    more = await poller.poll()
                except PollError as exc:
                    failures += 1
                    delay = exc.retry_after if exc.retry_after is not None else _backoff(config, failures)
                    log.warning("polled source %s: %s; polling again in %.1fs", source, exc, delay)
                except Exception:
                    failures += 1
                    delay = _backoff(config, failures)
                    log.exception("polled source %s failed; polling again in %.1fs", source, delay)
                else:
                    failures = 0
                    delay = 0.0 if more else config.interval
                await asyncio.sleep(delay)
        finally:
            if holding:
                # Let another process (or this one restarted) take over now, not when the lease runs out.
                now = self.clock()
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.store.take_lease(lease, self.holder, now, now))


def _backoff(config: PollConfig, failures: int) -> float:
    return min(config.interval * 2 ** (failures - 1), MAX_BACKOFF)
