"""OTLP messages of finished requests' spans, written in place, and their batched export.

The OpenTelemetry exporter's own encoder (``encode_spans``) takes the SDK's span objects and
builds every span, attribute and value as a keyword-argument message that is then copied into
its parent, and hashes each span's resource (as JSON) to group the spans by resource: about
40-45 µs per span on the 2-core machine of ``docs/benchmarks.md``, on the batch processor's
thread but under the GIL, so the serving loop pays for it. :func:`add_plans` writes a request's
spans from the tracing recorder's plans straight into the export request that
:class:`SpanBatcher` will send, each message made where it lives and the resource and scope
encoded once per batch (about 6 µs per span). ``tests/test_tracing.py`` checks it against the
library's encoder of the same spans, message for message, through a real collector and on
arbitrary attribute values.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import StatusCode

if TYPE_CHECKING:
    from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.trace.v1.trace_pb2 import Span
    from opentelemetry.sdk.trace import ReadableSpan

    from router.observe.tracing import SpanPlan, TraceContext

log = logging.getLogger("plexus.tracing")

SCOPE_NAME = "plexus.router"
"""The instrumentation scope of every span Plexus makes."""


def span_resource(service_name: str) -> Resource:
    """The resource every span of this process names: ``service.name`` and the SDK's own."""
    return Resource.create({"service.name": service_name})


_HAS_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK


def _set_value(target: AnyValue, value: Any) -> None:
    """``value`` into ``target`` as OTLP's encoder has it (None stays an empty value)."""
    if value is None:
        target.SetInParent()
    elif isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, str):
        target.string_value = value
    elif isinstance(value, int):
        target.int_value = value
    elif isinstance(value, float):
        target.double_value = value
    elif isinstance(value, bytes):
        target.bytes_value = value
    elif isinstance(value, Sequence):
        target.array_value.SetInParent()  # present even when empty
        values = target.array_value.values
        for item in value:
            _set_value(values.add(), item)
    elif isinstance(value, Mapping):
        target.kvlist_value.SetInParent()
        _set_attributes(target.kvlist_value.values, value)
    else:
        raise TypeError(f"an attribute value of type {type(value).__name__} has no OTLP form")


def _set_attributes(target: RepeatedCompositeFieldContainer[KeyValue], attributes: Any) -> None:
    if attributes:
        for key, value in attributes.items():
            _set_value(target.add(key=str(key)).value, value)


def add_plans(
    target: RepeatedCompositeFieldContainer[Span],
    trace: TraceContext,
    outcome: str,
    plans: Sequence[SpanPlan],
) -> None:
    """One request's spans, straight from the tracing recorder's plans into ``target``: the
    messages the library's encoder makes of the SDK spans rendered from the same plans."""
    trace_id = int(trace.trace_id, 16).to_bytes(16, "big")
    for plan in plans:
        out = target.add(
            trace_id=trace_id,
            span_id=plan.span_id.to_bytes(8, "big"),
            name=plan.name,
            kind=plan.kind + 1,
            start_time_unix_nano=plan.start,
            end_time_unix_nano=plan.end,
            flags=_HAS_IS_REMOTE | _IS_REMOTE if plan.remote_parent else _HAS_IS_REMOTE,
        )
        if plan.parent_id:
            out.parent_span_id = plan.parent_id.to_bytes(8, "big")
        _set_attributes(out.attributes, plan.attributes)
        for name, attributes, time_ns in plan.events:
            event = out.events.add(name=name, time_unix_nano=time_ns)
            _set_attributes(event.attributes, attributes)
        status = out.status
        if plan.failed:
            status.code = StatusCode.ERROR.value
            status.message = outcome
        else:
            status.SetInParent()


class CompactSpanExporter(OTLPSpanExporter):
    """The OTLP/gRPC span exporter (its channel, retries, timeouts and shutdown), sending an
    export request :class:`SpanBatcher` built already as it is (SDK spans, should it be given
    any, go through the library's own encoder)."""

    def _translate_data(
        self, data: Sequence[ReadableSpan] | ExportTraceServiceRequest
    ) -> ExportTraceServiceRequest:
        if isinstance(data, ExportTraceServiceRequest):
            return data
        return super()._translate_data(data)

    def _count_data(self, data: Sequence[ReadableSpan] | ExportTraceServiceRequest) -> int:
        if isinstance(data, ExportTraceServiceRequest):
            return sum(len(s.spans) for r in data.resource_spans for s in r.scope_spans)
        return len(data)


