"""The state store (router/state): GCRA limiters, budgets and change notices.

Every behaviour runs against the in-process store and against a real redis-server started on an
ephemeral port (those runs skip, saying why, where redis-server is not installed). The limiter
is held against an independent reference, a token bucket in exact rational arithmetic, with
hypothesis: the memory store under a controlled clock, and the Lua twin on the real server.
"""

from __future__ import annotations

import asyncio
import math
import random
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.config import StateConfig
from router.state import (
    BudgetCharge,
    BudgetUsage,
    Limit,
    MemoryStore,
    RedisStore,
    StateStore,
    StateUnavailable,
    open_store,
)
from router.state import memory as memory_module
from router.state.gcra import GCRA_LUA
from router.state.types import LATE_SETTLE_SECONDS
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")
DAY = 86400.0


def later(seconds: float = DAY) -> float:
    return time.time() + seconds


def at_once(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a memory-store call to its end; it must finish without ever suspending (that is
    what makes it atomic under asyncio)."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coroutine.close()
    raise AssertionError("the memory store suspended inside an operation")


class FakeClock:
    """Unix seconds that move only when a test says so."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


# -- the reference: a token bucket, exact


class TokenBucket:
    """A bucket of ``burst`` tokens refilled at ``rate / period`` per second, in exact rational
    arithmetic: a cost is admitted when that many tokens are there. Written independently of
    GCRA's schedule arithmetic; the two describe the same limiter."""

    def __init__(self, rate: int, period: float, burst: int, now: Fraction):
        self.capacity = Fraction(burst)
        self.fill = Fraction(rate) / Fraction(period)  # tokens per second
        self.tokens = self.capacity
        self.last = now

    def _refill(self, now: Fraction) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.fill)
        self.last = now

    def wait(self, now: Fraction, cost: int) -> Fraction | float:
        """0 when ``cost`` fits now; else the seconds until it would (inf: never)."""
        self._refill(now)
        if cost <= self.tokens:
            return Fraction(0)
        if cost > self.capacity:
            return math.inf
        return (cost - self.tokens) / self.fill

    def take(self, cost: int) -> None:
        self.tokens -= cost


def same_wait(got: float, want: Fraction | float) -> bool:
    if want == math.inf:
        return got == math.inf
    return math.isclose(got, float(want), rel_tol=1e-9, abs_tol=1e-6)


rates = st.integers(1, 100)
periods = st.sampled_from([0.5, 1.0, 2.0, 10.0, 60.0])
bursts = st.integers(1, 12)
# time moves in 1/64 s ticks, so every exact margin is either 0 or far above float rounding
steps = st.lists(st.tuples(st.integers(0, 128), st.integers(0, 15)), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(rate=rates, period=periods, burst=bursts, steps=steps)
def test_memory_limiter_matches_the_reference(
    rate: int, period: float, burst: int, steps: list[tuple[int, int]]
) -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    limit = Limit("rl:t:requests", rate, period, burst)
    bucket = TokenBucket(rate, period, burst, Fraction(clock.now))
    for ticks, cost in steps:
        clock.now += ticks / 64
        verdict = at_once(store.take([limit], [cost]))
        want = bucket.wait(Fraction(clock.now), cost)
        assert verdict.allowed == (want == 0), (clock.now, cost)
        if verdict.allowed:
            bucket.take(cost)
            assert verdict.retry_after_seconds == 0 and verdict.limit_key is None
        else:
            assert same_wait(verdict.retry_after_seconds, want), (verdict, float(want))
            assert verdict.limit_key == limit.key


@settings(max_examples=150, deadline=None)
@given(
    configs=st.fixed_dictionaries(
        {"a": st.tuples(rates, periods, bursts), "b": st.tuples(rates, periods, bursts)}
    ),
    steps=st.lists(
        st.tuples(
            st.integers(0, 128),
            st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 8)), min_size=1, max_size=3),
        ),
        min_size=1,
        max_size=30,
    ),
)
def test_memory_take_over_several_limits_is_all_or_nothing(
    configs: dict[str, tuple[int, float, int]],
    steps: list[tuple[int, list[tuple[str, int]]]],
) -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    limits = {key: Limit(key, *config) for key, config in configs.items()}
    buckets = {key: TokenBucket(*config, Fraction(clock.now)) for key, config in configs.items()}
    for ticks, wanted in steps:
        clock.now += ticks / 64
        now = Fraction(clock.now)
        verdict = at_once(
            store.take([limits[key] for key, _ in wanted], [cost for _, cost in wanted])
        )
        # the reference: offer each cost in order on tentative buckets; commit only if all fit
        tentative = {key: (b.tokens, b.last) for key, b in buckets.items()}
        waits: list[tuple[Fraction | float, str]] = []
        for key, cost in wanted:
            wait = buckets[key].wait(now, cost)
            if wait == 0:
                buckets[key].take(cost)
            else:
                waits.append((wait, key))
        assert verdict.allowed == (not waits)
        if not waits:
            continue
        for key, (tokens, last) in tentative.items():
            buckets[key].tokens, buckets[key].last = tokens, last
            buckets[key]._refill(now)
        longest = max(wait for wait, _ in waits)
        assert same_wait(verdict.retry_after_seconds, longest)
        tied = {key for wait, key in waits if same_wait(float(wait), longest)}
        assert verdict.limit_key in tied


