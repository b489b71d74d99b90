"""The request lifecycle: one path for every RPC.

A ``RequestState`` flows forward through injected stage objects, in this order::

    prep -> guard-in -> route -> policy -> stitch -> generate -> guard-out -> record

``Route`` (and ``RouteBatch``, ``RouteStream``) stops after policy, ``Stitch`` after stitch, and
``Orchestrate`` runs to the end and streams events. Each stage is an object with a ``name`` and
one method; the pipeline times every stage itself, so every response reports where its time
went by construction. A stage may pass, rewrite the state (for example redact ``state.text``),
add ``findings``, or stop the request by raising a ``PlexusError``, whose status the caller
gets. Record runs exactly once per request, success or failure, with the final state.

Orchestrate's contract: everything that can fail is checked before the first event (bad input,
unknown app, a tenant without backends, ``max_tokens`` over the backend's limit), so such a
failure is a gRPC status and the stream never starts. After the first event the stream always
ends with either a ``FinalEvent`` or an ``ErrorEvent``: ``INTERRUPTED`` (the backend failed
after tokens were sent), ``UNAVAILABLE`` (every backend of the chain failed before its first
token), ``DEADLINE_EXCEEDED`` (which the gRPC front sends as the call's status, as the
caller's own deadline would), or ``BLOCKED`` (an output guard stopped the answer). Output
guards see every delta before the caller does and may hold back a window of text, so they can
block, redact or restore text in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from router.backends.resilience import Served, StreamInterrupted
from router.backends.types import BackendError, Finished, Message, TokenDelta, Usage
from router.calls import Caller, RouteDecision, RouteQuery
from router.errors import PlexusError
from router.observe.tracing import TraceContext, new_trace

if TYPE_CHECKING:
    import numpy as np

    from router.backends.types import GenerationEvent
    from router.context.packets import ContextPacket
    from router.context.stitch import StitchResult


# -- the state that flows through the stages ----------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """Something a stage noticed about the request or the answer (for example a PII span)."""

    stage: str
    kind: str
    detail: str = ""
    start: int = -1
    end: int = -1
    action: str = ""
    """What was done about it: redact, mask, allow, block, replace, flag (or empty)."""
    score: float = 1.0


@dataclass(frozen=True)
class GenerationLimits:
    """What policy allows the generation: output tokens and sampling temperature."""

    max_tokens: int
    temperature: float


@dataclass(eq=False)
class RequestState:
    """Everything known about one request; each stage reads what came before and adds its part.

    ``timings_us`` holds one entry per stage that ran (``prep``, ``route``, ...) and finer
    entries a stage records itself, named ``stage.detail`` (``stitch.assemble``).
    """

    caller: Caller
    query: RouteQuery
    rpc: str = "Route"
    packets: Sequence[ContextPacket] = ()
    budget_tokens: int | None = None
    max_tokens: int | None = None
    deadline: float | None = None
    """``time.monotonic()`` by which the call must end, from the caller's gRPC deadline."""
    generates: bool = False
    history: Sequence[Message] = ()
    """Earlier turns of a conversation (system and developer messages, previous user and
    assistant turns), sent before the stitched prompt; guard-in redacts them as it does
    ``text``."""
    text: str = ""
    """The prepared text later stages see; ``query.text`` keeps what the caller sent."""
    extracted: dict[str, str] = field(default_factory=dict)
    decision: RouteDecision | None = None
    embedding: np.ndarray | None = None
    """The text's sentence embedding ``[1, dim]``, once a stage has computed it."""
    findings: list[Finding] = field(default_factory=list)
    placeholders: dict[str, str] = field(default_factory=dict)
    """Redaction placeholders -> the caller's values; lives only in this request's memory (never
    logged or recorded) so that the answer can be restored."""
    raw_data: set[str] = field(default_factory=set)
    """Kinds of PII that reach the backends as the caller wrote them (allowed, not redacted)."""
    chain: tuple[str, ...] = ()
    """The backends to try, in order (policy's choice)."""
    rules_applied: list[str] = field(default_factory=list)
    """The names of the policy rules that applied, in order."""
    held: object | None = None
    """What the request holds in its budgets until the answer ends (``policy.limits.Held``)."""
    settled: dict[str, int] | None = None
    """What the answer was counted at in the budgets: ``tokens`` and ``cost`` (micro-units)."""
    limits: GenerationLimits | None = None
    context: StitchResult | None = None
    timings_us: dict[str, int] = field(default_factory=dict)
    output: list[str] = field(default_factory=list)
    """The answer's text as released to the caller, delta by delta."""
    final: FinalEvent | None = None
    outcome: str = "OK"
    """``OK``, the status of an error that stopped the request, or a streamed error's code."""
    error: BaseException | None = None
    recorded: bool = False
    admitted: bool = True
    """False for a call refused before it became a request: no stage ran."""
    started_ns: int = field(default_factory=time.time_ns)
    """Wall-clock nanoseconds (``time.time_ns()``) when the request began: its spans start here."""
    trace: TraceContext = field(default_factory=new_trace)
    """The request's W3C trace: the caller's ``traceparent`` continued, or a new trace."""
    first_token_ns: int = 0
    """``time.time_ns()`` when the backend's first token came (0: none yet, or not watched)."""
    served_by: str = ""
    """The backend that answered, once its first token came (when ``first_token_ns`` is)."""

    @property
    def trace_id(self) -> str:
        """The trace id, 32 hex digits (logs and the audit record carry it)."""
        return self.trace.trace_id

    @property
    def metadata(self) -> dict[str, str]:
        """Request metadata for the stages: extracted fields, overridden by the caller's own."""
        if not self.extracted:
            return self.query.metadata
        return self.extracted | self.query.metadata

    def remaining(self) -> float | None:
        """Seconds left before the deadline (never negative), or None without one."""
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)


