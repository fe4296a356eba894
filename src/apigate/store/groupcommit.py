"""Group commit: items that arrive while a commit is in flight share the next one.

A durable commit costs a disk flush (SQLite WAL with synchronous=FULL, PostgreSQL's WAL fsync),
a few milliseconds that do not grow with the size of the transaction. Committing each webhook on
its own would cap ingest at a few hundred per second; committing whatever queued up during the
previous flush, as one transaction, pays one flush per group instead. Under light load a group is
one item and its latency is one flush; under heavy load groups grow and throughput follows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class GroupCommit(Generic[Item, Result]):
    """``await submit(item)`` returns once ``commit`` has durably stored a group containing it.

    ``commit(items)`` returns one result per item, in order; if it raises, every item of that
    group gets the exception (nothing of a failed group is acknowledged). A result that is an
    exception is raised to that item's submitter alone (its part was rolled back, the rest of the
    group committed). One commit runs at a time.
    """

    def __init__(
        self,
        commit: Callable[[Sequence[Item]], Awaitable[Sequence[Result | Exception]]],
        max_group: int = 2000,
    ) -> None:
        self._commit = commit
        self._max_group = max_group
        self._queue: list[tuple[Item, asyncio.Future[Result]]] = []
        self._running: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        """A commit is running; what is submitted now waits for the next one."""
        return self._running is not None

    def submit(self, item: Item) -> asyncio.Future[Result]:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._running is None:
            self._running = asyncio.get_running_loop().create_task(self._drain())
        return future

    async def _drain(self) -> None:
        try:
            while self._queue:
                group, self._queue = self._queue[: self._max_group], self._queue[self._max_group :]
                try:
                    results = await self._commit([item for item, _ in group])
                    if len(results) != len(group):
                        raise RuntimeError(f"a commit of {len(group)} items gave {len(results)} results")
                except BaseException as exc:
                    # Every waiter of the group hears the outcome, even a cancellation: none may
                    # hang, and none is told its item is stored.
                    failure = exc if isinstance(exc, Exception) else RuntimeError("commit interrupted")
                    for _, future in group:
                        if not future.done():
                            future.set_exception(failure)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, future), result in zip(group, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
                # One turn of the loop before the next group: submitters that this commit woke and
                # that submit again at once (a chained writer, such as the intake's group commit
                # feeding the SQLite store's) join it instead of waiting a whole flush for the one after.
                await asyncio.sleep(0)
        finally:
            self._running = None
            if self._queue:  # interrupted with items still queued: they get a writer of their own
                self._running = asyncio.get_running_loop().create_task(self._drain())

    async def close(self) -> None:
        """Wait for the commits already queued."""
        while self._running is not None:
            await asyncio.shield(self._running)
