"""Resilience around backends: circuit breakers, retries with backoff, fallback chains.

- :class:`CircuitBreaker` stops calling a backend that keeps failing, then probes it.
- :class:`ResilientBackend` wraps one backend with its breaker, retries and output bounds; it
  retries only retryable errors and only while nothing has reached the caller.
- :class:`FallbackChain` tries backends in order; it moves on only before the first token and
  announces which backend served the call with a :class:`Served` event.
- :class:`BackendPool` owns one resilient backend per configured backend of a tenant.

Under a deadline, the time to a first token is shared out so that every backend of a chain gets
its turn: each backend may take an equal share of what is left (counting those after it whose
breaker is not open), and each of its tries an equal share of what is left of the backend's;
no share is shorter than ``MIN_SHARE_SECONDS`` unless less than that is left. A try with no
first event (token or Finished) within its share fails with a retryable timeout. Once an answer
has started, it may run until the request's deadline.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from router.backends._aio import closing
from router.backends.common import backend_error, bound_output, output_limit, timed_out
from router.backends.grpc_backend import GrpcBackend
from router.backends.local import LocalBackend
from router.backends.openai import OpenAIBackend
from router.backends.types import (
    Backend,
    BackendError,
    Finished,
    GenerationEvent,
    GenerationRequest,
    TokenDelta,
)
from router.config import BackendConfig, BreakerConfig

log = logging.getLogger("plexus.backends")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
MIN_SHARE_SECONDS = 1.0  # a model seldom gives its first token much sooner under load


def share_end(now: float, end: float, parts: int) -> float:
    """The end of the first of ``parts`` equal shares of the time from ``now`` to ``end``: never
    shorter than ``MIN_SHARE_SECONDS`` unless less than that is left."""
    left = end - now
    return now + min(max(left / parts, MIN_SHARE_SECONDS), left)


class StreamInterrupted(BackendError):
    """A backend failed after tokens reached the caller: the answer is cut off, and no retry
    or fallback can mend it. The caller should end its stream with a clear error."""


@dataclass(frozen=True)
class Served:
    """Which backend is answering: yielded once, right before the first token (or Finished).

    ``attempts`` counts the tries on this backend, the answering one included."""

    backend: str
    attempts: int  # tries on this backend, the successful one included
    fallbacks_tried: list[str] = field(default_factory=list)  # backends that failed first


class CircuitBreaker:
    """closed -> open after ``failures`` consecutive failures; open rejects every call until
    ``reset_seconds`` have passed; then half-open lets one probe through: its success closes
    the breaker, its failure opens it again."""

    def __init__(
        self, name: str, config: BreakerConfig, clock: Callable[[], float] = time.monotonic
    ):
        self.name = name
        self.config = config
        self._clock = clock
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open`` (an open breaker whose reset time has come)."""
        if self._state == OPEN and self._clock() - self._opened_at >= self.config.reset_seconds:
            self._move(HALF_OPEN, "reset time passed, the next call probes")
        return self._state

    def before_call(self) -> None:
        """Admit a call or raise a non-retryable BackendError ``circuit open``."""
        state = self.state
        if state == CLOSED:
            return
        if state == HALF_OPEN and not self._probing:
            self._probing = True
            return
        wait = max(self.config.reset_seconds - (self._clock() - self._opened_at), 0.0)
        detail = "a half-open probe is in flight" if state == HALF_OPEN else f"{wait:.1f}s to probe"
        raise BackendError(
            f"{self.name}: circuit open ({detail})", backend=self.name, retryable=False
        )

    def record_success(self) -> None:
        self._failures = 0
        self._probing = False
        if self._state != CLOSED:
            self._move(CLOSED, "a call succeeded")

    def record_failure(self) -> None:
        self._failures += 1
        if self._state == HALF_OPEN:
            self._probing = False
            self._open("the half-open probe failed")
        elif self._state == CLOSED and self._failures >= self.config.failures:
            self._open(f"{self._failures} consecutive failures")

    def release(self) -> None:
        """A call ended without an outcome (cancelled, abandoned): free the probe slot."""
        self._probing = False

    def _open(self, why: str) -> None:
        self._opened_at = self._clock()
        self._move(OPEN, why)

    def _move(self, state: str, why: str) -> None:
        previous, self._state = self._state, state
        level = logging.WARNING if state == OPEN else logging.INFO
        log.log(level, "circuit %s: %s -> %s (%s)", self.name, previous, state, why)