# -- events streamed by Orchestrate --------------------------------------------------------------


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
    findings: list[Finding] = field(default_factory=list)
    rules_applied: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ErrorEvent:
    code: str  # UNAVAILABLE | INTERRUPTED | DEADLINE_EXCEEDED | BLOCKED
    message: str
    backend: str = ""


OrchestrateEvent = DecisionEvent | ContextEvent | DeltaEvent | FinalEvent | ErrorEvent


class OutputBlocked(PlexusError):
    """Raised by an output guard to stop the answer; the stream ends with a BLOCKED event."""

    status = "PERMISSION_DENIED"


# -- the stage interfaces ------------------------------------------------------------------------


class Stage(Protocol):
    """prep, guard-in, route, policy and stitch: ``run(state)`` reads and extends the state."""

    name: str

    async def run(self, state: RequestState) -> None: ...


class BatchStage(Stage, Protocol):
    """A stage that can do a whole ``RouteBatch`` in one call (route: one model call)."""

    async def run_many(self, states: Sequence[RequestState]) -> None: ...


class Generator(Protocol):
    """The generate stage: the backend chain's events for the state's prompt and limits."""

    name: str

    def stream(self, state: RequestState) -> AsyncGenerator[GenerationEvent | Served, None]: ...

    def cost(self, state: RequestState, backend: str, usage: Usage) -> float: ...

    def breakers(self, state: RequestState) -> dict[str, str]: ...


class OutputWatch(Protocol):
    """One request's view of an output guard: text in, text safe to release out."""

    def feed(self, text: str) -> str:
        """Take the next piece of the answer; return what may reach the caller now."""
        ...

    def flush(self) -> str:
        """The answer is complete: return everything still held back."""
        ...


class OutputGuard(Protocol):
    """guard-out: ``watch(state)`` starts watching one answer (raise OutputBlocked to stop)."""

    name: str

    def watch(self, state: RequestState) -> OutputWatch | None:
        """None when this guard has nothing to check in this answer."""
        ...


class Reserving(Protocol):
    """run: before the backend is called, after stitch (a refusal is a status: nothing has been
    streamed yet); settle: once when the answer ends, however it ends (before record)."""

    name: str

    async def run(self, state: RequestState) -> None: ...

    async def settle(self, state: RequestState) -> None: ...


class Recorder(Protocol):
    """record: awaited once per request with its final state, whatever the outcome, before the
    caller gets the response or the stream's last event (so a recorder that makes its record
    durable holds the answer back until it is). A recorder that raises fails the request."""

    async def record(self, state: RequestState) -> None: ...


# -- the pipeline ----------------------------------------------------------------------------------


UNKNOWN_CALLER = Caller(tenant="(unknown)", key_name="", admin=False, apps=frozenset())
"""The caller of a call whose API key was missing or unknown (no tenant can have that name)."""


def _elapsed_us(started_ns: int) -> int:
    return (time.perf_counter_ns() - started_ns) // 1000


