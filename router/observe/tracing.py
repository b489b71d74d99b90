"""OpenTelemetry traces of requests: one span per request and one child span per stage.

Nothing is traced on the request path itself. The pipeline already times every stage in
order (``RequestState.timings_us``) from a wall-clock start (``RequestState.started_ns``), so
the :class:`Tracing` recorder plans the spans once the request has ended (:class:`SpanPlan`:
plain values) and either writes them as OTLP messages into the next export request
(``router.observe.otlp.SpanBatcher``, what ``exporter: otlp`` uses) or renders them as the
SDK's finished spans for any OpenTelemetry span processor (in tests, the in-memory exporter);
``tests/test_tracing.py`` proves both give the same OTLP messages. Without an exporter
configured there is no recorder and no cost.

Trace context is W3C ``traceparent``: the gRPC servicer puts the caller's header into
:data:`TRACEPARENT`, each request's :class:`TraceContext` continues it (or starts a new trace),
and the generate stage passes a ``traceparent`` naming the generate span to the backend (an
HTTP header, gRPC metadata). Output guards run inside generate, delta by delta: their spans
start with generate's and last their summed time. Finer timing entries (``route.encode``,
``stitch.sql:stores``) become attributes of their stage's span.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Collection, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

    from router.config import LoadedConfig
    from router.observe.otlp import SpanBatcher
    from router.pipeline import Pipeline, RequestState

TRACEPARENT: ContextVar[str] = ContextVar("plexus_traceparent", default="")
"""The current call's incoming ``traceparent`` header (empty without one); set per call by the
gRPC servicer, read when the call's ``RequestState`` is made."""

_HEADER = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_ids = random.Random(os.urandom(16))  # not the global generator: a seeded test cannot repeat ids


def _span_id() -> int:
    while True:
        value = _ids.getrandbits(64)
        if value:
            return value


def _trace_id() -> str:
    while True:
        value = _ids.getrandbits(128)
        if value:
            return f"{value:032x}"


def parse_traceparent(header: str) -> tuple[str, str, bool] | None:
    """``(trace_id, parent_span_id, sampled)`` from a W3C ``traceparent`` header, or None when
    it is not a valid one (the trace then starts here, as the recommendation says)."""
    if not isinstance(header, str) or len(header) > 512:
        return None
    found = _HEADER.fullmatch(header.strip())
    if found is None:
        return None
    version, trace_id, parent_id, flags, rest = found.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, bool(int(flags, 16) & 1)


def traceparent_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The ``traceparent`` entry of gRPC call metadata (empty without one)."""
    for key, value in metadata or ():
        if key == "traceparent":
            return value if isinstance(value, str) else ""
    return ""


@dataclass(slots=True)
class TraceContext:
    """One request's place in a trace. Span ids are drawn when something first needs them."""

    trace_id: str
    """32 lowercase hex digits."""
    parent_id: str = ""
    """The caller's span (16 hex digits); empty when the trace starts here."""
    sampled: bool | None = None
    """The caller's sampled flag; None when the trace starts here (the sample ratio decides)."""
    span_id: int = 0
    generate_id: int = 0
    generate_ns: int = 0
    """``time.time_ns()`` when the generate stage began (0: it did not run)."""

    def request_span(self) -> int:
        """The id of this request's own span."""
        if not self.span_id:
            self.span_id = _span_id()
        return self.span_id

    def generate_span(self) -> int:
        """The id of the generate stage's span: the parent the backends are told of."""
        if not self.generate_id:
            self.generate_id = _span_id()
        return self.generate_id


def new_trace() -> TraceContext:
    """The trace of a request made now: the current call's ``traceparent`` continued, else a new
    trace id."""
    header = TRACEPARENT.get()
    if header:
        parsed = parse_traceparent(header)
        if parsed is not None:
            return TraceContext(*parsed)
    return TraceContext(_trace_id())


def outgoing_traceparent(trace: TraceContext, tracing: Tracing | None) -> str:
    """The ``traceparent`` a backend call carries. With tracing, it names the generate span and
    says whether this trace is sampled; without, the caller's header goes on unchanged (a
    trace that starts here is passed on unsampled, so the backend's logs can name it)."""
    if tracing is None:
        if trace.parent_id:
            return f"00-{trace.trace_id}-{trace.parent_id}-{'01' if trace.sampled else '00'}"
        return f"00-{trace.trace_id}-{trace.generate_span():016x}-00"
    flags = "01" if tracing.sampled(trace) else "00"
    return f"00-{trace.trace_id}-{trace.generate_span():016x}-{flags}"


ADMISSION = "admission"
"""The stage name of a call refused before it became a request (unknown key, malformed message,
deadline already past): metrics, spans and logs name it so."""


def stopped_stage(state: RequestState, stage_order: Sequence[str]) -> str:
    """The stage that stopped a request that did not end OK: the first of ``stage_order`` (the
    pipeline's stages before generate) without a timing, else ``generate`` for a generation
    that ended without a final event; ``admission`` for a call refused before it became a
    request; empty when every stage ran (a recorder failed, say)."""
    if not state.admitted:
        return ADMISSION
    ran = state.timings_us
    for stage in stage_order:
        if stage not in ran:
            return stage
    if state.generates and "generate" not in ran:
        return "generate"
    return ""


