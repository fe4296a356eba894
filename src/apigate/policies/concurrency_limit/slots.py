"""Slots of a concurrency limit in this process: who holds one, who waits for one, in arrival order.

A ``Slots`` counts, per key (a route, an upstream, a consumer), the requests holding a slot and
queues those waiting for one. Releasing a slot hands it straight to the oldest waiter, so a
freed slot wakes one request, never the whole queue, and a request that arrived later never
overtakes one that waits.

Every request that took a slot or joined a queue is in ``holders`` until ``end()``, which the
policy's log hook calls once, when the exchange is over however it ended (answered, failed,
timed out, refused later, or its client went away): a holder's slot is released, a waiter
leaves its queue.

Slots are kept across config reloads, found by what defines them (``slots_for``): requests in
flight when the config changes release what they hold into the counts that new requests see.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange


class Slots:
    def __init__(self, limit: int, queue: int) -> None:
        self.limit = limit
        self.queue = queue
        self.running: dict[str, int] = {}  # key -> requests holding a slot (absent: none)
        # key -> its waiters, oldest first (a dict: FIFO order, and leaving from the middle is O(1))
        self.waiting: dict[str, dict[Exchange, asyncio.Future[bool]]] = {}
        self.holders: dict[Exchange, str] = {}  # request -> the key it holds a slot of or waits for

    def take(self, exchange: Exchange, key: str) -> bool:
        """Take a free slot of ``key`` for ``exchange``; False when every slot is taken."""
        running = self.running.get(key, 0)
        if running >= self.limit:
            return False
        self.running[key] = running + 1
        self.holders[exchange] = key
        return True

    def join_queue(self, exchange: Exchange, key: str) -> asyncio.Future[bool] | None:
        """Queue ``exchange`` for a slot of ``key``: its turn, which becomes True when a slot is
        handed to it (False if it ended first); None when the queue is full."""
        queue = self.waiting.get(key)
        if (len(queue) if queue is not None else 0) >= self.queue:
            return None
        if queue is None:
            queue = self.waiting[key] = {}
        turn: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        queue[exchange] = turn
        self.holders[exchange] = key
        return turn

    def leave_queue(self, exchange: Exchange) -> None:
        """``exchange`` stops waiting (its wait timed out): it neither holds nor waits any more."""
        key = self.holders.pop(exchange)
        self._unqueue(key, exchange)

    def end(self, exchange: Exchange) -> None:
        """The exchange is over: release its slot, or take it out of its queue."""
        key = self.holders.pop(exchange, None)
        if key is None:
            return  # it never took a slot (refused before, or by this limit), or already left
        turn = self._unqueue(key, exchange)
        if turn is not None:
            turn.set_result(False)
        else:
            self._release(key)

    def _unqueue(self, key: str, exchange: Exchange) -> asyncio.Future[bool] | None:
        queue = self.waiting.get(key)
        turn = queue.pop(exchange, None) if queue is not None else None
        if queue is not None and not queue:
            del self.waiting[key]
        return turn

    def _release(self, key: str) -> None:
        queue = self.waiting.get(key)
        if queue is not None:
            oldest = next(iter(queue))
            turn = queue.pop(oldest)
            if not queue:
                del self.waiting[key]
            turn.set_result(True)  # the slot passes on: ``running`` stays as it is
            return
        running = self.running[key] - 1
        if running:
            self.running[key] = running
        else:
            del self.running[key]


_slots: dict[tuple[str, int, int], Slots] = {}


def slots_for(per: str, limit: int, queue: int) -> Slots:
    """The slots of limits counted ``per`` route, upstream or consumer with these numbers; a
    changed limit starts with counts of its own."""
    identity = (per, limit, queue)
    slots = _slots.get(identity)
    if slots is None:
        slots = _slots[identity] = Slots(limit, queue)
    return slots