class ResilientBackend:
    """One backend behind its circuit breaker, with retries and output bounds.

    A retryable error before the first token is retried after an exponential backoff with full
    jitter (``min(max_backoff, backoff * 2**attempt) * U[0, 1)``), or after the backend's
    Retry-After when that is longer. A retry that could not start within the time the backend
    has (its share of a chain's deadline, the request deadline, or with neither, that would
    wait longer than ``timeout_seconds``) is not made: the last error is raised instead. Every
    failed try counts against the breaker. Every try's stream is bounded by
    :func:`router.backends.common.bound_output` (``max_tokens``, delta size).
    """

    def __init__(
        self,
        backend: Backend,
        config: BackendConfig,
        rng: random.Random | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.name = backend.name
        self.backend = backend
        self.config = config
        self.breaker = CircuitBreaker(backend.name, config.breaker, clock)
        self._rng = rng or random.Random()
        self._sleep = sleep

    async def aclose(self) -> None:
        await self.backend.aclose()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """The answer's events, as a :class:`Backend` yields them (see :meth:`serve`)."""
        async with closing(self.serve(request)) as events:
            async for event in events:
                if not isinstance(event, Served):
                    yield event

    async def serve(
        self,
        request: GenerationRequest,
        *,
        until: float | None = None,
        fallbacks_tried: Sequence[str] = (),
    ) -> AsyncIterator[GenerationEvent | Served]:
        """Try the backend until it answers; yield one :class:`Served` (this backend, the tries
        it took, ``fallbacks_tried``) right before the answer's first event, then its events.

        ``until`` (``time.monotonic``) is when the backend must have started answering, e.g.
        its share of a chain's deadline; by default the request's deadline. Its tries share the
        time up to it (see the module's docstring).
        """
        if request.deadline is not None:
            until = request.deadline if until is None else min(until, request.deadline)
        tries = self.config.retry.attempts
        max_tokens = output_limit(request.max_tokens, self.config.max_output_tokens)
        last: BackendError | None = None
        for attempt in range(tries):
            now = time.monotonic()
            if request.deadline is not None and now >= request.deadline:
                raise last or backend_error(self.name, "the request deadline has already passed")
            if last is not None and until is not None and now >= until:
                raise last  # its time is spent: what is left belongs to the next backend
            try:
                self.breaker.before_call()
            except BackendError:
                if last is not None:  # our own failures opened it: report what failed
                    raise last from None
                raise
            first_by = None if until is None else share_end(now, until, tries - attempt)
            streamed = False
            settled = False
            delay = 0.0
            try:
                answer = bound_output(self.backend.generate(request), request, max_tokens)
                async with closing(answer) as events:
                    event = await self._first(events, request, first_by)
                    if event is not None:
                        yield Served(self.name, attempt + 1, list(fallbacks_tried))
                    while event is not None:
                        if isinstance(event, TokenDelta):
                            streamed = True
                        elif isinstance(event, Finished):
                            settled = True
                            self.breaker.record_success()
                        yield event
                        if settled:  # the answer is whole: what the backend does next is moot
                            break
                        event = await anext(events, None)
                if not settled:
                    raise backend_error(self.name, "the backend ended without a Finished event")
                return
            except BackendError as exc:
                settled = True
                last = exc
                self.breaker.record_failure()
                if streamed or not exc.retryable or attempt + 1 >= tries:
                    raise
                delay = self.backoff(attempt, exc.retry_after)
                if not self._can_wait(until, delay):
                    log.info(
                        "%s: no retry, waiting %.2fs would pass the time it has", self.name, delay
                    )
                    raise
                log.info(
                    "%s: try %d/%d failed (%s); retrying in %.3fs",
                    self.name,
                    attempt + 1,
                    tries,
                    exc,
                    delay,
                )
            except Exception as exc:  # a bug in a backend: fail this backend, not the process
                settled = True
                self.breaker.record_failure()
                log.exception("%s: unexpected error from the backend", self.name)
                raise backend_error(self.name, f"unexpected error: {exc!r}") from exc
            finally:
                if not settled:  # cancelled or closed by the caller mid-call
                    self.breaker.release()
            await self._sleep(delay)

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before try ``attempt + 1`` (``attempt`` counts from 0)."""
        retry = self.config.retry
        ceiling = min(retry.max_backoff_ms, retry.backoff_ms * 2.0**attempt) / 1000.0
        delay = ceiling * self._rng.random()
        if retry_after is not None and retry_after > delay:
            delay = retry_after
        return delay

    async def _first(
        self, events: AsyncIterator[GenerationEvent], request: GenerationRequest, by: float | None
    ) -> GenerationEvent | None:
        """The try's first event (None if it ended without one), due by ``by``."""
        if by is None:
            return await anext(events, None)
        seconds = by - time.monotonic()
        timeout = asyncio.timeout_at(asyncio.get_running_loop().time() + seconds)
        try:
            async with timeout:
                return await anext(events, None)
        except TimeoutError:
            if not timeout.expired():
                raise
        if request.deadline is not None and time.monotonic() >= request.deadline:
            raise timed_out(self.name, request, self.config.timeout_seconds)
        raise backend_error(
            self.name,
            f"timed out (no first token within {seconds:.2f}s, its share of the deadline)",
            retryable=True,
        )

    def _can_wait(self, until: float | None, delay: float) -> bool:
        if until is None:
            return delay <= self.config.timeout_seconds
        return time.monotonic() + delay < until


class FallbackChain:
    """Backends tried in order. A failure before the first token moves to the next backend; a
    failure after it raises :class:`StreamInterrupted`. Yields one :class:`Served` right before
    the first TokenDelta (or before Finished when there are none)."""

    def __init__(self, backends: Sequence[ResilientBackend]):
        if not backends:
            raise ValueError("a fallback chain needs at least one backend")
        self.backends = list(backends)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent | Served]:
        tried: list[str] = []
        errors: list[BackendError] = []
        for i, backend in enumerate(self.backends):
            now = time.monotonic()
            if errors and request.deadline is not None and now >= request.deadline:
                break
            until = None
            if request.deadline is not None:  # its share; open breakers after it need none
                waiting = sum(1 for b in self.backends[i + 1 :] if b.breaker.state != OPEN)
                until = share_end(now, request.deadline, 1 + waiting)
            served = False
            try:
                answer = backend.serve(request, until=until, fallbacks_tried=tried)
                async with closing(answer) as events:
                    async for event in events:
                        if isinstance(event, Served):
                            served = True
                        yield event
                return
            except BackendError as exc:
                if served:
                    raise StreamInterrupted(
                        f"{backend.name} failed mid-answer: {exc}",
                        backend=backend.name,
                        retryable=False,
                        status=exc.status,
                    ) from exc
                tried.append(backend.name)
                errors.append(exc)
                if backend is not self.backends[-1]:
                    log.warning("%s failed before answering (%s); falling back", backend.name, exc)
        last = errors[-1]
        if len(errors) == 1 and len(self.backends) == 1:
            raise last
        raise BackendError(
            "all backends failed: " + "; ".join(str(e) for e in errors),
            backend=last.backend,
            retryable=last.retryable,
            status=last.status,
            retry_after=last.retry_after,
        ) from last