LUA_STEP = (
    GCRA_LUA
    + """
local allowed, tat, wait = gcra(tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]))
if wait == math.huge then wait = -1 end
return {allowed and 1 or 0, string.format('%.17g', tat), string.format('%.17g', wait)}
"""
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rate=rates, period=periods, burst=bursts, steps=steps)
def test_lua_limiter_matches_the_reference(
    redis_server: RedisServer, rate: int, period: float, burst: int, steps: list[tuple[int, int]]
) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    step = client.register_script(LUA_STEP)
    limit = Limit("k", rate, period, burst)
    now = 1000.0
    tat = 0.0
    bucket = TokenBucket(rate, period, burst, Fraction(now))
    try:
        for ticks, cost in steps:
            now += ticks / 64
            args = [repr(tat), repr(now), repr(limit.emission_seconds)]
            args += [repr(limit.tolerance_seconds), cost, burst]
            allowed, tat_text, wait_text = step(args=args)
            tat = float(tat_text)
            wait = math.inf if wait_text == "-1" else float(wait_text)
            want = bucket.wait(Fraction(now), cost)
            assert (allowed == 1) == (want == 0), (now, cost)
            if allowed == 1:
                bucket.take(cost)
            else:
                assert same_wait(wait, want), (wait, float(want))
    finally:
        client.close()


# -- both stores


@pytest.fixture(params=["memory", "redis"])
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[], StateStore]]:
    """Makes stores that share state: the one memory store, or Redis clients of their own on
    one server and one fresh key prefix."""
    made: list[StateStore] = []
    if request.param == "memory":
        shared = MemoryStore()
        made.append(shared)

        def make() -> StateStore:
            return shared

    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        prefix = f"test-{uuid.uuid4().hex[:10]}:"

        def make() -> StateStore:
            store = RedisStore(server.url, timeout_ms=5000, key_prefix=prefix)
            made.append(store)
            return store

    yield make
    for store in made:
        await store.aclose()


@pytest.fixture()
def store(stores: Callable[[], StateStore]) -> StateStore:
    return stores()


async def stored_tat(store: StateStore, key: str) -> float:
    """A limiter's TAT as the store holds it."""
    if isinstance(store, MemoryStore):
        return store._tats[key]
    assert isinstance(store, RedisStore)
    return float(await store._client.get(store.key_prefix + key))


async def test_a_fresh_limiter_admits_its_burst_then_says_how_long_to_wait(
    store: StateStore,
) -> None:
    limit = Limit("rl:t:key=ops:requests", rate=2, period_seconds=3600, burst=3)
    verdicts = [await store.take([limit], [1]) for _ in range(4)]
    assert [v.allowed for v in verdicts] == [True, True, True, False]
    refused = verdicts[-1]
    assert refused.limit_key == limit.key
    assert 1790 < refused.retry_after_seconds <= 1800  # one unit per 1800 s
    too_big = await store.take([limit], [4])
    assert not too_big.allowed and too_big.retry_after_seconds == math.inf
    assert (await store.take([limit], [0])).allowed


