"""Call slots of one backend: at most ``max_concurrency`` calls at once, and while all are busy
the waiting calls are let in by priority (policy's ``high``, ``normal``, ``low``), then in the
order they came. A waiter that gives up (its deadline, a cancelled call) leaves no slot taken.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

PRIORITIES = {"high": 0, "normal": 1, "low": 2}


class PrioritySlots:
    """``acquire(priority)`` / ``release()``, like a semaphore whose queue is ordered."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError("a backend needs at least one slot")
        self._free = limit
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for *_, future in self._waiters if not future.done())

    async def acquire(self, priority: int = PRIORITIES["normal"]) -> None:
        if self._free > 0 and not self.waiting:
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._arrivals), future))
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.release()  # given a slot as it gave up: hand it on
            else:
                future.cancel()  # left in the queue, skipped by release
            raise

    def release(self) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
                return
        self._free += 1
