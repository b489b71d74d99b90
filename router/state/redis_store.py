"""The Redis state store: limiters, budgets and notices shared by every replica.

Each operation on the request path is one Lua script, so it is atomic and costs one round
trip: scripts are called by their SHA1 (EVALSHA) and loaded again when Redis answers NOSCRIPT
(after a restart or a SCRIPT FLUSH). Time inside the scripts is Redis's own (``TIME``), so
replicas with skewed clocks agree. Every call is bounded by the configured timeout, both by the
sockets' timeouts and by ``asyncio.timeout``; a call that cannot finish raises
:class:`~router.state.types.StateUnavailable`. Nothing is retried (a retried script could
count twice); a broken connection is dropped and the next call opens a fresh one, so the store
works again as soon as Redis does.

Keys (all behind ``key_prefix``):

- ``<limit key>``: a limiter's TAT, a decimal string; expires when the TAT passes.
- ``<budget key>``: a hash of ``used``, ``reserved`` and one ``r:<reservation id>`` field per
  open hold; ``<budget key>|open``: a sorted set of the open holds by deadline (ms). Both expire
  at the window's ``expires_at``.
- ``reservation:<id>``: the reservation's record, JSON ``{"s": state, "k": [[budget key,
  units, expiry ms], ...]}``. An open one is kept past its deadline for ``max(ttl,
  LATE_SETTLE_SECONDS)``, so that a late settle still counts; a finished one for
  ``FINISHED_KEEP_SECONDS``, so that a reserve repeating its id is refused.

The budget scripts reach the ``|open`` sets and the budgets a reservation holds by names built
inside the script, so the store needs one Redis (standalone, or a primary with replicas and
Sentinel), not Redis Cluster. Redis 5.0 or later.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from router.state.gcra import GCRA_LUA
from router.state.types import (
    FINISHED_KEEP_SECONDS,
    LATE_SETTLE_SECONDS,
    BudgetCharge,
    BudgetUsage,
    Limit,
    LimitVerdict,
    Reservation,
    StateUnavailable,
    check_actual,
    check_channel,
    check_message,
    check_reservation_id,
    check_reserve,
    check_take,
)

log = logging.getLogger("plexus.state")
T = TypeVar("T")

REUSED = "PLEXUS_REUSED"  # RESERVE_LUA's error for the id of a finished reservation
PING_SECONDS = 5.0  # an idle subscription pings this often...
SILENT_SECONDS = 15.0  # ...and reconnects when nothing at all came back for this long
MAX_BACKOFF_SECONDS = 2.0

TAKE_LUA = (
    GCRA_LUA
    + """
