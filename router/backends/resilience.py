"""Resilience around backends: circuit breakers, retries with backoff, fallback chains.

- :class:`CircuitBreaker` stops calling a backend that keeps failing, then probes it.
- :class:`ResilientBackend` wraps one backend with its breaker and retries; it retries only
  retryable errors and only while nothing has reached the caller.
- :class:`FallbackChain` tries backends in order; it moves on only before the first token and
  announces which backend served the call with a :class:`Served` event.
- :class:`BackendPool` owns one resilient backend per configured backend of a tenant.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from router.backends._aio import closing
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


class StreamInterrupted(BackendError):
    """A backend failed after tokens reached the caller: the answer is cut off, and no retry
    or fallback can mend it. The caller should end its stream with a clear error."""


@dataclass(frozen=True)
class Served:
    """Which backend is answering: yielded once, right before the first token (or Finished)."""

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


class _Attempts:
    """How many tries a call took, for the Served event."""

    def __init__(self) -> None:
        self.count = 0


class ResilientBackend:
    """One backend behind its circuit breaker, with retries.

    A retryable error before the first token is retried after an exponential backoff with full
    jitter (``min(max_backoff, backoff * 2**attempt) * U[0, 1)``), or after the backend's
    Retry-After when that is longer. A retry that could not start before the request deadline
    (or, with no deadline, that would wait longer than ``timeout_seconds``) is not made: the
    last error is raised instead. Every failed try counts against the breaker.
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
        async with closing(self._run(request, _Attempts())) as events:
            async for event in events:
                yield event

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before try ``attempt + 1`` (``attempt`` counts from 0)."""
        retry = self.config.retry
        ceiling = min(retry.max_backoff_ms, retry.backoff_ms * 2.0**attempt) / 1000.0
        delay = ceiling * self._rng.random()
        if retry_after is not None and retry_after > delay:
            delay = retry_after
        return delay

    async def _run(
        self, request: GenerationRequest, attempts: _Attempts
    ) -> AsyncIterator[GenerationEvent]:
        tries = self.config.retry.attempts
        last: BackendError | None = None
        for attempt in range(tries):
            if request.deadline is not None and time.monotonic() >= request.deadline:
                raise last or BackendError(
                    f"{self.name}: the request deadline has already passed",
                    backend=self.name,
                    retryable=False,
                )
            try:
                self.breaker.before_call()
            except BackendError:
                if last is not None:  # our own failures opened it: report what failed
                    raise last from None
                raise
            attempts.count = attempt + 1
            streamed = False
            settled = False
            delay = 0.0
            try:
                async with closing(self.backend.generate(request)) as events:
                    async for event in events:
                        if isinstance(event, TokenDelta):
                            streamed = True
                        elif isinstance(event, Finished):
                            settled = True
                            self.breaker.record_success()
                        yield event
                if not settled:
                    raise BackendError(
                        f"{self.name}: the backend ended without a Finished event",
                        backend=self.name,
                        retryable=False,
                    )
                return
            except BackendError as exc:
                settled = True
                last = exc
                self.breaker.record_failure()
                if streamed or not exc.retryable or attempt + 1 >= tries:
                    raise
                delay = self.backoff(attempt, exc.retry_after)
                if not self._can_wait(request, delay):
                    log.info(
                        "%s: no retry, waiting %.2fs would pass the deadline", self.name, delay
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
                raise BackendError(
                    f"{self.name}: unexpected error: {exc!r}", backend=self.name, retryable=False
                ) from exc
            finally:
                if not settled:  # cancelled or closed by the caller mid-call
                    self.breaker.release()
            await self._sleep(delay)

    def _can_wait(self, request: GenerationRequest, delay: float) -> bool:
        if request.deadline is None:
            return delay <= self.config.timeout_seconds
        return time.monotonic() + delay < request.deadline


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
        for backend in self.backends:
            if errors and request.deadline is not None and time.monotonic() >= request.deadline:
                break
            attempts = _Attempts()
            served = False
            try:
                async with closing(backend._run(request, attempts)) as events:
                    async for event in events:
                        if not served:
                            served = True
                            yield Served(backend.name, attempts.count, list(tried))
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

    def breaker_states(self) -> dict[str, str]:
        return {name: backend.breaker.state for name, backend in self.backends.items()}

    async def aclose(self) -> None:
        for name, backend in self.backends.items():
            try:
                await backend.aclose()
            except Exception:
                log.exception("closing backend %s failed", name)
