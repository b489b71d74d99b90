"""The state store's vocabulary: limiters, budget charges, verdicts, and the store protocol."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol, runtime_checkable

from router.errors import PlexusError

# Counters are exact integers on both stores (Lua numbers are doubles): 2**53 - 1 is the most
# one limit, amount or settled total may hold.
MAX_UNITS = 2**53 - 1
# A reservation's record outlives its deadline by max(ttl, LATE_SETTLE_SECONDS): a settle
# that comes that late (a stream that outran its ttl) still counts what it used. A finished
# record is kept FINISHED_KEEP_SECONDS, so that a reserve repeating its id is refused.
LATE_SETTLE_SECONDS = 60.0
FINISHED_KEEP_SECONDS = 60.0
MAX_KEY_CHARS = 512
MAX_ID_CHARS = 200


class StateUnavailable(PlexusError):
    """The store could not answer within its timeout (Redis down, unreachable or too slow).

    Whether the request goes ahead anyway (fail open) or is refused (fail closed) is the
    caller's choice; nothing in the store decides it. After a ``reserve`` that raised this, the
    reservation may or may not exist: release it (which may fail too) or let it expire."""

    status = "UNAVAILABLE"


def _check_key(key: object, what: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"{what} must be a non-empty string, not {key!r}")
    if len(key) > MAX_KEY_CHARS:
        raise ValueError(f"{what} is longer than {MAX_KEY_CHARS} characters")


def check_units(value: object, what: str) -> int:
    """``value`` as a count of units: an int from 0 to MAX_UNITS, else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, not {value!r}")
    if not 0 <= value <= MAX_UNITS:
        raise ValueError(f"{what} must be between 0 and {MAX_UNITS}, not {value}")
    return value


def check_reservation_id(reservation_id: object) -> str:
    """A reservation id: a non-empty string of at most MAX_ID_CHARS characters."""
    if not isinstance(reservation_id, str) or not reservation_id:
        raise ValueError(f"a reservation id must be a non-empty string, not {reservation_id!r}")
    if len(reservation_id) > MAX_ID_CHARS:
        raise ValueError(f"a reservation id is longer than {MAX_ID_CHARS} characters")
    return reservation_id