SERVER, INTERNAL, CLIENT = 1, 0, 2
"""The span kinds a plan names, as the SDK's ``SpanKind`` values."""


class SpanPlan(NamedTuple):
    """One span of a finished request, as plain values."""

    name: str
    span_id: int
    parent_id: int
    """0: no parent (a trace that starts here)."""
    remote_parent: bool
    kind: int
    start: int
    end: int
    attributes: dict[str, Any]
    events: Sequence[tuple[str, dict[str, Any], int]]
    """``(name, attributes, time_ns)``."""
    failed: bool
    """The span's status is an error naming the request's outcome."""


def _number(value: float) -> float:
    return value if value == value and abs(value) != float("inf") else 0.0


class Tracing:
    """The tracing recorder: a finished request's spans, handed to ``processor`` (a
    :class:`~router.observe.otlp.SpanBatcher`, or any SDK span processor).

    ``sample_ratio`` keeps that share of the traces that start here (by trace id, so every
    replica keeps the same ones); a caller's sampled flag decides for the traces it started.
    ``stage_order`` names the pipeline's stages in order, so a failed request's span says which
    stage stopped it; ``output_guards`` names the stages that run inside generate.
    """

    def __init__(
        self,
        processor: SpanProcessor | SpanBatcher,
        *,
        sample_ratio: float = 1.0,
        service_name: str = "plexus",
        stage_order: Sequence[str] = (),
        output_guards: Collection[str] = (),
    ):
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        if not 0.0 <= sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio must be within [0, 1], not {sample_ratio}")
        from router.observe.otlp import SCOPE_NAME, SpanBatcher, span_resource

        self.processor = processor
        self._batcher = processor if isinstance(processor, SpanBatcher) else None
        self.sample_ratio = sample_ratio
        self._bound = round(sample_ratio * (1 << 64))
        self.stage_order = tuple(stage_order)
        self.output_guards = frozenset(output_guards)
        self._resource = span_resource(service_name)
        self._scope = InstrumentationScope(SCOPE_NAME)
        self._sampled = TraceFlags(TraceFlags.SAMPLED)
        self._kinds = {k.value: k for k in (SpanKind.SERVER, SpanKind.INTERNAL, SpanKind.CLIENT)}
        self._ok = Status(StatusCode.UNSET)
        self._status = Status
        self._error = StatusCode.ERROR
        self._span = ReadableSpan
        self._context = SpanContext
        self._event = Event
        self._stage_attributes: dict[str, dict[str, Any]] = {}
        """``{"plexus.stage": name}`` per stage, made once and shared by its spans."""

    @classmethod
    def from_config(cls, loaded: LoadedConfig) -> Tracing | None:
        """The configured tracing (``server.tracing``); None for ``exporter: none``."""
        config = loaded.config.server.tracing
        if config.exporter == "none":
            return None
        from router.observe.otlp import CompactSpanExporter, SpanBatcher

        exporter = CompactSpanExporter(endpoint=config.endpoint or None)
        return cls(
            SpanBatcher(exporter, service_name=config.service_name),
            sample_ratio=config.sample_ratio,
            service_name=config.service_name,
        )

    def sampled(self, trace: TraceContext) -> bool:
        """Whether the spans of this trace are kept."""
        if trace.sampled is not None:
            return trace.sampled
        return int(trace.trace_id[16:], 16) < self._bound

    async def record(self, state: RequestState) -> None:
        """Hand the request's spans to the processor (when its trace is sampled)."""
        if self.sampled(state.trace):
            plans = self.plans(state, time.time_ns())
            if self._batcher is not None:
                self._batcher.add(state.trace, state.outcome, plans)
            else:
                for span in self.render(state.trace, state.outcome, plans):
                    self.processor.on_end(span)

    def plans(self, state: RequestState, end_ns: int) -> list[SpanPlan]:
        """The request's span and its stages' spans, the request's first, as plain values (the
        two renderers make SDK spans or OTLP messages of them)."""
        trace = state.trace
        start = state.started_ns
        if end_ns < start:
            end_ns = start
        decision = state.decision
        final = state.final
        failed = state.outcome != "OK"
        guards = self.output_guards

        # the stages, end to end from the start; finer entries attach to their stage
        stages: list[tuple[str, int, int]] = []  # name, start, end
        details: dict[str, dict[str, int]] | None = None
        cursor = start
        generate_start = 0
        for name, micros in state.timings_us.items():
            if "." in name:
                stage, _, detail = name.partition(".")
                if details is None:
                    details = {}
                details.setdefault(stage, {})[detail] = micros
            elif name == "generate":  # it began after the first events went out: as measured
                generate_start = trace.generate_ns or cursor
                cursor = generate_start + micros * 1000
                stages.append((name, generate_start, cursor))
            elif name in guards:
                stages.append((name, cursor, cursor + micros * 1000))
            else:
                began = cursor
                cursor += micros * 1000
                stages.append((name, began, cursor))
        stopped = stopped_stage(state, self.stage_order) if failed else ""
        if stopped:  # the stage that stopped the request has no timing: it runs to the end
            if stopped == "generate":
                cursor = generate_start = trace.generate_ns or cursor
            stages.append((stopped, cursor, end_ns))

        query = state.query
        attributes: dict[str, Any] = {
            "rpc.method": state.rpc,
            "plexus.tenant": state.caller.tenant,
            "plexus.app": query.app if len(query.app) <= 128 else query.app[:128],
            "plexus.outcome": state.outcome,
        }
        if query.request_id:
            attributes["plexus.request_id"] = query.request_id[:128]
        if decision is not None:
            attributes["plexus.route"] = decision.route
            attributes["plexus.model_version"] = decision.model_version
            attributes["plexus.confidence"] = _number(float(decision.confidence))
            attributes["plexus.abstained"] = bool(decision.abstained)
        if state.rules_applied:
            attributes["plexus.rules_applied"] = list(state.rules_applied)
        backend = ""
        if final is not None:
            backend = final.backend
            attributes["plexus.backend"] = backend
            attributes["plexus.attempts"] = final.attempts
            attributes["plexus.fallbacks_tried"] = list(final.fallbacks_tried)
            attributes["gen_ai.usage.input_tokens"] = final.usage.prompt_tokens
            attributes["gen_ai.usage.output_tokens"] = final.usage.completion_tokens
            attributes["plexus.cost"] = _number(final.cost)
        elif state.chain:
            attributes["plexus.chain"] = list(state.chain)

        findings: dict[str, list[tuple[str, str]]] = {}
        for finding in state.findings:
            findings.setdefault(finding.stage, []).append((finding.kind, finding.action))

        request_id = trace.request_span()
        plans = [
            SpanPlan(
                f"plexus.{state.rpc}",
                request_id,
                int(trace.parent_id, 16) if trace.parent_id else 0,
                bool(trace.parent_id),
                SERVER,
                start,
                end_ns,
                attributes,
                (),
                failed,
            )
        ]
        shared = self._stage_attributes
        for name, began, ended in stages:
            if ended > end_ns:
                ended = end_ns
            if began > ended:
                began = ended
            stage_attributes = shared.get(name)
            if stage_attributes is None:
                stage_attributes = shared[name] = {"plexus.stage": name}
            if details is not None and name in details:
                stage_attributes = dict(stage_attributes)
                for detail, micros in details[name].items():
                    stage_attributes[f"plexus.detail_us.{detail}"] = micros
            events: list[tuple[str, dict[str, Any], int]] = []
            if name in findings:
                events = [
                    ("finding", {"plexus.kind": k, "plexus.action": a}, ended)
                    for k, a in findings[name]
                ]
            kind = INTERNAL
            if name == "generate":
                kind = CLIENT
                span_id = trace.generate_span()
                if backend:
                    stage_attributes = {**stage_attributes, "plexus.backend": backend}
                if state.first_token_ns:
                    events.append(("first_token", {}, state.first_token_ns))
            else:
                span_id = _ids.getrandbits(64) or 1
                if generate_start and name in guards:
                    began, ended = generate_start, generate_start + (ended - began)
                    if ended > end_ns:
                        ended = end_ns
            plans.append(
                SpanPlan(
                    name,
                    span_id,
                    request_id,
                    False,
                    kind,
                    began,
                    ended,
                    stage_attributes,
                    events,
                    name == stopped,
                )
            )
        return plans

    def spans(self, state: RequestState, end_ns: int) -> list[ReadableSpan]:
        """The request's spans as the SDK's finished spans, the request's first."""
        return self.render(state.trace, state.outcome, self.plans(state, end_ns))

    def render(
        self, trace: TraceContext, outcome: str, plans: Sequence[SpanPlan]
    ) -> list[ReadableSpan]:
        """SDK spans of ``plans`` (a failed span's status says ``outcome``)."""
        span_type, context_type, event_type = self._span, self._context, self._event
        resource, scope, ok = self._resource, self._scope, self._ok
        trace_id = int(trace.trace_id, 16)
        flags = self._sampled
        kinds = self._kinds
        error = self._status(self._error, outcome)
        spans = []
        for plan in plans:
            parent = (
                context_type(trace_id, plan.parent_id, plan.remote_parent, flags)
                if plan.parent_id
                else None
            )
            spans.append(
                span_type(
                    plan.name,
                    context_type(trace_id, plan.span_id, False, flags),
                    parent,
                    resource,
                    plan.attributes,
                    [event_type(n, a or None, timestamp=t) for n, a, t in plan.events],
                    (),
                    kinds[plan.kind],
                    None,
                    error if plan.failed else ok,
                    plan.start,
                    plan.end,
                    scope,
                )
            )
        return spans

    def follow(self, pipeline: Pipeline) -> None:
        """Learn ``pipeline``'s stage order and its output guards."""
        self.stage_order = tuple(stage.name for stage in pipeline.to_generate)
        self.output_guards = frozenset(guard.name for guard in pipeline.guards_out)

    def shutdown(self) -> None:
        """Export what is still queued and stop the processor."""
        self.processor.shutdown()