async def test_a_refused_take_takes_nothing_from_any_limit(store: StateStore) -> None:
    roomy = Limit("rl:t:tenant:requests", rate=1, period_seconds=3600, burst=5)
    tight = Limit("rl:t:user=u1:requests", rate=1, period_seconds=3600, burst=1)
    assert (await store.take([roomy, tight], [1, 1])).allowed
    for _ in range(3):
        verdict = await store.take([roomy, tight], [1, 1])
        assert not verdict.allowed and verdict.limit_key == tight.key
        assert 3590 < verdict.retry_after_seconds <= 3600
    # roomy gave up one unit, not four
    assert [(await store.take([roomy], [1])).allowed for _ in range(5)] == [True] * 4 + [False]


async def test_the_same_limiter_twice_in_one_take_counts_both_costs(store: StateStore) -> None:
    limit = Limit("rl:t:tokens", rate=1, period_seconds=3600, burst=10)
    assert (await store.take([limit, limit], [4, 4])).allowed
    verdict = await store.take([limit, limit], [1, 2])
    assert not verdict.allowed  # 8 + 3 > 10
    assert (await store.take([limit, limit], [1, 1])).allowed


async def test_admitted_count_over_a_few_seconds_matches_rate_and_burst(store: StateStore) -> None:
    rate, burst = 20, 10
    limit = Limit(f"rl:run:{uuid.uuid4().hex}", rate=rate, period_seconds=1.0, burst=burst)
    assert (await store.take([limit], [1])).allowed
    # the store's own time of that first admission: a fresh limiter's TAT is then t0 + T
    t0 = await stored_tat(store, limit.key) - limit.emission_seconds
    admitted = 1
    stop = time.monotonic() + 3.0

    async def taker() -> None:
        nonlocal admitted
        while time.monotonic() < stop:
            if (await store.take([limit], [1])).allowed:
                admitted += 1
            await asyncio.sleep(0.005)

    await asyncio.gather(*(taker() for _ in range(6)))
    while (verdict := await store.take([limit], [1])).allowed:  # catch what is due now
        admitted += 1
    # the store's time of the refused take: TAT - tau - the wait it announced
    t_end = await stored_tat(store, limit.key) - limit.tolerance_seconds
    t_end -= verdict.retry_after_seconds
    expected = burst + rate * (t_end - t0)
    assert abs(admitted - expected) <= 1, (admitted, expected)


async def test_concurrent_reserves_admit_exactly_what_fits(store: StateStore) -> None:
    fits, amount = 23, 100
    charge = BudgetCharge("budget:t:tokens:day:d1", fits * amount, amount, later())
    results = await asyncio.gather(*(store.reserve(f"r{i}", [charge], 60) for i in range(64)))
    assert sum(r.ok for r in results) == fits
    assert all(r.refused_key == charge.key for r in results if not r.ok)
    assert all(r.remaining[charge.key] < amount for r in results if not r.ok)
    assert (await store.usage([charge.key]))[charge.key] == BudgetUsage(0, fits * amount)


def test_memory_reserves_from_many_threads_admit_exactly_what_fits() -> None:
    store = MemoryStore()
    fits, amount = 37, 10
    charge = BudgetCharge("budget:t:cost:month:m1", fits * amount, amount, later())
    oks: list[int] = []
    barrier = threading.Barrier(8)

    def worker(n: int) -> None:
        async def run() -> int:
            barrier.wait()
            results = [await store.reserve(f"th{n}-{i}", [charge], 60) for i in range(16)]
            return sum(r.ok for r in results)

        oks.append(asyncio.run(run()))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sum(oks) == fits
    assert at_once(store.usage([charge.key]))[charge.key] == BudgetUsage(0, fits * amount)


async def test_simultaneous_first_requests_of_a_new_user_admit_exactly_one(
    store: StateStore,
) -> None:
    tenant = BudgetCharge("budget:t:tokens:month:m1", 10**9, 500, later())
    user = BudgetCharge("budget:t:user=new:tokens:day:d1", 500, 500, later())
    results = await asyncio.gather(
        *(store.reserve(f"first{i}", [tenant, user], 60) for i in range(10))
    )
    assert sum(r.ok for r in results) == 1
    assert {r.refused_key for r in results if not r.ok} == {user.key}
    usage = await store.usage([tenant.key, user.key])
    assert usage == {tenant.key: BudgetUsage(0, 500), user.key: BudgetUsage(0, 500)}