def build_backend(name: str, config: BackendConfig) -> Backend:
    """The backend for a configuration, by its kind."""
    if config.kind == "openai":
        return OpenAIBackend(name, config)
    if config.kind == "grpc":
        return GrpcBackend(name, config)
    if config.kind == "local":
        return LocalBackend(name, config)
    raise ValueError(f"backend {name!r}: unknown kind {config.kind!r}")


class BackendPool:
    """One :class:`ResilientBackend` per backend a tenant declares, shared by all its calls."""

    def __init__(
        self,
        tenant_backends: Mapping[str, BackendConfig],
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        rng = rng or random.Random()
        self.backends = {
            name: ResilientBackend(build_backend(name, config), config, rng, clock=clock)
            for name, config in tenant_backends.items()
        }

    def chain(self, target: str, fallbacks: Sequence[str] = ()) -> FallbackChain:
        """The chain ``target, *fallbacks`` (a repeated name is tried once)."""
        names = list(dict.fromkeys([target, *fallbacks]))
        unknown = [n for n in names if n not in self.backends]
        if unknown:
            raise KeyError(f"unknown backends {unknown}; have {sorted(self.backends)}")
        return FallbackChain([self.backends[n] for n in names])

    def breaker_state(self, name: str) -> str:
        """``closed``, ``open`` or ``half_open``: the breaker of backend ``name``."""
        return self.backends[name].breaker.state

    def breaker_states(self, names: Iterable[str] | None = None) -> dict[str, str]:
        """The breaker state of each of ``names`` (by default, every backend), by name."""
        if names is None:
            names = self.backends
        return {name: self.backends[name].breaker.state for name in names}

    async def aclose(self) -> None:
        for name, backend in self.backends.items():
            try:
                await backend.aclose()
            except Exception:
                log.exception("closing backend %s failed", name)