class Pipeline:
    """``route``, ``route_many``, ``stitch`` and ``orchestrate``: the lifecycle, in process."""

    def __init__(
        self,
        *,
        prep: Stage,
        route: BatchStage,
        policy: Stage,
        stitch: Stage,
        generate: Generator,
        guards_in: Sequence[Stage] = (),
        route_guards: Sequence[Stage] = (),
        guards_out: Sequence[OutputGuard] = (),
        recorders: Sequence[Recorder] = (),
        budget: Reserving | None = None,
    ):
        """``guards_in`` run before route; ``route_guards`` right after it (rules that need the
        decision, such as refusing an abstained intent), before policy."""
        self.to_policy: tuple[Stage, ...] = (prep, *guards_in, route, *route_guards, policy)
        self.to_stitch: tuple[Stage, ...] = (*self.to_policy, stitch)
        self.to_generate: tuple[Stage, ...] = (*self.to_stitch, *([budget] if budget else []))
        self.budget = budget
        self.prep = prep
        self.guards_in = tuple(guards_in)
        self.route_stage = route
        self.policy = policy
        self.generate = generate
        self.guards_out = tuple(guards_out)
        self.recorders = tuple(recorders)

    async def _run(self, state: RequestState, stages: Sequence[Stage]) -> None:
        timings = state.timings_us
        clock = time.perf_counter_ns
        for stage in stages:
            started = clock()
            await stage.run(state)
            timings[stage.name] = (clock() - started) // 1000

    async def _record(self, *states: RequestState) -> None:
        pending = [state for state in states if not state.recorded]
        for state in pending:
            state.recorded = True
        if len(pending) == 1:
            for recorder in self.recorders:
                await recorder.record(pending[0])
            return
        for recorder in self.recorders:  # a batch's records go together (one group commit)
            await asyncio.gather(*(recorder.record(state) for state in pending))

    @asynccontextmanager
    async def _recorded(self, *states: RequestState) -> AsyncIterator[None]:
        """Record each state once when the block ends (unless it was already), with the error
        that ended it, if any."""
        try:
            yield
        except BaseException as exc:
            if isinstance(exc, PlexusError):
                outcome = exc.status
                exc.recorded = True
            elif isinstance(exc, asyncio.CancelledError | GeneratorExit):
                outcome = "CANCELLED"  # the caller went away
            else:
                outcome = "INTERNAL"
            for state in states:
                if not state.recorded:
                    state.error, state.outcome = exc, outcome
            raise
        finally:
            await self._record(*states)

    async def refused(
        self, caller: Caller | None, rpc: str, error: PlexusError, query: RouteQuery | None = None
    ) -> None:
        """Record a call refused before it became a request (an unknown key, a malformed
        message, a deadline already past): every recorder sees it as the end of a request that
        no stage ran for. ``caller`` is None when the key was not known (no tenant's audit
        trail then holds it; metrics and logs name the tenant ``(unknown)``)."""
        if error.recorded:
            return
        error.recorded = True
        state = RequestState(
            caller or UNKNOWN_CALLER, query or RouteQuery("", ""), rpc=rpc, admitted=False
        )
        state.error, state.outcome = error, error.status
        await self._record(state)

    def _decided(self, state: RequestState) -> RouteDecision:
        decision = state.decision
        assert decision is not None, "the route stage sets the decision"
        decision.timings_us = dict(state.timings_us)
        decision.findings = list(state.findings)
        return decision

    async def prepare(self, caller: Caller, query: RouteQuery) -> RequestState:
        """The state as policy would see it: every stage before policy, run and not recorded
        (for tools such as ``plexus policy explain``)."""
        state = RequestState(caller, query, rpc="Explain")
        await self._run(state, self.to_policy[:-1])
        return state

    async def route(self, caller: Caller, query: RouteQuery, rpc: str = "Route") -> RouteDecision:
        """The decision (prep, guard-in, route and policy)."""
        state = RequestState(caller, query, rpc=rpc)
        async with self._recorded(state):
            await self._run(state, self.to_policy)
            return self._decided(state)

    async def route_many(
        self, caller: Caller, queries: Sequence[RouteQuery], deadline: float | None = None
    ) -> list[RouteDecision]:
        """Decisions for a batch: the route stage makes one model call for all of them.

        Any request that fails a stage fails the whole batch with that request's status.
        """
        states = [RequestState(caller, q, rpc="RouteBatch", deadline=deadline) for q in queries]
        async with self._recorded(*states):
            for stage in self.to_policy:
                started = time.perf_counter_ns()
                if stage is self.route_stage:
                    await self.route_stage.run_many(states)
                else:
                    for state in states:
                        await stage.run(state)
                each = _elapsed_us(started) // max(len(states), 1)
                for state in states:
                    state.timings_us[stage.name] = each
            return [self._decided(state) for state in states]

    async def stitch(
        self,
        caller: Caller,
        query: RouteQuery,
        packets: Sequence[ContextPacket] = (),
        budget_tokens: int | None = None,
        deadline: float | None = None,
    ) -> StitchResult:
        """The decision and the stitched context (every stage up to and including stitch)."""
        state = RequestState(
            caller,
            query,
            rpc="Stitch",
            packets=packets,
            budget_tokens=budget_tokens,
            deadline=deadline,
        )
        async with self._recorded(state):
            await self._run(state, self.to_stitch)
            self._decided(state)
            assert state.context is not None, "the stitch stage sets the context"
            # The stages in order, each one's finer entries among them (the state has both).
            state.context.timings_us.clear()
            state.context.timings_us.update(state.timings_us)
            return state.context

    async def orchestrate(
        self,
        caller: Caller,
        query: RouteQuery,
        packets: Sequence[ContextPacket] = (),
        max_tokens: int | None = None,
        deadline: float | None = None,
        history: Sequence[Message] = (),
        rpc: str = "Orchestrate",
    ) -> AsyncIterator[OrchestrateEvent]:
        """Every stage; streams the decision, the context, the answer's deltas and a final event.

        A failure before the first event is raised (the caller gets its status); after it, the
        stream ends with an ``ErrorEvent`` instead (see the module docstring).
        """
        state = RequestState(
            caller,
            query,
            rpc=rpc,
            packets=packets,
            max_tokens=max_tokens,
            deadline=deadline,
            generates=True,
            history=tuple(history),
        )
        async with self._recorded(state):
            try:
                await self._run(state, self.to_generate)
                assert state.context is not None, "the stitch stage sets the context"
                yield DecisionEvent(self._decided(state))
                yield ContextEvent(state.context)
                async for event in self._answer(state):
                    if isinstance(event, FinalEvent | ErrorEvent):
                        await self._settle(state)
                        await self._record(state)  # recorded before the caller sees the end
                    yield event
            finally:
                await self._settle(state)  # failed or cancelled: before the record, too

    async def _settle(self, state: RequestState) -> None:
        if self.budget is not None and state.held is not None:
            await self.budget.settle(state)

    @staticmethod
    def _release(state: RequestState, watches: Sequence[tuple[str, OutputWatch]], text: str) -> str:
        """``text`` through every output guard in order (each one's release feeds the next)."""
        timings = state.timings_us
        for name, watch in watches:
            started = time.perf_counter_ns()
            text = watch.feed(text) if text else ""
            timings[name] += _elapsed_us(started)
        return text

    @staticmethod
    def _flush(state: RequestState, watches: Sequence[tuple[str, OutputWatch]]) -> str:
        timings = state.timings_us
        text = ""
        for name, watch in watches:
            started = time.perf_counter_ns()
            text = (watch.feed(text) if text else "") + watch.flush()
            timings[name] += _elapsed_us(started)
        return text

    async def _answer(self, state: RequestState) -> AsyncIterator[OrchestrateEvent]:
        """generate and guard-out: the backend's deltas, released through the output guards."""
        generator = self.generate
        watches = []
        for guard in self.guards_out:
            state.timings_us[guard.name] = 0
            watch = guard.watch(state)
            if watch is not None:  # nothing to watch in this answer: no cost per delta
                watches.append((guard.name, watch))
        started = time.perf_counter_ns()
        served: Served | None = None
        upstream = generator.stream(state)
        try:
            async for event in upstream:
                if isinstance(event, Served):
                    served = event
                elif isinstance(event, TokenDelta):
                    text = self._release(state, watches, event.text)
                    if text:
                        state.output.append(text)
                        yield DeltaEvent(text)
                elif isinstance(event, Finished):
                    text = self._flush(state, watches)
                    if text:
                        state.output.append(text)
                        yield DeltaEvent(text)
                    state.timings_us[generator.name] = _elapsed_us(started)
                    backend = served.backend if served else state.chain[0]
                    state.final = FinalEvent(
                        usage=event.usage,
                        cost=generator.cost(state, backend, event.usage),
                        backend=backend,
                        fallbacks_tried=list(served.fallbacks_tried) if served else [],
                        attempts=served.attempts if served else 1,
                        finish_reason=event.reason,
                        timings_us=dict(state.timings_us),
                        breakers=generator.breakers(state),
                        findings=list(state.findings),
                        rules_applied=list(state.rules_applied),
                    )
                    yield state.final
        except OutputBlocked as exc:
            state.outcome = "BLOCKED"
            yield ErrorEvent("BLOCKED", f"the answer was stopped: {exc}")
        except StreamInterrupted as exc:
            state.outcome = "INTERRUPTED"
            yield ErrorEvent(
                "INTERRUPTED", f"the answer was cut off: {exc}", getattr(exc, "backend", "")
            )
        except BackendError as exc:
            expired = state.deadline is not None and time.monotonic() >= state.deadline
            state.outcome = "DEADLINE_EXCEEDED" if expired else "UNAVAILABLE"
            yield ErrorEvent(state.outcome, f"no backend could answer: {exc}", exc.backend)
        finally:
            await upstream.aclose()