PLANS = [
    "settle",
    "settle_twice",
    "settle_partly",
    "release",
    "release_then_settle",
    "settle_then_release",
    "cancel",
]


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_settle_release_cancel_interleavings_keep_the_books(
    store: StateStore, seed: int
) -> None:
    rng = random.Random(seed)
    expires = later()
    tenant_key = f"budget:s{seed}:tokens:day"
    users = [f"budget:s{seed}:user=u{i}:tokens:day" for i in range(3)]
    expected: Counter[str] = Counter()

    async def request(n: int, plan: str, streaming: asyncio.Event) -> None:
        amount = rng.randint(50, 400)
        user = rng.choice(users)
        charges = [
            BudgetCharge(tenant_key, 4000, amount, expires),
            BudgetCharge(user, 2000, amount, expires),
        ]
        rid = f"s{seed}-{n}"
        first = {tenant_key: rng.randint(0, 2 * amount), user: rng.randint(0, 2 * amount)}
        second = {tenant_key: rng.randint(0, 2 * amount), user: rng.randint(0, 2 * amount)}
        await asyncio.sleep(rng.random() * 0.02)
        try:
            reservation = await store.reserve(rid, charges, 60)
            streaming.set()
            await asyncio.sleep(10 if plan == "cancel" else rng.random() * 0.02)
            if plan == "settle":
                await store.settle(rid, first)
            elif plan == "settle_twice":  # at the same moment, and once more later
                await asyncio.gather(store.settle(rid, first), store.settle(rid, first))
                await store.settle(rid, second)
            elif plan == "settle_partly":  # the user's budget settles at the reserved amount
                first = {tenant_key: first[tenant_key], user: amount}
                await store.settle(rid, {tenant_key: first[tenant_key]})
            elif plan == "release":
                await store.release(rid)
                await store.release(rid)
            elif plan == "release_then_settle":
                await store.release(rid)
                await store.settle(rid, first)
            elif plan == "settle_then_release":
                await store.settle(rid, first)
                await store.release(rid)
            if reservation.ok and plan.startswith("settle"):
                expected.update(first)
        except asyncio.CancelledError:  # as the pipeline does when a caller goes away
            await store.release(rid)
            raise

    tasks = []
    for n in range(40):
        plan = rng.choice(PLANS)
        streaming = asyncio.Event()
        task = asyncio.create_task(request(n, plan, streaming))
        tasks.append(task)
        if plan == "cancel":

            async def cancel(task: asyncio.Task[None], streaming: asyncio.Event) -> None:
                await streaming.wait()
                await asyncio.sleep(rng.random() * 0.02)
                task.cancel()

            tasks.append(asyncio.create_task(cancel(task, streaming)))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(r is None or isinstance(r, asyncio.CancelledError) for r in results), results
    usage = await store.usage([tenant_key, *users])
    assert {key: u.reserved for key, u in usage.items()} == dict.fromkeys(usage, 0)
    assert {key: u.used for key, u in usage.items()} == {key: expected[key] for key in usage}


async def test_an_expired_reservation_gives_its_amount_back(store: StateStore) -> None:
    key = "budget:t:app=storefront:tokens:day:d1"
    charge = BudgetCharge(key, 100, 100, later())
    assert (await store.reserve("stale", [charge], 0.3)).ok
    assert not (await store.reserve("blocked", [charge], 60)).ok
    await asyncio.sleep(0.6)
    assert (await store.usage([key]))[key] == BudgetUsage(0, 0)
    assert (await store.reserve("fresh", [charge], 60)).ok
    await store.settle("stale", {key: 7})  # settled late: what it used still counts
    assert (await store.usage([key]))[key] == BudgetUsage(7, 100)
    await store.release("fresh")
    assert (await store.usage([key]))[key] == BudgetUsage(7, 0)