@dataclass(frozen=True)
class Limit:
    """One GCRA limiter: ``rate`` units per ``period_seconds``, ``burst`` units at once.

    ``key`` names the limiter (the caller builds it, e.g. ``rl:retail:key=ops:requests``; a
    Redis store prefixes it). Two limits with the same key are one limiter."""

    key: str
    rate: float
    period_seconds: float
    burst: int

    def __post_init__(self) -> None:
        _check_key(self.key, "a limit's key")
        for name in ("rate", "period_seconds"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(f"limit {self.key!r}: {name} must be a positive number")
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
            raise ValueError(f"limit {self.key!r}: burst must be an integer >= 1")

    @cached_property
    def emission_seconds(self) -> float:
        """T: the time one unit takes at the steady rate."""
        return self.period_seconds / self.rate

    @cached_property
    def tolerance_seconds(self) -> float:
        """tau = T * (burst - 1): how far ahead of now the limiter lets its schedule run."""
        return self.emission_seconds * (self.burst - 1)


@dataclass(frozen=True)
class LimitVerdict:
    """The answer to :meth:`StateStore.take`.

    ``retry_after_seconds`` is 0 when allowed; when refused, the wait after which the refusing
    limit with the longest wait would admit the same cost (without other traffic, every limit
    then admits); ``math.inf`` when a cost exceeds that limit's burst and can never pass.
    ``limit_key`` is that limit's key (as the caller gave it), None when allowed."""

    allowed: bool
    retry_after_seconds: float
    limit_key: str | None


@dataclass(frozen=True)
class BudgetCharge:
    """One budget an amount is counted against.

    ``key`` names the budget window (e.g. ``budget:retail:app=storefront:tokens:day:2026-12-02``;
    the caller builds it). ``limit`` and ``amount`` are integer units (tokens, or cost in
    integer micro-units of currency). ``expires_at`` is the unix time after which the window's
    counters may be dropped (the end of the day or month, plus some slack)."""

    key: str
    limit: int
    amount: int
    expires_at: float

    def __post_init__(self) -> None:
        _check_key(self.key, "a budget's key")
        check_units(self.limit, f"budget {self.key!r}: limit")
        check_units(self.amount, f"budget {self.key!r}: amount")
        if (
            isinstance(self.expires_at, bool)
            or not isinstance(self.expires_at, int | float)
            or not math.isfinite(self.expires_at)
        ):
            raise ValueError(f"budget {self.key!r}: expires_at must be a unix time")


@dataclass(frozen=True)
class Reservation:
    """The answer to :meth:`StateStore.reserve`.

    ``ok``: every charge fitted and is now held. ``refused_key``: the first budget that did not
    fit (None when ok). ``remaining``: per budget key, the units left after this reservation
    (ok) or before it (refused), never below 0."""

    ok: bool
    reservation_id: str
    refused_key: str | None
    remaining: dict[str, int]


@dataclass(frozen=True)
class BudgetUsage:
    """One budget window's counters: units settled (``used``) and held by open reservations
    (``reserved``). Limits live with the caller, so usage does not depend on them."""

    used: int
    reserved: int


@runtime_checkable
class Subscription(Protocol):
    """Change notices on one channel, in order: an async iterator of messages.

    The first message is always ``""``: the subscription is live, and anything published from
    then on arrives. ``""`` comes again after a gap (a lost connection, a reader too slow to
    keep up): notices may have been missed, so re-read whatever they announce. Published
    messages are never empty."""

    def __aiter__(self) -> AsyncIterator[str]: ...

    async def __anext__(self) -> str: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class StateStore(Protocol):
    """Rate limiters, budgets and change notices: in this process, or shared through Redis.

    Every operation is atomic: concurrent callers (in one process or in several replicas)
    never see a half-done one, and ``take`` and ``reserve`` are all-or-nothing."""

    async def take(self, limits: Sequence[Limit], cost: Sequence[int]) -> LimitVerdict:
        """Admit ``cost[i]`` units on ``limits[i]`` for every i, or take nothing at all."""
        ...

    async def reserve(
        self, reservation_id: str, charges: Sequence[BudgetCharge], ttl_seconds: float
    ) -> Reservation:
        """Hold every charge's amount (used + reserved + amount <= limit for each), or nothing.

        A reservation neither settled nor released within ``ttl_seconds`` expires: its
        amounts go back the next time an operation touches its budgets."""
        ...

    async def settle(self, reservation_id: str, actual: Mapping[str, int]) -> None:
        """Count the reservation as used, ``actual[key]`` units per budget (the reserved
        amount for a key not in ``actual``), releasing what it held. Idempotent."""
        ...

    async def release(self, reservation_id: str) -> None:
        """Give the reservation's amounts back without counting any use. Idempotent."""
        ...

    async def usage(self, keys: Sequence[str]) -> dict[str, BudgetUsage]:
        """The counters of each budget window (zeros for one never charged)."""
        ...

    async def publish(self, channel: str, message: str) -> None:
        """Send a change notice to every subscriber of ``channel`` (in every replica)."""
        ...

    def subscribe(self, channel: str) -> Subscription:
        """Change notices on ``channel``; see :class:`Subscription`."""
        ...

    async def aclose(self) -> None:
        """Close connections and end open subscriptions."""
        ...


def check_take(limits: Sequence[Limit], cost: Sequence[int]) -> None:
    """ValueError unless ``limits`` and ``cost`` pair up: Limits, and unit counts."""
    if len(limits) != len(cost):
        raise ValueError(f"take: {len(limits)} limits but {len(cost)} costs")
    for limit, units in zip(limits, cost, strict=True):
        if not isinstance(limit, Limit):
            raise ValueError(f"take: not a Limit: {limit!r}")
        check_units(units, f"take: the cost on {limit.key!r}")


def check_reserve(reservation_id: str, charges: Sequence[BudgetCharge], ttl_seconds: float) -> None:
    """ValueError unless the arguments of a reserve are well formed."""
    check_reservation_id(reservation_id)
    seen: set[str] = set()
    for charge in charges:
        if not isinstance(charge, BudgetCharge):
            raise ValueError(f"reserve: not a BudgetCharge: {charge!r}")
        if charge.key in seen:
            raise ValueError(f"reserve: budget {charge.key!r} is charged twice")
        seen.add(charge.key)
    if (
        isinstance(ttl_seconds, bool)
        or not isinstance(ttl_seconds, int | float)
        or not math.isfinite(ttl_seconds)
        or not 0 < ttl_seconds <= 366 * 86400
    ):
        raise ValueError(
            f"reserve: ttl_seconds must be positive (at most a year), not {ttl_seconds!r}"
        )


def check_actual(actual: Mapping[str, int]) -> None:
    """ValueError unless ``actual`` maps budget keys to unit counts."""
    if not isinstance(actual, Mapping):
        raise ValueError(f"settle: actual must map budget keys to units, not {actual!r}")
    for key, units in actual.items():
        _check_key(key, "settle: a budget key")
        check_units(units, f"settle: the actual amount on {key!r}")


def check_channel(channel: object) -> str:
    """A channel name: a non-empty string."""
    _check_key(channel, "a channel")
    return channel  # type: ignore[return-value]


def check_message(message: object) -> str:
    """A published message: a non-empty string (the empty one means "re-read")."""
    if not isinstance(message, str) or not message:
        raise ValueError("a published message must be a non-empty string")
    return message
