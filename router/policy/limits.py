"""Rate limits and budgets: the keys, windows and amounts of a request, against the state store.

Rate limits (GCRA, in ``router.state``) count requests when policy runs, and tokens (the
prompt plus ``max_tokens``) right before the backend is called; budgets (tokens and cost per
UTC day or month) are reserved at that same moment at the chosen backend's prices, settled with
the actual usage when the answer ends, and released when no backend answered. Everything a
request takes from the store is one operation (one Redis round trip) per step, and every
limit that applies is taken together, all or nothing.

Who a limit counts is ``per``: the tenant, the API key's name, the app, or the user (the
request metadata field ``policy.user_field``; requests without it share one anonymous user, so
leaving it out is no way around a limit). A refusal is RESOURCE_EXHAUSTED with the wait in the
``retry-after`` trailing metadata. When the store cannot answer, the tenant's
``on_state_error`` decides: ``fail_open`` admits (with a ``state_unavailable`` finding and a
warning), ``fail_closed`` refuses with UNAVAILABLE.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from router.config import BackendConfig, BudgetConfig, RateConfig, TenantConfig
from router.errors import PlexusError
from router.pipeline import Finding, RequestState
from router.state.types import BudgetCharge, Limit, StateStore, StateUnavailable

log = logging.getLogger("plexus.policy")

MICROS = 1_000_000  # cost is counted in integer micro-units of the prices' currency
WINDOW_SLACK_SECONDS = 2 * 86400  # a window's counters outlive it this long, for reading
RESERVATION_TTL_SECONDS = 600.0  # an unsettled reservation (a crashed replica) expires after
ANONYMOUS = "-"
MAX_SCOPE_CHARS = 128


class ResourceExhausted(PlexusError):
    """Over a rate limit or a budget; ``retry_after`` seconds until it would admit (None: not
    within the window, e.g. a spent daily budget)."""

    status = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class StoreUnavailable(PlexusError):
    """The limits' store could not answer and the tenant fails closed."""

    status = "UNAVAILABLE"


@dataclass(frozen=True)
class Held:
    """What a request holds in the budgets: its reservation, its prompt's tokens, and the budget
    keys it charged with their unit (``tokens`` or ``cost``)."""

    reservation_id: str
    prompt_tokens: int
    keys: dict[str, str]


@dataclass(frozen=True)
class _Rate:
    name: str
    per: str
    apps: frozenset[str] | None
    rate: RateConfig


def _window(period: str, now: float) -> tuple[str, float]:
    """The UTC window's name (``2026-12-02`` or ``2026-12``) and its end (unix time)."""
    day = dt.datetime.fromtimestamp(now, dt.UTC).date()
    if period == "day":
        end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)
        return day.isoformat(), end.timestamp()
    first = day.replace(day=1)
    following = (first + dt.timedelta(days=32)).replace(day=1)
    end = dt.datetime.combine(following, dt.time(), dt.UTC)
    return first.strftime("%Y-%m"), end.timestamp()


def scope_value(per: str, state: RequestState, user_field: str) -> str:
    """Who a limit or budget counts: ``per=VALUE``."""
    if per == "tenant":
        return "all"
    if per == "key":
        return state.caller.key_name
    if per == "app":
        return state.query.app
    user = state.metadata.get(user_field) or ANONYMOUS
    if len(user) > MAX_SCOPE_CHARS:  # a caller's id never makes a key unbounded
        return "sha256-" + hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()
    return user


def budget_keys(tenant: str, budget: BudgetConfig, scope: str, now: float) -> dict[str, str]:
    """The store keys of ``budget``'s current window, by unit (``tokens``, ``cost``)."""
    window, _ = _window(budget.period, now)
    base = f"budget:{tenant}:{budget.name}:{budget.per}={scope}"
    units = [u for u in ("tokens", "cost") if getattr(budget, u) is not None]
    return {unit: f"{base}:{unit}:{budget.period}:{window}" for unit in units}


