"""The in-process state store: one replica's limiters, budgets and change notices.

Every operation runs to its end under one ``threading.Lock`` without awaiting anything, so
concurrent coroutines (and admin code in executor threads) never interleave inside one. Expired
state (limiters whose schedule has passed, budget windows past their end, finished
reservations past their windows) is dropped by a sweep every ``SWEEP_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from router.state.gcra import gcra
from router.state.types import (
    FINISHED_KEEP_SECONDS,
    LATE_SETTLE_SECONDS,
    BudgetCharge,
    BudgetUsage,
    Limit,
    LimitVerdict,
    Reservation,
    check_actual,
    check_channel,
    check_message,
    check_reservation_id,
    check_reserve,
    check_take,
)

SWEEP_SECONDS = 60.0
MAX_QUEUED_NOTICES = 10_000  # per subscription; beyond it the queue restarts with ""


@dataclass
class _Budget:
    """One budget window: settled units, held units and who holds them."""

    expires_at: float
    used: int = 0
    reserved: int = 0
    holds: dict[str, int] = field(default_factory=dict)  # reservation id -> units held
    deadlines: list[tuple[float, str]] = field(default_factory=list)  # heap of (deadline, id)


@dataclass
class _Record:
    """One reservation: open until settled or released (or ``keep_until``, for a late settle),
    then kept a while so that a reserve repeating its id is refused."""

    state: str  # open | settled | released
    charges: list[tuple[str, int, float]]  # (budget key, units, the window's expiry)
    keep_until: float


class MemoryStore:
    """Limiters, budgets and notices in this process. ``clock`` gives unix seconds (tests pass
    their own to control time)."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._lock = threading.Lock()
        self._tats: dict[str, float] = {}
        self._budgets: dict[str, _Budget] = {}
        self._records: dict[str, _Record] = {}
        self._channels: dict[str, set[_MemorySubscription]] = {}
        self._next_sweep = clock() + SWEEP_SECONDS

    def _now(self) -> float:
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        return now

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + SWEEP_SECONDS
        self._tats = {key: tat for key, tat in self._tats.items() if tat > now}
        self._budgets = {key: b for key, b in self._budgets.items() if b.expires_at > now}
        self._records = {rid: r for rid, r in self._records.items() if r.keep_until > now}

    # -- rate limits

    async def take(self, limits: Sequence[Limit], cost: Sequence[int]) -> LimitVerdict:
        check_take(limits, cost)
        with self._lock:
            now = self._now()
            tats: dict[str, float] = {}
            worst, worst_key = -1.0, None
            for limit, units in zip(limits, cost, strict=True):
                tat = tats.get(limit.key, self._tats.get(limit.key, 0.0))
                allowed, tat, wait = gcra(
                    tat,
                    now,
                    limit.emission_seconds,
                    limit.tolerance_seconds,
                    units,
                    limit.burst,
                )
                if allowed:
                    if units:
                        tats[limit.key] = tat
                elif wait > worst:
                    worst, worst_key = wait, limit.key
            if worst_key is not None:
                return LimitVerdict(False, worst, worst_key)
            self._tats.update(tats)
            return LimitVerdict(True, 0.0, None)

    # -- budgets

    def _budget(self, key: str, now: float) -> _Budget | None:
        """The live window ``key`` with its expired holds returned; None when there is none."""
        budget = self._budgets.get(key)
        if budget is None:
            return None
        if budget.expires_at <= now:
            del self._budgets[key]
            return None
        while budget.deadlines and budget.deadlines[0][0] <= now:
            _, rid = heapq.heappop(budget.deadlines)
            units = budget.holds.pop(rid, None)
            if units is not None:
                budget.reserved -= units
        return budget

    def _left(self, charge: BudgetCharge, now: float) -> int:
        budget = self._budget(charge.key, now)
        if budget is None:
            return charge.limit
        return charge.limit - budget.used - budget.reserved

    async def reserve(
        self, reservation_id: str, charges: Sequence[BudgetCharge], ttl_seconds: float
    ) -> Reservation:
        check_reserve(reservation_id, charges, ttl_seconds)
        with self._lock:
            now = self._now()
            record = self._records.get(reservation_id)
            if record is not None and record.keep_until > now:
                if record.state != "open":
                    raise ValueError(
                        f"reservation {reservation_id!r} is already {record.state}: "
                        "use a new id for each reservation"
                    )
                left = {c.key: max(0, self._left(c, now)) for c in charges}
                return Reservation(True, reservation_id, None, left)
            lefts = [self._left(c, now) for c in charges]
            refused = next(
                (c for c, left in zip(charges, lefts, strict=True) if c.amount > left), None
            )
            if refused is not None:
                remaining = {c.key: max(0, left) for c, left in zip(charges, lefts, strict=True)}
                return Reservation(False, reservation_id, refused.key, remaining)
            deadline = now + ttl_seconds
            held: list[tuple[str, int, float]] = []
            for charge in charges:
                expires_at = max(charge.expires_at, deadline)
                budget = self._budget(charge.key, now)
                if budget is None:
                    budget = self._budgets[charge.key] = _Budget(expires_at)
                budget.expires_at = expires_at
                budget.reserved += charge.amount
                budget.holds[reservation_id] = charge.amount
                heapq.heappush(budget.deadlines, (deadline, reservation_id))
                held.append((charge.key, charge.amount, expires_at))
            keep_until = deadline + max(ttl_seconds, LATE_SETTLE_SECONDS)
            self._records[reservation_id] = _Record("open", held, keep_until)
            remaining = {
                c.key: max(0, left - c.amount) for c, left in zip(charges, lefts, strict=True)
            }
            return Reservation(True, reservation_id, None, remaining)

    def _finish(self, reservation_id: str, actual: Mapping[str, int] | None) -> None:
        with self._lock:
            now = self._now()
            record = self._records.get(reservation_id)
            if record is None or record.keep_until <= now or record.state != "open":
                return
            for key, units, expires_at in record.charges:
                budget = self._budget(key, now)
                if budget is not None and reservation_id in budget.holds:
                    budget.reserved -= budget.holds.pop(reservation_id)
                if actual is None or expires_at <= now:
                    continue
                if budget is None:
                    budget = self._budgets[key] = _Budget(expires_at)
                budget.expires_at = expires_at
                budget.used += actual.get(key, units)
            record.state = "released" if actual is None else "settled"
            record.keep_until = now + FINISHED_KEEP_SECONDS

    async def settle(self, reservation_id: str, actual: Mapping[str, int]) -> None:
        check_reservation_id(reservation_id)
        check_actual(actual)
        self._finish(reservation_id, actual)

    async def release(self, reservation_id: str) -> None:
        check_reservation_id(reservation_id)
        self._finish(reservation_id, None)

    async def usage(self, keys: Sequence[str]) -> dict[str, BudgetUsage]:
        with self._lock:
            now = self._now()
            out: dict[str, BudgetUsage] = {}
            for key in keys:
                budget = self._budget(key, now)
                out[key] = (
                    BudgetUsage(0, 0)
                    if budget is None
                    else BudgetUsage(budget.used, budget.reserved)
                )
            return out

    # -- change notices

    async def publish(self, channel: str, message: str) -> None:
        check_channel(channel)
        check_message(message)
        with self._lock:
            wakes = [sub._push(message) for sub in self._channels.get(channel, ())]
        for wake in wakes:
            wake()

    def subscribe(self, channel: str) -> _MemorySubscription:
        check_channel(channel)
        subscription = _MemorySubscription(self, channel)
        with self._lock:
            self._channels.setdefault(channel, set()).add(subscription)
        return subscription

    def _unsubscribe(self, subscription: _MemorySubscription) -> None:
        with self._lock:
            subscribers = self._channels.get(subscription.channel)
            if subscribers is not None:
                subscribers.discard(subscription)
                if not subscribers:
                    del self._channels[subscription.channel]

    async def aclose(self) -> None:
        with self._lock:
            subscriptions = [sub for subs in self._channels.values() for sub in subs]
        for subscription in subscriptions:
            await subscription.aclose()