class SpanBatcher:
    """Finished requests' spans, written on the serving thread into the next export request
    (``add``), and sent by one background thread through ``exporter`` once ``batch_spans`` are
    waiting or ``delay_seconds`` after the first.

    This is the SDK's batch span processor without its per-span objects: the serving thread
    writes each span's message where it will be sent (about 6 µs), and the thread that sends
    does no Python work beyond the gRPC call, so it hardly contends for the GIL. At most
    ``max_spans`` wait; beyond that, while the collector is slow or away, new spans are dropped
    and counted (``dropped``), as the SDK's processor does.
    """

    def __init__(
        self,
        exporter: CompactSpanExporter,
        *,
        service_name: str = "plexus",
        batch_spans: int = 512,
        delay_seconds: float = 2.0,
        max_spans: int = 8192,
    ):
        self.exporter = exporter
        self.batch_spans = batch_spans
        self.delay_seconds = delay_seconds
        self.max_spans = max_spans
        self.dropped = 0
        """Spans not queued: ``max_spans`` were waiting already (or the batcher was closing)."""
        self.exported = 0
        self.failed = 0
        """Spans whose export failed (the collector away or refusing), after the retries."""
        template = ExportTraceServiceRequest()
        grouped = template.resource_spans.add()
        _set_attributes(grouped.resource.attributes, span_resource(service_name).attributes)
        grouped.scope_spans.add().scope.name = SCOPE_NAME
        self._template = template.SerializeToString()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._flushed = threading.Condition(self._lock)
        self._closing = False
        self._sending = 0
        self._pending, self._spans, self._waiting = self._fresh()
        self._thread = threading.Thread(target=self._run, name="plexus-spans", daemon=True)
        self._thread.start()

    def _fresh(self) -> tuple[ExportTraceServiceRequest, Any, int]:
        request = ExportTraceServiceRequest.FromString(self._template)
        return request, request.resource_spans[0].scope_spans[0].spans, 0

    def add(self, trace: TraceContext, outcome: str, plans: Sequence[SpanPlan]) -> None:
        """Queue one request's spans (from any thread; never blocks on the network)."""
        with self._lock:
            if self._closing or self._waiting + len(plans) > self.max_spans:
                self.dropped += len(plans)
                return
            add_plans(self._spans, trace, outcome, plans)
            first = self._waiting == 0
            self._waiting += len(plans)
            full = self._waiting >= self.batch_spans
        if first or full:
            self._wake.set()

    def _take(self) -> tuple[ExportTraceServiceRequest, int] | None:
        with self._lock:
            if not self._waiting:
                return None
            request, waiting = self._pending, self._waiting
            self._pending, self._spans, self._waiting = self._fresh()
            self._sending += waiting
            return request, waiting

    def _run(self) -> None:
        while True:
            self._wake.wait()  # spans queued, a full batch, a flush or the end
            with self._lock:
                gather = not self._closing and self._waiting < self.batch_spans
            if gather:  # wait a while for more, unless woken again
                self._wake.clear()
                self._wake.wait(self.delay_seconds)
            self._wake.clear()
            taken = self._take()
            if taken is not None:
                request, count = taken
                try:
                    sent = self.exporter.export(request) == SpanExportResult.SUCCESS
                except Exception:  # noqa: BLE001 - a failed export loses its batch, not the thread
                    log.exception("exporting %d spans failed", count)
                    sent = False
                if sent:
                    self.exported += count
                else:  # the exporter logged why, after its own retries
                    self.failed += count
            with self._lock:
                if taken is not None:
                    self._sending -= taken[1]
                self._flushed.notify_all()
                if self._waiting:
                    self._wake.set()
                elif self._closing:
                    return

    def counts(self) -> dict[str, int]:
        """Spans ``exported``, ``failed`` and ``dropped`` so far."""
        return {"exported": self.exported, "failed": self.failed, "dropped": self.dropped}

    def force_flush(self, timeout_seconds: float = 30.0) -> bool:
        """Send everything queued now; True once it was sent (or failed) within the timeout."""
        self._wake.set()
        with self._lock:
            return self._flushed.wait_for(
                lambda: not self._waiting and not self._sending, timeout_seconds
            )

    def shutdown(self, timeout_seconds: float = 30.0) -> None:
        """Send what is queued, stop the thread, close the exporter."""
        with self._lock:
            self._closing = True
        self._wake.set()
        self._thread.join(timeout_seconds)
        self.exporter.shutdown()