async def test_actual_use_beyond_the_reservation_is_counted(store: StateStore) -> None:
    key = "budget:t:tokens:day:d1"
    assert (await store.reserve("a", [BudgetCharge(key, 1000, 100, later())], 60)).ok
    await store.settle("a", {key: 950})  # a backend that ignored max_tokens
    refused = await store.reserve("b", [BudgetCharge(key, 1000, 100, later())], 60)
    assert not refused.ok and refused.remaining == {key: 50}
    await store.settle("c-never-reserved", {key: 10})  # nothing to settle: no change
    assert (await store.usage([key]))[key] == BudgetUsage(950, 0)


async def test_a_repeated_reserve_charges_once_and_a_finished_id_is_refused(
    store: StateStore,
) -> None:
    key = "budget:t:tokens:day:d1"
    charge = BudgetCharge(key, 1000, 300, later())
    first = await store.reserve("same", [charge], 60)
    again = await store.reserve("same", [charge], 60)  # a retry after a lost answer
    assert first.ok and again.ok
    assert first.remaining == again.remaining == {key: 700}
    assert (await store.usage([key]))[key] == BudgetUsage(0, 300)
    await store.settle("same", {key: 250})
    with pytest.raises(ValueError, match="already settled"):
        await store.reserve("same", [charge], 60)
    assert (await store.usage([key]))[key] == BudgetUsage(250, 0)


async def test_publish_reaches_another_clients_subscription(
    stores: Callable[[], StateStore],
) -> None:
    listener, speaker = stores(), stores()
    subscription = listener.subscribe("changes")
    assert await asyncio.wait_for(anext(subscription), 10) == ""  # live
    messages = ["model retail v0002", "rules retail 7", "ünïcode ✓"]
    await speaker.publish("elsewhere", "not for this channel")
    for message in messages:
        await speaker.publish("changes", message)
    got = [await asyncio.wait_for(anext(subscription), 10) for _ in messages]
    assert got == messages
    await subscription.aclose()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(subscription), 10)


BAD_CALLS: list[tuple[str, Callable[[StateStore], Coroutine[Any, Any, Any]]]] = [
    ("costs", lambda s: s.take([Limit("k", 1, 1, 1)], [1, 2])),
    ("between 0", lambda s: s.take([Limit("k", 1, 1, 1)], [-1])),
    ("integer", lambda s: s.take([Limit("k", 1, 1, 1)], [1.5])),  # type: ignore[list-item]
    ("positive", lambda s: s.reserve("r", [], 0)),
    ("non-empty", lambda s: s.reserve("", [], 10)),
    ("twice", lambda s: s.reserve("r", [BudgetCharge("b", 1, 1, later())] * 2, 10)),
    ("between 0", lambda s: s.settle("r", {"b": -5})),
    ("non-empty", lambda s: s.publish("c", "")),
    ("non-empty", lambda s: s.release("")),
]


@pytest.mark.parametrize(("match", "call"), BAD_CALLS)
async def test_malformed_calls_are_value_errors(
    store: StateStore, match: str, call: Callable[[StateStore], Coroutine[Any, Any, Any]]
) -> None:
    with pytest.raises(ValueError, match=match):
        await call(store)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"key": "", "rate": 1, "period_seconds": 1, "burst": 1}, "non-empty"),
        ({"key": "k", "rate": 0, "period_seconds": 1, "burst": 1}, "rate"),
        ({"key": "k", "rate": 1, "period_seconds": math.inf, "burst": 1}, "period"),
        ({"key": "k", "rate": 1, "period_seconds": 1, "burst": 0}, "burst"),
    ],
)
def test_malformed_limits_are_value_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Limit(**kwargs)


def test_malformed_charges_are_value_errors() -> None:
    with pytest.raises(ValueError, match="amount"):
        BudgetCharge("b", 10, -1, later())
    with pytest.raises(ValueError, match="limit"):
        BudgetCharge("b", 2**60, 1, later())
    with pytest.raises(ValueError, match="unix time"):
        BudgetCharge("b", 10, 1, math.nan)


def test_open_store_follows_the_configuration() -> None:
    assert isinstance(open_store(StateConfig()), MemoryStore)
    store = open_store(
        StateConfig(kind="redis", url="redis://127.0.0.1:1/0", timeout_ms=50, key_prefix="p:")
    )
    assert isinstance(store, RedisStore)
    assert (store.key_prefix, store.timeout_ms) == ("p:", 50)