class TenantLimits:
    """One tenant's rate limits and budgets, compiled from its policy configuration."""

    def __init__(self, tenant: str, config: TenantConfig):
        policy = config.policy
        self.tenant = tenant
        self.user_field = policy.user_field
        self.fail_open = policy.on_state_error == "fail_open"
        self.requests = [
            _Rate(r.name, r.per, frozenset(r.apps) or None, r.requests)
            for r in policy.rate_limits
            if r.requests is not None
        ]
        self.tokens = [
            _Rate(r.name, r.per, frozenset(r.apps) or None, r.tokens)
            for r in policy.rate_limits
            if r.tokens is not None
        ]
        self.budgets = list(policy.budgets)
        self.apps = sorted(config.apps)
        self.backends: Mapping[str, BackendConfig] = config.backends

    def __bool__(self) -> bool:
        return bool(self.requests or self.tokens or self.budgets)

    def _limits(self, rates: Sequence[_Rate], unit: str, state: RequestState) -> list[Limit]:
        app = state.query.app
        return [
            Limit(
                f"rl:{self.tenant}:{r.name}:{r.per}={scope_value(r.per, state, self.user_field)}"
                f":{unit}",
                r.rate.rate,
                r.rate.per_seconds,
                r.rate.burst_units,
            )
            for r in rates
            if r.apps is None or app in r.apps
        ]

    def request_limits(self, state: RequestState) -> list[Limit]:
        return self._limits(self.requests, "requests", state)

    def token_limits(self, state: RequestState) -> list[Limit]:
        return self._limits(self.tokens, "tokens", state)

    def charges(
        self, state: RequestState, tokens: int, cost_micros: int, now: float
    ) -> list[BudgetCharge]:
        app = state.query.app
        charges = []
        for budget in self.budgets:
            if budget.apps and app not in budget.apps:
                continue
            scope = scope_value(budget.per, state, self.user_field)
            _, end = _window(budget.period, now)
            for unit, key in budget_keys(self.tenant, budget, scope, now).items():
                if unit == "tokens":
                    limit, amount = int(budget.tokens or 0), tokens
                else:
                    limit, amount = int(round((budget.cost or 0.0) * MICROS)), cost_micros
                charges.append(BudgetCharge(key, limit, amount, end + WINDOW_SLACK_SECONDS))
        return charges

    def price_micros(self, backend: str, prompt_tokens: int, completion_tokens: int) -> int:
        price = self.backends[backend].price
        cost = prompt_tokens * price.input_per_1k + completion_tokens * price.output_per_1k
        return math.ceil(cost * MICROS / 1000.0)


class Limits:
    """Every tenant's limits over one state store: ``admit`` (requests, at policy time),
    ``reserve`` (tokens and budgets, before the backend), ``settle`` (when the answer ends)."""

    def __init__(self, tenants: Mapping[str, TenantConfig], store: StateStore):
        self.store = store
        self.tenants = {name: TenantLimits(name, config) for name, config in tenants.items()}

    def swap(self, tenant: str, config: TenantConfig) -> None:
        self.tenants[tenant] = TenantLimits(tenant, config)

    def _unavailable(self, limits: TenantLimits, state: RequestState, exc: Exception) -> None:
        if not limits.fail_open:
            raise StoreUnavailable(
                f"rate limits and budgets cannot be checked now ({exc}); try again shortly"
            ) from None
        log.warning("tenant %s: limits not checked, admitted (fail_open): %s", limits.tenant, exc)
        state.findings.append(Finding("policy", "state_unavailable", str(exc), action="allow"))

    async def admit(self, state: RequestState) -> None:
        limits = self.tenants[state.caller.tenant]
        wanted = limits.request_limits(state) if limits.requests else []
        if not wanted:
            return
        try:
            verdict = await self.store.take(wanted, [1] * len(wanted))
        except StateUnavailable as exc:
            self._unavailable(limits, state, exc)
            return
        if not verdict.allowed:
            raise ResourceExhausted(
                f"rate limit {_limit_name(verdict.limit_key)} reached; retry in "
                f"{verdict.retry_after_seconds:.2f}s",
                verdict.retry_after_seconds,
            )

    async def reserve(self, state: RequestState, prompt_tokens: int) -> None:
        """Take the tokens from the token limits and reserve the budgets: the prompt plus the
        allowed output tokens, at the prices of the chain's dearest backend (whichever of them
        answers, the reservation covers it)."""
        limits = self.tenants[state.caller.tenant]
        if not (limits.tokens or limits.budgets):
            return
        assert state.limits is not None and state.chain
        tokens = prompt_tokens + state.limits.max_tokens
        try:
            wanted = limits.token_limits(state)
            if wanted:
                verdict = await self.store.take(wanted, [tokens] * len(wanted))
                if not verdict.allowed:
                    wait = verdict.retry_after_seconds
                    raise ResourceExhausted(
                        f"token rate limit {_limit_name(verdict.limit_key)} reached; "
                        + (
                            f"retry in {wait:.2f}s"
                            if math.isfinite(wait)
                            else f"{tokens} tokens is more than it ever admits at once"
                        ),
                        wait if math.isfinite(wait) else None,
                    )
            if limits.budgets:
                cost = max(
                    limits.price_micros(b, prompt_tokens, state.limits.max_tokens)
                    for b in state.chain
                )
                charges = limits.charges(state, tokens, cost, time.time())
                if charges:
                    reservation_id = f"{state.caller.tenant}:{uuid.uuid4().hex}"
                    answer = await self.store.reserve(
                        reservation_id, charges, RESERVATION_TTL_SECONDS
                    )
                    if not answer.ok:
                        left = answer.remaining.get(answer.refused_key or "", 0)
                        raise ResourceExhausted(
                            f"budget {_budget_name(answer.refused_key)} cannot cover this "
                            f"request ({left} left of it)"
                        )
                    keys = {c.key: c.key.rsplit(":", 3)[1] for c in charges}
                    state.held = Held(reservation_id, prompt_tokens, keys)
        except StateUnavailable as exc:
            self._unavailable(limits, state, exc)

    async def settle(self, state: RequestState) -> None:
        """Count what the answer used (its final usage; for a cut-off answer, the prompt and
        the tokens sent so far) or give the reservation back when nothing was generated."""
        held = state.held
        if not isinstance(held, Held):
            return
        state.held = None
        try:
            final = state.final
            if final is not None:
                prompt, completion = final.usage.prompt_tokens, final.usage.completion_tokens
                backend = final.backend
            elif state.output:
                prompt = held.prompt_tokens
                completion = sum(len(piece.split()) for piece in state.output)
                backend = state.chain[0]
            else:
                await self.store.release(held.reservation_id)
                return
            tenant = self.tenants[state.caller.tenant]
            cost = tenant.price_micros(backend, prompt, completion)
            used = {"tokens": prompt + completion, "cost": cost}
            await self.store.settle(
                held.reservation_id, {key: used[unit] for key, unit in held.keys.items()}
            )
            state.settled = used
        except StateUnavailable as exc:  # the reservation expires by itself
            log.warning("tenant %s: usage not settled (%s)", state.caller.tenant, exc)


