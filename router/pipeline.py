"""The request lifecycle: prep -> route -> stitch -> generate, streamed as events.

Governance, policy and audit come next in the lifecycle (see the design notes); their places
are the stage hooks below (``InputGuard``, ``Policy``, ``OutputGuard``, ``Recorder``), which
pass everything through until those stages are built. Each stage is injected, not imported.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from router.backends.resilience import BackendPool, Served, StreamInterrupted
from router.backends.types import (
    BackendError,
    Finished,
    GenerationRequest,
    Message,
    TokenDelta,
    Usage,
)
from router.config import BackendConfig
from router.context.packets import ContextPacket
from router.context.stitch import Stitcher, StitchResult
from router.errors import FailedPrecondition, InvalidArgument
from router.routing.service import Caller, RouteDecision, RouteQuery


@dataclass(frozen=True)
class DecisionEvent:
    decision: RouteDecision


@dataclass(frozen=True)
class ContextEvent:
    result: StitchResult


@dataclass(frozen=True)
class DeltaEvent:
    text: str


@dataclass(frozen=True)
class FinalEvent:
    usage: Usage
    cost: float
    backend: str
    fallbacks_tried: list[str]
    attempts: int
    finish_reason: str
    timings_us: dict[str, int]
    breakers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorEvent:
    code: str  # UNAVAILABLE | INTERRUPTED | DEADLINE_EXCEEDED
    message: str
    backend: str = ""


OrchestrateEvent = DecisionEvent | ContextEvent | DeltaEvent | FinalEvent | ErrorEvent


class InputGuard(Protocol):
    def check(self, caller: Caller, query: RouteQuery) -> None: ...


class Policy(Protocol):
    def choose(
        self, caller: Caller, query: RouteQuery, decision: RouteDecision, chain: Sequence[str]
    ) -> Sequence[str]: ...


class OutputGuard(Protocol):
    def check(self, caller: Caller, text: str) -> None: ...


class Recorder(Protocol):
    def record(
        self, caller: Caller, query: RouteQuery, events: Sequence[OrchestrateEvent]
    ) -> None: ...


class PassThrough:
    """The default for every stage not built yet: accepts everything, changes nothing."""

    def check(self, *_args: object) -> None:
        return None

    def choose(
        self, _caller: Caller, _query: RouteQuery, _decision: RouteDecision, chain: Sequence[str]
    ) -> Sequence[str]:
        return chain

    def record(self, *_args: object) -> None:
        return None


def cost_of(usage: Usage, backend: BackendConfig) -> float:
    price = backend.price
    return (
        usage.prompt_tokens * price.input_per_1k + usage.completion_tokens * price.output_per_1k
    ) / 1000.0


class Orchestrator:
    """``orchestrate(caller, query) -> async iterator of events``, in process or behind gRPC."""

    def __init__(
        self,
        stitcher: Stitcher,
        pools: Mapping[str, BackendPool],
        backends: Mapping[str, Mapping[str, BackendConfig]],
        *,
        input_guard: InputGuard | None = None,
        policy: Policy | None = None,
        output_guard: OutputGuard | None = None,
        recorder: Recorder | None = None,
    ):
        self.stitcher = stitcher
        self.pools = pools
        self.backends = backends
        passthrough = PassThrough()
        self.input_guard = input_guard or passthrough
        self.policy = policy or passthrough
        self.output_guard = output_guard or passthrough
        self.recorder = recorder or passthrough

    async def orchestrate(
        self,
        caller: Caller,
        query: RouteQuery,
        packets: Sequence[ContextPacket] = (),
        max_tokens: int | None = None,
        deadline: float | None = None,
    ) -> AsyncIterator[OrchestrateEvent]:
        events: list[OrchestrateEvent] = []
        try:
            async for event in self._run(caller, query, packets, max_tokens, deadline):
                events.append(event)
                yield event
        finally:
            self.recorder.record(caller, query, events)

    async def _run(
        self,
        caller: Caller,
        query: RouteQuery,
        packets: Sequence[ContextPacket],
        max_tokens: int | None,
        deadline: float | None,
    ) -> AsyncIterator[OrchestrateEvent]:
        self.input_guard.check(caller, query)
        backends = self.backends.get(caller.tenant, {})
        if not backends:
            raise FailedPrecondition(f"tenant {caller.tenant!r} has no backends configured")
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        result = await self.stitcher.stitch(caller, query, packets, timeout=timeout)
        decision = result.decision
        yield DecisionEvent(decision)
        yield ContextEvent(result)
        route = self.stitcher.router.tenant(caller).config.route(decision.route)
        chain = list(self.policy.choose(caller, query, decision, [route.target, *route.fallbacks]))
        limit = backends[chain[0]].max_output_tokens
        if max_tokens is not None and max_tokens > limit:
            raise InvalidArgument(f"max_tokens {max_tokens} exceeds the backend's {limit}")
        request = GenerationRequest(
            messages=(Message("user", result.assembly.prompt),),
            max_tokens=max_tokens or limit,
            temperature=backends[chain[0]].temperature,
            deadline=deadline,
            request_id=query.request_id,
            metadata={"tenant": caller.tenant, "route": decision.route},
        )
        pool = self.pools[caller.tenant]
        timings = dict(decision.timings_us) | dict(result.timings_us)
        started = time.perf_counter_ns()
        served: Served | None = None
        text: list[str] = []
        try:
            async for event in pool.chain(chain[0], chain[1:]).generate(request):
                if isinstance(event, Served):
                    served = event
                elif isinstance(event, TokenDelta):
                    text.append(event.text)
                    yield DeltaEvent(event.text)
                elif isinstance(event, Finished):
                    timings["generate"] = (time.perf_counter_ns() - started) // 1000
                    self.output_guard.check(caller, "".join(text))
                    backend = served.backend if served else chain[0]
                    yield FinalEvent(
                        usage=event.usage,
                        cost=cost_of(event.usage, backends[backend]),
                        backend=backend,
                        fallbacks_tried=list(served.fallbacks_tried) if served else [],
                        attempts=served.attempts if served else 1,
                        finish_reason=event.reason,
                        timings_us=timings,
                        breakers={name: pool.breaker_states()[name] for name in chain},
                    )
        except StreamInterrupted as exc:
            yield ErrorEvent(
                "INTERRUPTED", f"the answer was cut off: {exc}", getattr(exc, "backend", "")
            )
        except BackendError as exc:
            code = (
                "DEADLINE_EXCEEDED"
                if deadline and time.monotonic() >= deadline
                else ("UNAVAILABLE")
            )
            yield ErrorEvent(code, f"no backend could answer: {exc}", exc.backend)