# -- memory only


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(
                st.just("reserve"), st.integers(0, 60), st.integers(0, 60), st.integers(1, 8)
            ),
            st.tuples(st.just("settle"), st.integers(0, 30), st.integers(0, 90)),
            st.tuples(st.just("release"), st.integers(0, 30)),
            st.tuples(st.just("wait"), st.sampled_from([1, 2, 5, 30])),
        ),
        max_size=60,
    )
)
def test_memory_budgets_match_a_simple_model(ops: list[tuple[Any, ...]]) -> None:
    """Reserve, settle, release and expiry against a model: a reservation holds its amounts
    while it is open and its deadline is ahead; settling counts its actual use once."""
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    limits = {"A": 100, "B": 60}
    records: dict[str, dict[str, Any]] = {}  # id -> state, deadline, amounts
    used: Counter[str] = Counter()
    made = 0

    def reserved(key: str) -> int:
        return sum(
            r["amounts"][key]
            for r in records.values()
            if r["state"] == "open" and r["deadline"] > clock.now
        )

    for op in ops:
        if op[0] == "reserve":
            _, a, b, ttl = op
            rid = f"r{made}"
            made += 1
            charges = [BudgetCharge("A", 100, a, later()), BudgetCharge("B", 60, b, later())]
            result = at_once(store.reserve(rid, charges, ttl))
            fits = all(
                used[k] + reserved(k) + amount <= limits[k] for k, amount in (("A", a), ("B", b))
            )
            assert result.ok == fits
            if fits:
                records[rid] = {
                    "state": "open",
                    "deadline": clock.now + ttl,
                    "keep": clock.now + ttl + max(ttl, LATE_SETTLE_SECONDS),
                    "amounts": {"A": a, "B": b},
                }
        elif op[0] in ("settle", "release"):
            rid = f"r{op[1]}"
            if op[0] == "settle":
                at_once(store.settle(rid, {"A": op[2]}))
            else:
                at_once(store.release(rid))
            record = records.get(rid)
            if record is not None and record["state"] == "open" and clock.now < record["keep"]:
                record["state"] = op[0]
                if op[0] == "settle":
                    used.update({"A": op[2], "B": record["amounts"]["B"]})
        else:
            clock.now += op[1]
        usage = at_once(store.usage(["A", "B"]))
        assert usage == {k: BudgetUsage(used[k], reserved(k)) for k in ("A", "B")}


async def test_memory_subscription_wakes_for_a_publish_from_another_thread() -> None:
    store = MemoryStore()
    subscription = store.subscribe("changes")
    assert await asyncio.wait_for(anext(subscription), 10) == ""
    waiting = asyncio.create_task(anext(subscription))
    await asyncio.sleep(0.01)  # the reader is waiting now
    thread = threading.Thread(target=lambda: asyncio.run(store.publish("changes", "from admin")))
    thread.start()
    thread.join(timeout=10)
    assert await asyncio.wait_for(waiting, 10) == "from admin"
    await store.aclose()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(subscription), 10)


async def test_memory_subscription_that_falls_behind_is_told_to_re_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(memory_module, "MAX_QUEUED_NOTICES", 3)
    store = MemoryStore()
    subscription = store.subscribe("changes")
    assert await asyncio.wait_for(anext(subscription), 10) == ""
    for n in range(4):
        await store.publish("changes", f"m{n}")
    # three were queued when m3 came: they are dropped, and "" says that notices were lost
    got = [await asyncio.wait_for(anext(subscription), 10) for _ in range(2)]
    assert got == ["", "m3"]
    await store.publish("changes", "m4")
    assert await asyncio.wait_for(anext(subscription), 10) == "m4"
    await subscription.aclose()


# -- Redis only


@pytest.fixture()
async def redis_store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    store = RedisStore(redis_server.url, timeout_ms=5000, key_prefix=f"t-{uuid.uuid4().hex}:")
    yield store
    await store.aclose()


