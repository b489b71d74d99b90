"""Shared state: rate limiters, token and cost budgets, and change notices between replicas.

One small interface, :class:`StateStore`, with two implementations chosen by ``server.state``
(:func:`open_store`):

- :class:`MemoryStore` (``kind: memory``, the default): in this process, for one replica.
- :class:`RedisStore` (``kind: redis``): on one Redis, shared by every replica of a deployment;
  each operation is one atomic Lua script and one round trip.

Both give the same answers; the tests run every behaviour against both.

Rate limits
    :meth:`StateStore.take` admits a cost on several :class:`Limit` s at once (say the tenant's,
    the API key's and the user's request limiters, or their token limiters), all or nothing:
    when one refuses, none is charged. Each limit is a GCRA limiter (:mod:`router.state.gcra`):
    ``rate`` units per ``period_seconds``, up to ``burst`` at once. A refusal says which limit
    refused and how long to wait (the longest wait among the refusing limits; ``math.inf``
    when a cost exceeds a burst and can never pass).

Budgets
    A request reserves its worst case before any backend work: :meth:`StateStore.reserve` with
    one :class:`BudgetCharge` per budget window it counts against (tenant, app, user; tokens,
    cost; day, month). It is all or nothing: ``used + reserved + amount <= limit`` must hold
    for every charge, or nothing changes, so concurrent requests (in one or many replicas)
    can never overspend. When the answer ends, :meth:`StateStore.settle` counts the actual
    usage (which may exceed what was reserved, for a backend that ignores ``max_tokens``: it is
    counted, not refused) and frees the hold; on failure or cancellation,
    :meth:`StateStore.release` frees it uncounted. Both are idempotent. A reservation neither
    settled nor released within its ``ttl_seconds`` expires and its amounts go back the next
    time any operation touches those budgets, so a crashed replica cannot leak budget; if it
    is settled later anyway (up to ``max(ttl_seconds, 60)`` after its deadline), its actual
    usage is still counted. Reservation ids are the caller's (one per request, e.g. a UUID): a
    reserve repeated with the id of an open reservation answers again without charging twice
    (a retry after a lost answer); the id of one settled or released within the last minute
    is a ValueError. Counters are exact integers (at most
    2**53 - 1): tokens, or cost in integer micro-units of currency. Budget windows are named
    by the caller (the key says which day or month) and dropped after ``expires_at``.
    :meth:`StateStore.usage` reads a window's ``used`` and ``reserved``.

Change notices
    :meth:`StateStore.publish` sends a short message to every subscriber of a channel
    (:meth:`StateStore.subscribe`), in every replica: a model or rules swap on one replica
    tells the others.
    A :class:`Subscription` first yields ``""`` once it is live, and ``""`` again after any
    gap (Redis lost and found again, a reader too slow): notices may have been missed, so
    the reader re-reads whatever they announce. Published messages are never empty.

Failures
    A Redis store that cannot answer within ``timeout_ms`` (down, unreachable, too slow)
    raises :class:`StateUnavailable` (a PlexusError with status UNAVAILABLE) with a clear
    message and logs the change once; it never hangs and never retries behind the caller's
    back (a retried script could count twice). The caller decides whether to fail open or
    closed. The store works again, by itself, as soon as Redis answers. Malformed arguments
    (an empty key, a negative cost, a burst below 1) are a ValueError, on both stores alike.

Keys are built by the caller and prefixed by the Redis store with ``key_prefix``; a limiter's
key expires once its schedule has passed, a budget window's at its ``expires_at``.
"""

from __future__ import annotations

from router.config import StateConfig
from router.state.memory import MemoryStore
from router.state.redis_store import RedisStore
from router.state.types import (
    MAX_UNITS,
    BudgetCharge,
    BudgetUsage,
    Limit,
    LimitVerdict,
    Reservation,
    StateStore,
    StateUnavailable,
    Subscription,
)

__all__ = [
    "MAX_UNITS",
    "BudgetCharge",
    "BudgetUsage",
    "Limit",
    "LimitVerdict",
    "MemoryStore",
    "RedisStore",
    "Reservation",
    "StateStore",
    "StateUnavailable",
    "Subscription",
    "open_store",
]


def open_store(config: StateConfig) -> StateStore:
    """The store ``server.state`` describes: in memory, or on the Redis at ``config.url``.

    Opening connects to nothing yet (the first operation does), so it works outside an event
    loop and before Redis is up."""
    if config.kind == "redis":
        return RedisStore(config.url, timeout_ms=config.timeout_ms, key_prefix=config.key_prefix)
    return MemoryStore()