-- KEYS: limiters. ARGV, four per limiter: emission interval, tolerance, cost, burst.
-- Returns {1, "0", 0} when every limiter admits its cost (each then moves on), else
-- {0, wait, i} for the refusing limiter i with the longest wait ("inf": never) and no change.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tats, order = {}, {}
local worst, worst_i = -1, 0
for i = 1, #KEYS do
  local key = KEYS[i]
  local tat = tats[key]
  if tat == nil then tat = tonumber(redis.call('GET', key) or '0') or 0 end
  local j = 4 * (i - 1)
  local cost = tonumber(ARGV[j + 3])
  local allowed, new_tat, wait = gcra(
    tat, now, tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2]), cost, tonumber(ARGV[j + 4]))
  if allowed then
    if cost > 0 then
      if tats[key] == nil then order[#order + 1] = key end
      tats[key] = new_tat
    end
  elseif wait > worst then
    worst, worst_i = wait, i
  end
end
if worst_i > 0 then
  if worst == math.huge then return {0, 'inf', worst_i} end
  return {0, string.format('%.17g', worst), worst_i}
end
for _, key in ipairs(order) do
  local tat = tats[key]
  local ttl = math.ceil((tat - now) * 1000)
  if ttl < 1 then ttl = 1 end
  redis.call('SET', key, string.format('%.17g', tat), 'PX', string.format('%d', ttl))
end
return {1, '0', 0}
"""
)

BUDGET_LUA = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function num(s) return tonumber(s) or 0 end
local function int(n) return string.format('%d', n) end
local function incr(key, field, n)
  if n ~= 0 then redis.call('HINCRBY', key, field, int(n)) end
end
-- Give back the holds on budget `key` whose deadline has passed.
local function return_expired(key)
  local open = key .. '|open'
  local ids = redis.call('ZRANGEBYSCORE', open, '-inf', int(now_ms), 'LIMIT', 0, 1000)
  for _, rid in ipairs(ids) do
    local field = 'r:' .. rid
    local units = redis.call('HGET', key, field)
    if units then
      incr(key, 'reserved', -num(units))
      redis.call('HDEL', key, field)
    end
  end
  if #ids > 0 then redis.call('ZREM', open, unpack(ids)) end
end
"""

RESERVE_LUA = (
    BUDGET_LUA
    + """
-- KEYS[1]: the reservation's record; KEYS[2..]: budget windows.
-- ARGV[1]: reservation id; ARGV[2]: ttl (ms); ARGV[3]: how long the record outlives its
-- deadline (ms); then three per budget: limit, amount, expiry (ms).
-- Returns {status, refused, left...}: status 1 reserved now, 2 already open (a repeat), 0
-- refused at budget `refused`; left: each budget's limit - used - reserved before this call.
local rid = ARGV[1]
local n = #KEYS - 1
local record = redis.call('GET', KEYS[1])
if record then
  local state = cjson.decode(record).s
  if state ~= 'open' then
    return redis.error_reply('PLEXUS_REUSED ' .. state)
  end
end
local left = {}
for i = 1, n do
  local key = KEYS[i + 1]
  return_expired(key)
  local v = redis.call('HMGET', key, 'used', 'reserved')
  left[i] = num(ARGV[3 * i + 1]) - num(v[1]) - num(v[2])
end
if record then return {2, 0, unpack(left)} end
for i = 1, n do
  if num(ARGV[3 * i + 2]) > left[i] then return {0, i, unpack(left)} end
end
local deadline = now_ms + num(ARGV[2])
local held = {}
for i = 1, n do
  local key = KEYS[i + 1]
  local amount = ARGV[3 * i + 2]
  local expires = num(ARGV[3 * i + 3])
  if expires < deadline then expires = deadline end
  incr(key, 'reserved', num(amount))
  redis.call('HSET', key, 'r:' .. rid, amount)
  redis.call('ZADD', key .. '|open', int(deadline), rid)
  redis.call('PEXPIREAT', key, int(expires))
  redis.call('PEXPIREAT', key .. '|open', int(expires))
  held[i] = {key, amount, int(expires)}
end
local keep = deadline - now_ms + num(ARGV[3])
redis.call('SET', KEYS[1], cjson.encode({s = 'open', k = held}), 'PX', int(keep))
return {1, 0, unpack(left)}
"""
)

FINISH_LUA = (
    BUDGET_LUA
    + """
-- KEYS[1]: the reservation's record. ARGV[1]: reservation id; ARGV[2]: settle | release;
-- ARGV[3]: how long the finished record is kept (ms); then pairs of budget key and actual
-- units (settle). Returns 1 if it finished the
-- reservation, 0 if there was nothing open to finish.
local record = redis.call('GET', KEYS[1])
if not record then return 0 end
local r = cjson.decode(record)
if r.s ~= 'open' then return 0 end
local rid = ARGV[1]
local settle = ARGV[2] == 'settle'
local actual = {}
for i = 4, #ARGV, 2 do actual[ARGV[i]] = ARGV[i + 1] end
for _, held in ipairs(r.k) do
  local key, units, expires = held[1], held[2], held[3]
  return_expired(key)
  local field = 'r:' .. rid
  if redis.call('HEXISTS', key, field) == 1 then
    incr(key, 'reserved', -num(units))
    redis.call('HDEL', key, field)
    redis.call('ZREM', key .. '|open', rid)
  end
  if settle and num(expires) > now_ms then
    incr(key, 'used', num(actual[key] or units))
    redis.call('PEXPIREAT', key, expires)
  end
end
if settle then r.s = 'settled' else r.s = 'released' end
redis.call('SET', KEYS[1], cjson.encode(r), 'PX', ARGV[3])
return 1
"""
)

USAGE_LUA = (
    BUDGET_LUA
    + """
-- KEYS: budget windows. Returns used, reserved for each.
local out = {}
for i = 1, #KEYS do
  return_expired(KEYS[i])
  local v = redis.call('HMGET', KEYS[i], 'used', 'reserved')
  out[2 * i - 1] = num(v[1])
  out[2 * i] = num(v[2])
end
return out
"""
)


class _Script:
    """A Lua script known by its SHA1."""

    def __init__(self, text: str):
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()


def _ms(seconds: float) -> str:
    return str(max(1, math.ceil(seconds * 1000)))


def describe_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    host = parts.hostname or "localhost"
    port = parts.port or 6379
    return f"{parts.scheme}://{host}:{port}{parts.path or ''}"


class RedisStore:
    """The state store on one Redis. See the module docstring for keys and guarantees."""

    def __init__(self, url: str, *, timeout_ms: float = 250.0, key_prefix: str = "plexus:"):
        if timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be positive, not {timeout_ms}")
        self.where = describe_url(url)
        self.timeout_ms = timeout_ms
        self.key_prefix = key_prefix
        self._timeout = timeout_ms / 1000
        self._client = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            retry=Retry(NoBackoff(), 0),
            client_name="plexus",
        )
        self._take = _Script(TAKE_LUA)
        self._reserve = _Script(RESERVE_LUA)
        self._finish = _Script(FINISH_LUA)
        self._usage = _Script(USAGE_LUA)
        self._subscriptions: set[_RedisSubscription] = set()
        self._down = False

    # -- calls, bounded and mapped

    def _unavailable(self, why: str) -> StateUnavailable:
        if not self._down:
            self._down = True
            log.warning("state store %s is unavailable: %s", self.where, why)
        return StateUnavailable(f"state store {self.where} is unavailable: {why}")

    async def _bounded(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    result = await call()
                except RedisConnectionError:
                    # A pooled connection the server closed (Redis restarted, an idle timeout):
                    # the command never reached a live server, so it goes once more, on a new
                    # connection, within the same time bound.
                    result = await call()
        except TimeoutError:
            raise self._unavailable(f"no answer within {self.timeout_ms:g} ms") from None
        except ResponseError as exc:
            if str(exc).startswith(REUSED):
                raise
            raise self._unavailable(f"Redis refused the operation: {exc}") from None
        except (RedisError, OSError) as exc:
            raise self._unavailable(str(exc) or type(exc).__name__) from None
        if self._down:
            self._down = False
            log.warning("state store %s is answering again", self.where)
        return result

    async def _run(self, script: _Script, keys: list[str], args: list[str]) -> Any:
        async def call() -> Any:
            try:
                return await self._client.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:  # Redis restarted or flushed its scripts: load it again
                await self._client.script_load(script.text)
                return await self._client.evalsha(script.sha, len(keys), *keys, *args)

        return await self._bounded(call)

    def _key(self, key: str) -> str:
        return self.key_prefix + key

    def _record(self, reservation_id: str) -> str:
        return f"{self.key_prefix}reservation:{reservation_id}"

    # -- rate limits

    async def take(self, limits: Sequence[Limit], cost: Sequence[int]) -> LimitVerdict:
        check_take(limits, cost)
        if not limits:
            return LimitVerdict(True, 0.0, None)
        args: list[str] = []
        for limit, units in zip(limits, cost, strict=True):
            args += [
                repr(limit.emission_seconds),
                repr(limit.tolerance_seconds),
                str(units),
                str(limit.burst),
            ]
        allowed, wait, index = await self._run(
            self._take, [self._key(limit.key) for limit in limits], args
        )
        if allowed == 1:
            return LimitVerdict(True, 0.0, None)
        return LimitVerdict(False, float(wait), limits[int(index) - 1].key)

    # -- budgets

    async def reserve(
        self, reservation_id: str, charges: Sequence[BudgetCharge], ttl_seconds: float
    ) -> Reservation:
        check_reserve(reservation_id, charges, ttl_seconds)
        keep = max(ttl_seconds, LATE_SETTLE_SECONDS)
        args = [reservation_id, _ms(ttl_seconds), _ms(keep)]
        for charge in charges:
            args += [
                str(charge.limit),
                str(charge.amount),
                str(math.floor(charge.expires_at * 1000)),
            ]
        keys = [self._record(reservation_id)] + [self._key(c.key) for c in charges]
        try:
            reply = await self._run(self._reserve, keys, args)
        except ResponseError as exc:
            state = str(exc).removeprefix(REUSED).strip()
            raise ValueError(
                f"reservation {reservation_id!r} is already {state}: "
                "use a new id for each reservation"
            ) from None
        status, refused, *lefts = reply
        if status == 0:
            remaining = {c.key: max(0, int(left)) for c, left in zip(charges, lefts, strict=True)}
            return Reservation(False, reservation_id, charges[int(refused) - 1].key, remaining)
        taken = status == 1
        remaining = {
            c.key: max(0, int(left) - (c.amount if taken else 0))
            for c, left in zip(charges, lefts, strict=True)
        }
        return Reservation(True, reservation_id, None, remaining)

    async def settle(self, reservation_id: str, actual: Mapping[str, int]) -> None:
        check_reservation_id(reservation_id)
        check_actual(actual)
        args = [reservation_id, "settle", _ms(FINISHED_KEEP_SECONDS)]
        for key, units in actual.items():
            args += [self._key(key), str(units)]
        await self._run(self._finish, [self._record(reservation_id)], args)

    async def release(self, reservation_id: str) -> None:
        check_reservation_id(reservation_id)
        await self._run(
            self._finish,
            [self._record(reservation_id)],
            [reservation_id, "release", _ms(FINISHED_KEEP_SECONDS)],
        )

    async def usage(self, keys: Sequence[str]) -> dict[str, BudgetUsage]:
        keys = list(keys)
        if not keys:
            return {}
        reply = await self._run(self._usage, [self._key(key) for key in keys], [])
        return {
            key: BudgetUsage(int(reply[2 * i]), int(reply[2 * i + 1])) for i, key in enumerate(keys)
        }

    # -- change notices

    async def publish(self, channel: str, message: str) -> None:
        check_channel(channel)
        check_message(message)
        await self._bounded(lambda: self._client.publish(self._key(channel), message))

    def subscribe(self, channel: str) -> _RedisSubscription:
        check_channel(channel)
        subscription = _RedisSubscription(self, self._key(channel))
        self._subscriptions.add(subscription)
        return subscription

    async def aclose(self) -> None:
        for subscription in list(self._subscriptions):
            await subscription.aclose()
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()


class _RedisSubscription:
    """One channel's notices over a dedicated connection that reconnects by itself.

    Yields ``""`` each time it is (again) subscribed, then the channel's messages. A lost
    connection, or one silent for ``SILENT_SECONDS`` despite pings, is dropped and opened
    again with backoff; the reader just waits meanwhile."""

    def __init__(self, store: RedisStore, channel: str):
        self._store = store
        self._channel = channel
        self._pubsub: Any = None
        self._closed = False
        self._backoff = 0.0
        self._last_seen = 0.0
        self._last_ping = 0.0

    def __aiter__(self) -> _RedisSubscription:
        return self

    async def _connect(self) -> None:
        pubsub = self._store._client.pubsub()
        self._pubsub = pubsub

        async def subscribed() -> None:
            await pubsub.subscribe(self._channel)
            while True:  # read the confirmation: from here on, nothing published is missed
                message = await pubsub.get_message(timeout=self._store._timeout)
                if message is not None and message["type"] == "subscribe":
                    return

        await self._store._bounded(subscribed)
        self._last_seen = self._last_ping = time.monotonic()

    async def _drop(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._store._timeout):
                    await pubsub.aclose()

    async def __anext__(self) -> str:
        while not self._closed:
            if self._pubsub is None:
                if self._backoff:
                    await asyncio.sleep(self._backoff)
                try:
                    await self._connect()
                except StateUnavailable:
                    await self._drop()
                    self._backoff = min(MAX_BACKOFF_SECONDS, max(0.05, self._backoff * 2))
                    continue
                self._backoff = 0.0
                return ""
            try:
                message = await self._pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=1.0
                )
            except (RedisError, OSError, RuntimeError) as exc:
                if not self._closed:
                    self._store._unavailable(f"subscription to {self._channel!r}: {exc}")
                    self._backoff = 0.05
                await self._drop()
                continue
            now = time.monotonic()
            if message is not None:
                self._last_seen = now
                if message["type"] == "message":
                    return str(message["data"])
                continue
            if now - self._last_seen > SILENT_SECONDS:
                self._store._unavailable(f"subscription to {self._channel!r} went silent")
                self._backoff = 0.05
                await self._drop()
            elif now - self._last_ping > PING_SECONDS:
                self._last_ping = now
                with contextlib.suppress(StateUnavailable):
                    await self._store._bounded(self._pubsub.ping)
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._closed = True
        self._store._subscriptions.discard(self)
        await self._drop()