@pytest.fixture()
async def admin(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain client of the test server, beside the store's own."""
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from router.state import BudgetCharge, RedisStore

    async def main(url, prefix, key, limit, amount, expires, first, count, ttl):
        store = RedisStore(url, timeout_ms=10000, key_prefix=prefix)
        await store.usage([key])  # connected
        print("ready", flush=True)
        sys.stdin.readline()
        charge = BudgetCharge(key, int(limit), int(amount), float(expires))
        results = await asyncio.gather(
            *(store.reserve(f"p{int(first) + i}", [charge], float(ttl)) for i in range(int(count)))
        )
        print(sum(r.ok for r in results), flush=True)
        sys.stdin.readline()
        await store.aclose()

    asyncio.run(main(*sys.argv[1:]))
    """
)


def start_workers(
    url: str, prefix: str, charge: BudgetCharge, counts: list[int], ttl: float
) -> list[subprocess.Popen[str]]:
    """Processes that each connect, say "ready", and reserve ``count`` times at once on "go"."""
    workers = []
    first = 0
    for count in counts:
        args = [url, prefix, charge.key, charge.limit, charge.amount, charge.expires_at]
        args += [first, count, ttl]
        workers.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, *map(str, args)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
        )
        first += count
    for worker in workers:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
    return workers


def tell(worker: subprocess.Popen[str], line: str = "go") -> None:
    assert worker.stdin is not None
    worker.stdin.write(line + "\n")
    worker.stdin.flush()


def test_reserves_from_three_processes_admit_exactly_what_fits(redis_server: RedisServer) -> None:
    prefix = f"procs-{uuid.uuid4().hex}:"
    fits, amount = 29, 1000
    charge = BudgetCharge("budget:t:cost:month:m1", fits * amount, amount, later())
    workers = start_workers(redis_server.url, prefix, charge, [22, 21, 21], ttl=60)
    try:
        for worker in workers:
            tell(worker)
        admitted = [int(worker.stdout.readline()) for worker in workers]  # type: ignore[union-attr]
        for worker in workers:
            tell(worker, "done")
            assert worker.wait(timeout=60) == 0
    finally:
        for worker in workers:
            worker.kill()
    assert sum(admitted) == fits

    async def usage() -> dict[str, BudgetUsage]:
        store = RedisStore(redis_server.url, key_prefix=prefix)
        try:
            return await store.usage([charge.key])
        finally:
            await store.aclose()

    assert asyncio.run(usage())[charge.key] == BudgetUsage(0, fits * amount)


async def test_a_crashed_replica_cannot_keep_its_reservations(
    redis_server: RedisServer, redis_store: RedisStore
) -> None:
    charge = BudgetCharge("budget:t:tokens:day:d1", 1000, 100, later())
    [worker] = start_workers(redis_server.url, redis_store.key_prefix, charge, [4], ttl=0.5)
    try:
        tell(worker)
        assert worker.stdout is not None and int(worker.stdout.readline()) == 4
    finally:
        worker.kill()  # it never settles nor releases
        worker.wait(timeout=60)
    assert (await redis_store.usage([charge.key]))[charge.key] == BudgetUsage(0, 400)
    await asyncio.sleep(1.0)
    assert (await redis_store.usage([charge.key]))[charge.key] == BudgetUsage(0, 0)


async def test_every_key_expires(redis_store: RedisStore, admin: aioredis.Redis) -> None:
    limit = Limit("rl:t:requests", rate=1, period_seconds=60, burst=3)
    assert (await redis_store.take([limit], [1])).allowed
    expires = later(3600)
    charge = BudgetCharge("budget:t:tokens:day:d1", 1000, 100, expires)
    assert (await redis_store.reserve("r1", [charge], 60)).ok
    assert (await redis_store.reserve("r2", [charge], 60)).ok
    await redis_store.settle("r1", {charge.key: 80})
    await redis_store.release("r2")
    keys = await admin.keys(redis_store.key_prefix + "*")
    assert len(keys) == 4  # the limiter, the budget's hash, two records (the open set is empty)
    for key in keys:
        assert await admin.pttl(key) > 0, key
    assert 0 < await admin.pttl(redis_store.key_prefix + limit.key) <= 60_000
    budget_ttl = await admin.pttl(redis_store.key_prefix + charge.key) / 1000
    assert expires - time.time() - 60 < budget_ttl <= expires - time.time() + 1


async def test_scripts_are_loaded_again_after_a_flush(
    redis_store: RedisStore, admin: aioredis.Redis
) -> None:
    limit = Limit("rl:t:requests", rate=1, period_seconds=60, burst=5)
    charge = BudgetCharge("budget:t:tokens:day:d1", 1000, 100, later())
    assert (await redis_store.take([limit], [1])).allowed
    await admin.script_flush()
    assert (await redis_store.take([limit], [1])).allowed
    assert (await redis_store.reserve("r", [charge], 60)).ok
    await admin.script_flush()
    await redis_store.settle("r", {charge.key: 10})
    await admin.script_flush()
    assert (await redis_store.usage([charge.key]))[charge.key] == BudgetUsage(10, 0)


async def test_a_paused_redis_raises_state_unavailable_and_then_answers_again(
    redis_store: RedisStore, redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    store = RedisStore(redis_server.url, timeout_ms=200, key_prefix=redis_store.key_prefix)
    limit = Limit("rl:t:requests", rate=1000, period_seconds=1, burst=1000)
    charge = BudgetCharge("budget:t:tokens:day:d1", 1000, 1, later())
    try:
        assert (await store.take([limit], [1])).allowed
        await admin.execute_command("CLIENT", "PAUSE", "1000")
        try:
            with pytest.raises(StateUnavailable, match="no answer within 200 ms"):
                await store.take([limit], [1])
            with pytest.raises(StateUnavailable, match="no answer within 200 ms"):
                await store.reserve("r", [charge], 60)
        finally:
            await admin.execute_command("CLIENT", "UNPAUSE")
        assert (await store.take([limit], [1])).allowed
        await store.usage([charge.key])
    finally:
        await store.aclose()


async def test_redis_stopped_mid_run_raises_state_unavailable_and_recovers() -> None:
    server = RedisServer()
    server.start()
    store = RedisStore(server.url, timeout_ms=300, key_prefix="down:")
    listener = RedisStore(server.url, timeout_ms=300, key_prefix="down:")
    limit = Limit("rl:t:requests", rate=100, period_seconds=1, burst=100)
    charge = BudgetCharge("budget:t:tokens:day:d1", 1000, 10, later())
    heard: asyncio.Queue[str] = asyncio.Queue()
    subscription = listener.subscribe("changes")

    async def listen() -> None:
        async for message in subscription:
            heard.put_nowait(message)

    listening = asyncio.create_task(listen())
    try:
        assert await asyncio.wait_for(heard.get(), 10) == ""
        assert (await store.take([limit], [1])).allowed
        assert (await store.reserve("before", [charge], 60)).ok
        server.stop()
        calls: list[Callable[[], Coroutine[Any, Any, Any]]] = [
            lambda: store.take([limit], [1]),
            lambda: store.reserve("during", [charge], 60),
            lambda: store.settle("before", {charge.key: 5}),
            lambda: store.release("before"),
            lambda: store.usage([charge.key]),
            lambda: store.publish("changes", "lost"),
        ]
        for call in calls:
            with pytest.raises(StateUnavailable, match="unavailable"):
                await call()
        server.start()  # the same port, empty: no data and no scripts
        assert (await store.take([limit], [1])).allowed
        assert (await store.reserve("after", [charge], 60)).ok
        await store.settle("after", {charge.key: 4})
        assert (await store.usage([charge.key]))[charge.key] == BudgetUsage(4, 0)
        assert await asyncio.wait_for(heard.get(), 20) == ""  # subscribed again: re-read
        await store.publish("changes", "after the restart")
        assert await asyncio.wait_for(heard.get(), 10) == "after the restart"
    finally:
        await subscription.aclose()
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
        await store.aclose()
        await listener.aclose()
        server.close()


async def test_the_first_call_after_a_quiet_restart_goes_through() -> None:
    """Pooled connections to a Redis that restarted while nobody called are dead: the first
    call finds out, and goes once more on a new connection instead of failing."""
    server = RedisServer()
    server.start()
    store = RedisStore(server.url, timeout_ms=2000, key_prefix="quiet:")
    limit = Limit("rl:t:requests", rate=100, period_seconds=1, burst=100)
    try:
        assert (await store.take([limit], [1])).allowed  # a pooled connection now
        server.stop()
        server.start()
        assert (await store.take([limit], [1])).allowed
    finally:
        await store.aclose()
        server.close()