def _nothing() -> None:
    return None


class _MemorySubscription:
    """A queue of notices for one subscriber; it is live from the moment ``subscribe``
    returns. Wakes its reader on the reader's event loop, whichever thread publishes."""

    def __init__(self, store: MemoryStore, channel: str):
        self.channel = channel
        self._store = store
        self._items: deque[str] = deque([""])
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False

    def _push(self, message: str) -> Callable[[], None]:
        """Queue ``message`` (under the store's lock); returns what wakes the reader."""
        if len(self._items) >= MAX_QUEUED_NOTICES:
            self._items.clear()
            self._items.append("")
        self._items.append(message)
        return self._waker()

    def _waker(self) -> Callable[[], None]:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return _nothing

        def waker() -> None:
            # RuntimeError: the reader's loop is closed, so nobody is waiting
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

        return waker

    def __aiter__(self) -> _MemorySubscription:
        return self

    async def __anext__(self) -> str:
        lock = self._store._lock
        while True:
            with lock:
                if self._items:
                    return self._items.popleft()
                if self._closed:
                    raise StopAsyncIteration
                if self._wake is None:
                    self._loop = asyncio.get_running_loop()
                    self._wake = asyncio.Event()
                self._wake.clear()
                wake = self._wake
            await wake.wait()

    async def aclose(self) -> None:
        self._store._unsubscribe(self)
        with self._store._lock:
            self._closed = True
            self._items.clear()
            wake = self._waker()
        wake()