@dataclass(frozen=True)
class BudgetUse:
    """One budget window's use: ``used`` and ``reserved`` in its unit (tokens, or currency)."""

    budget: str
    per: str
    scope: str
    unit: str
    period: str
    window: str
    used: float
    reserved: float
    limit: float

    @property
    def remaining(self) -> float:
        return max(self.limit - self.used - self.reserved, 0.0)


async def read_usage(
    limits: Limits, tenant: str, user: str | None = None, now: float | None = None
) -> list[BudgetUse]:
    """The current windows of ``tenant``'s budgets: per tenant, per app (every app of the
    tenant) and, for ``user``, that user's."""
    config = limits.tenants[tenant]
    now = time.time() if now is None else now
    wanted: list[tuple[BudgetConfig, str, str, str]] = []
    for budget in config.budgets:
        if budget.per == "tenant":
            scopes = ["all"]
        elif budget.per == "app":
            scopes = sorted(budget.apps or config.apps)
        else:
            scopes = [user] if user else []
        for scope in scopes:
            for unit, key in budget_keys(tenant, budget, scope, now).items():
                wanted.append((budget, scope, unit, key))
    counters = await limits.store.usage([key for *_, key in wanted]) if wanted else {}
    rows = []
    for budget, scope, unit, key in wanted:
        counter = counters[key]
        scale = 1.0 if unit == "tokens" else 1.0 / MICROS
        limit = float(budget.tokens or 0) if unit == "tokens" else float(budget.cost or 0.0)
        rows.append(
            BudgetUse(
                budget.name,
                budget.per,
                scope,
                unit,
                budget.period,
                key.rsplit(":", 1)[1],
                counter.used * scale,
                counter.reserved * scale,
                limit,
            )
        )
    return rows


def _limit_name(key: str | None) -> str:
    """``rl:TENANT:NAME:PER=VALUE:UNIT`` -> ``NAME (PER=VALUE)``."""
    parts = (key or "").split(":")
    return f"{parts[2]!r} ({parts[3]})" if len(parts) >= 5 else repr(key)


def _budget_name(key: str | None) -> str:
    parts = (key or "").split(":")
    if len(parts) >= 7:
        return f"{parts[2]!r} ({parts[3]}, {parts[4]} per {parts[5]} {parts[6]})"
    return repr(key)
