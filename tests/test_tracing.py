"""Traces and request logs: a real server whose spans go to the SDK's in-memory exporter, a real
OpenAI-protocol peer that records the traceparent it receives, a real Generator over gRPC."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random
import socket
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as library_encode
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from router._generated.plexus.v1 import generator_pb2 as gen_pb
from router._generated.plexus.v1 import generator_pb2_grpc as gen_grpc
from router._generated.plexus.v1 import plexus_pb2 as pb
from router._generated.plexus.v1 import plexus_pb2_grpc as pb_grpc
from router.backends.grpc_backend import GrpcBackend
from router.backends.types import GenerationRequest, Message
from router.calls import Caller, RouteQuery
from router.config import BackendConfig, LoadedConfig
from router.context.ingest import ingest
from router.errors import NotFound
from router.observe.logs import JsonFormatter, RequestLog, configure_logging
from router.observe.otlp import CompactSpanExporter, SpanBatcher, add_plans
from router.observe.tracing import (
    CLIENT,
    TRACEPARENT,
    SpanPlan,
    TraceContext,
    Tracing,
    new_trace,
    outgoing_traceparent,
    parse_traceparent,
)
from router.pipeline import RequestState
from router.plexus import Plexus
from router.server.app import PlexusServer

from .conftest import DEMO_KEY, KNOWLEDGE, RunningServer, context_config
from .openai_peer import Behaviour, OpenAIPeer

DISPUTE = "you charged my card twice for one order and I want my money back"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class TracedServer(RunningServer):
    """The server with its spans kept in memory."""

    def __init__(self, loaded: LoadedConfig, exporter: InMemorySpanExporter):
        self.exporter = exporter
        super().__init__(loaded)

    async def _build(self, loaded: LoadedConfig) -> PlexusServer:
        tracing = Tracing(SimpleSpanProcessor(self.exporter), service_name="plexus-test")
        return PlexusServer(loaded, plexus=Plexus(loaded, tracing=tracing))


@pytest.fixture(scope="module")
def peer() -> Iterator[OpenAIPeer]:
    running = OpenAIPeer()
    yield running
    running.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, peer: OpenAIPeer) -> Iterator[TracedServer]:
    def adjust(data: dict) -> None:
        data["tenants"]["retail"]["backends"]["reasoning-large"] = {
            "kind": "openai",
            "url": peer.url,
            "model": "big-model",
            "timeout_seconds": 10,
            "price": {"input_per_1k": 3.0, "output_per_1k": 15.0},
        }
        for tenant in data["tenants"].values():
            tenant["audit"] = {"enabled": False}

    loaded = context_config(tmp_path_factory.mktemp("tracing"), adjust)
    ingest(loaded, "retail", "policies", [KNOWLEDGE / "disputes.txt"])
    running = TracedServer(loaded, InMemorySpanExporter())
    yield running
    running.stop()


@pytest.fixture()
def stub(server: TracedServer) -> Iterator[pb_grpc.RouterStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.RouterStub(channel)


def call_metadata(traceparent: str | None = None) -> tuple[tuple[str, str], ...]:
    extra = (("traceparent", traceparent),) if traceparent else ()
    return (("x-api-key", DEMO_KEY), *extra)


def spans_of(exporter: InMemorySpanExporter, request_id: str) -> list[ReadableSpan]:
    """The spans of the trace whose request span carries ``request_id``."""
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.attributes.get("plexus.request_id") == request_id]
    assert len(roots) == 1, f"one request span for {request_id}, found {len(roots)}"
    trace_id = roots[0].context.trace_id
    return [s for s in spans if s.context.trace_id == trace_id]


def tree(spans: list[ReadableSpan]) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The request span and its children, in start order."""
    roots = [s for s in spans if s.name.startswith("plexus.")]
    assert len(roots) == 1
    root = roots[0]
    children = [
        s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id
    ]
    assert len(children) == len(spans) - 1, "every other span is a child of the request's"
    return root, sorted(children, key=lambda s: (s.start_time, s.end_time))


def test_route_is_one_span_with_one_child_per_stage(
    stub: pb_grpc.RouterStub, server: TracedServer
) -> None:
    request = pb.RouteRequest(app="storefront", text="where is my order 88123?", request_id="r-1")
    decision = stub.Route(request, metadata=call_metadata(), timeout=20)
    root, children = tree(spans_of(server.exporter, "r-1"))

    assert root.name == "plexus.Route" and root.kind == SpanKind.SERVER and root.parent is None
    assert root.resource.attributes["service.name"] == "plexus-test"
    attributes = root.attributes
    assert attributes["plexus.tenant"] == "retail" and attributes["plexus.app"] == "storefront"
    assert attributes["plexus.route"] == decision.route
    assert attributes["plexus.model_version"] == decision.model_version
    assert attributes["plexus.confidence"] == pytest.approx(decision.confidence, rel=1e-6)
    assert attributes["plexus.outcome"] == "OK" and root.status.status_code == StatusCode.UNSET

    stages = [t for t in decision.timings if "." not in t.stage]
    assert [c.name for c in children] == [t.stage for t in stages]  # one each, in order
    for child, timing in zip(children, stages, strict=True):
        assert child.end_time - child.start_time == timing.micros * 1000
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time
        assert child.attributes["plexus.stage"] == timing.stage
    for earlier, later in zip(children, children[1:], strict=False):
        assert earlier.end_time == later.start_time  # end to end, as the pipeline ran them
    details = {t.stage: t.micros for t in decision.timings if "." in t.stage}
    for name, micros in details.items():  # finer entries are attributes of their stage
        stage, _, detail = name.partition(".")
        (span,) = [c for c in children if c.name == stage]
        assert span.attributes[f"plexus.detail_us.{detail}"] == micros


def test_an_incoming_traceparent_is_continued(
    stub: pb_grpc.RouterStub, server: TracedServer
) -> None:
    request = pb.RouteRequest(app="storefront", text="is it in stock?", request_id="r-2")
    stub.Route(request, metadata=call_metadata(f"00-{TRACE}-{PARENT}-01"), timeout=20)
    root, children = tree(spans_of(server.exporter, "r-2"))

    assert f"{root.context.trace_id:032x}" == TRACE
    assert root.parent is not None and root.parent.is_remote
    assert f"{root.parent.span_id:016x}" == PARENT
    assert all(f"{c.context.trace_id:032x}" == TRACE for c in children)


def test_orchestrate_spans_and_the_backend_gets_the_same_trace(
    stub: pb_grpc.RouterStub, server: TracedServer, peer: OpenAIPeer
) -> None:
    peer.behaviour = Behaviour(text="We will refund the duplicate charge.")
    trace = "0af7651916cd43dd8448eb211c80319c"
    request = pb.OrchestrateRequest(
        request=pb.RouteRequest(app="storefront", text=DISPUTE, request_id="o-1")
    )
    events = list(
        stub.Orchestrate(request, metadata=call_metadata(f"00-{trace}-{PARENT}-01"), timeout=30)
    )
    final = events[-1].final
    root, children = tree(spans_of(server.exporter, "o-1"))

    assert root.name == "plexus.Orchestrate"
    assert root.attributes["plexus.backend"] == final.backend == "reasoning-large"
    assert root.attributes["gen_ai.usage.output_tokens"] == final.usage.completion_tokens
    assert root.attributes["plexus.attempts"] == final.attempts
    names = [c.name for c in children]
    for stage in ("prep", "route", "policy", "stitch", "budget", "generate"):
        assert names.count(stage) == 1
    (generate,) = [c for c in children if c.name == "generate"]
    assert generate.kind == SpanKind.CLIENT
    assert generate.attributes["plexus.backend"] == "reasoning-large"
    assert [e.name for e in generate.events] == ["first_token"]
    assert generate.start_time <= generate.events[0].timestamp <= generate.end_time
    # output guards run inside generate, delta by delta
    for guard in server.server.plexus.pipeline.guards_out:
        (span,) = [c for c in children if c.name == guard.name]
        assert generate.start_time == span.start_time and span.end_time <= generate.end_time

    header = peer.requests[-1].headers["traceparent"]
    parsed = parse_traceparent(header)
    assert parsed == (trace, f"{generate.context.span_id:016x}", True)


def test_an_unsampled_caller_is_not_exported_but_passed_on(
    stub: pb_grpc.RouterStub, server: TracedServer, peer: OpenAIPeer
) -> None:
    peer.behaviour = Behaviour(text="fine")
    trace = "11111111111111111111111111111111"
    request = pb.OrchestrateRequest(
        request=pb.RouteRequest(app="storefront", text=DISPUTE, request_id="o-2")
    )
    list(stub.Orchestrate(request, metadata=call_metadata(f"00-{trace}-{PARENT}-00"), timeout=30))

    assert not [
        s for s in server.exporter.get_finished_spans() if f"{s.context.trace_id:032x}" == trace
    ]
    received = parse_traceparent(peer.requests[-1].headers["traceparent"])
    assert received is not None and received[0] == trace and received[2] is False


def test_a_refused_request_says_which_stage_stopped_it(
    stub: pb_grpc.RouterStub, server: TracedServer
) -> None:
    request = pb.RouteRequest(app="no-such-app", text="hello", request_id="r-3")
    with pytest.raises(grpc.RpcError) as info:
        stub.Route(request, metadata=call_metadata(), timeout=20)
    root, children = tree(spans_of(server.exporter, "r-3"))

    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert root.status.status_code == StatusCode.ERROR and root.status.description == "NOT_FOUND"
    assert [c.name for c in children] == ["prep"]
    assert children[0].status.status_code == StatusCode.ERROR
    assert children[0].end_time == root.end_time


class Collector:
    """A real OTLP/gRPC trace collector that keeps every export request it receives."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tpb
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tgrpc

        self.requests: list = []
        received = self.requests

        class Service(tgrpc.TraceServiceServicer):
            def Export(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
                received.append(request)
                return tpb.ExportTraceServiceResponse()

        self.server = grpc.server(ThreadPoolExecutor(max_workers=2))
        tgrpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def spans(self) -> list:
        return [s for r in self.requests for rs in r.resource_spans for ss in rs.scope_spans
                for s in ss.spans]  # fmt: skip


class KeptBatcher(SpanBatcher):
    """The batcher, keeping what it was given, so the test can render the same plans."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.given: list = []

    def add(self, trace, outcome, plans) -> None:  # type: ignore[no-untyped-def]
        self.given.append((trace, outcome, plans))
        super().add(trace, outcome, plans)


def test_spans_reach_a_real_collector_as_the_library_would_encode_them(
    tmp_path_factory: pytest.TempPathFactory, peer: OpenAIPeer
) -> None:
    collector = Collector()
    exporter = CompactSpanExporter(endpoint=f"http://127.0.0.1:{collector.port}", timeout=5)
    batcher = KeptBatcher(exporter, service_name="plexus-otlp", batch_spans=16)
    tracing = Tracing(batcher, service_name="plexus-otlp")

    class OtlpServer(RunningServer):
        async def _build(self, loaded: LoadedConfig) -> PlexusServer:
            return PlexusServer(loaded, plexus=Plexus(loaded, tracing=tracing))

    def adjust(data: dict) -> None:
        data["tenants"]["retail"]["backends"]["reasoning-large"] = {
            "kind": "openai", "url": peer.url, "model": "big-model", "timeout_seconds": 10,
        }  # fmt: skip
        for tenant in data["tenants"].values():
            tenant["audit"] = {"enabled": False}

    loaded = context_config(tmp_path_factory.mktemp("otlp"), adjust)
    ingest(loaded, "retail", "policies", [KNOWLEDGE / "disputes.txt"])
    running = OtlpServer(loaded)
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.RouterStub(channel)
            for i in range(12):
                stub.Route(pb.RouteRequest(app="storefront", text=f"where is order {i}?"),
                           metadata=call_metadata(f"00-{TRACE}-{PARENT}-01" if i % 2 else None),
                           timeout=20)  # fmt: skip
            peer.behaviour = Behaviour(text="We will refund the duplicate charge.")
            request = pb.OrchestrateRequest(request=pb.RouteRequest(app="storefront", text=DISPUTE))
            list(stub.Orchestrate(request, metadata=call_metadata(), timeout=30))
            with pytest.raises(grpc.RpcError):
                stub.Route(pb.RouteRequest(app="no-such-app", text="hi"), metadata=call_metadata(),
                           timeout=20)  # fmt: skip
        assert batcher.force_flush(20)
    finally:
        running.stop()  # shuts the tracing down: nothing more is sent
        collector.server.stop(0)

    assert batcher.dropped == batcher.failed == 0
    assert batcher.exported == sum(len(p) for _, _, p in batcher.given)
    assert len(collector.requests) >= 2  # batches of 16 spans
    expected = []
    for trace, outcome, plans in batcher.given:
        encoded = library_encode(tracing.render(trace, outcome, plans))
        expected += [s for rs in encoded.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert collector.spans() == expected
    reference = library_encode(tracing.render(*batcher.given[0]))
    for received in collector.requests:
        assert received.resource_spans[0].resource == reference.resource_spans[0].resource
        assert received.resource_spans[0].scope_spans[0].scope == (
            reference.resource_spans[0].scope_spans[0].scope
        )
    kinds = {s.kind for s in collector.spans()}
    assert len(kinds) == 3 and any(s.status.code == 2 for s in collector.spans())


def test_the_batcher_drops_what_it_cannot_hold_and_survives_a_missing_collector() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exporter = CompactSpanExporter(endpoint=f"http://127.0.0.1:{port}", timeout=1)
    batcher = SpanBatcher(exporter, batch_spans=4, max_spans=10, delay_seconds=0.05)
    tracing = Tracing(batcher)
    state = RequestState(Caller("retail", "demo", False, None), RouteQuery("storefront", "hi"))
    state.timings_us.update(prep=3, route=5)
    for _ in range(5):  # 3 spans each: the fourth and fifth do not fit while the first wait
        batcher.add(state.trace, "OK", tracing.plans(state, time.time_ns()))
    assert batcher.dropped >= 3
    assert batcher.force_flush(30)  # the exports fail; the thread goes on
    batcher.add(state.trace, "OK", tracing.plans(state, time.time_ns()))
    assert batcher.force_flush(30)
    batcher.shutdown(30)
    assert batcher.exported == 0 and batcher.failed + batcher.dropped == 6 * 3


_scalar = (
    st.text()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.binary(max_size=8)
)
_value = st.recursive(
    _scalar,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@given(
    attributes=st.dictionaries(st.text(max_size=12), _value | st.none(), max_size=6),
    event_attributes=st.dictionaries(st.text(max_size=12), _scalar, max_size=3),
    description=st.none() | st.text(max_size=20),
    parent=st.none() | st.tuples(st.integers(1, 2**64 - 1), st.booleans()),
)
def test_the_otlp_messages_agree_with_the_library_on_any_attributes(
    attributes: dict, event_attributes: dict, description: str | None, parent: tuple | None
) -> None:
    tracing = Tracing(SimpleSpanProcessor(InMemorySpanExporter()))
    trace = TraceContext(f"{2**100 + 7:032x}")
    plan = SpanPlan(
        "stage",
        2**60 + 3,
        0 if parent is None else parent[0],
        False if parent is None else parent[1],
        CLIENT,
        1,
        9,
        attributes,
        [("finding", event_attributes, 5)],
        description is not None,
    )
    written = ExportTraceServiceRequest().resource_spans.add().scope_spans.add().spans
    add_plans(written, trace, description or "", [plan, plan])
    encoded = library_encode(tracing.render(trace, description or "", [plan, plan]))
    assert list(written) == list(encoded.resource_spans[0].scope_spans[0].spans)


def test_a_malformed_traceparent_starts_a_new_trace(
    stub: pb_grpc.RouterStub, server: TracedServer
) -> None:
    request = pb.RouteRequest(app="storefront", text="hello", request_id="r-4")
    stub.Route(request, metadata=call_metadata(f"00-{TRACE.upper()}-{PARENT}-01"), timeout=20)
    root, _ = tree(spans_of(server.exporter, "r-4"))
    assert root.parent is None and f"{root.context.trace_id:032x}" != TRACE.lower()


# -- the gRPC Generator gets it as metadata ------------------------------------------------------


class RecordingGenerator(gen_grpc.GeneratorServicer):
    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    async def Generate(  # noqa: N802 - the RPC's name
        self, request: gen_pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gen_pb.GenerateEvent]:
        self.metadata.append(dict(context.invocation_metadata() or ()))
        yield gen_pb.GenerateEvent(delta="hello")
        yield gen_pb.GenerateEvent(
            done=gen_pb.Done(finish_reason="stop", prompt_tokens=1, completion_tokens=1)
        )


async def test_the_grpc_backend_sends_traceparent_metadata() -> None:
    servicer = RecordingGenerator()
    server = grpc.aio.server()
    gen_grpc.add_GeneratorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    backend = GrpcBackend("own", BackendConfig(kind="grpc", url=f"127.0.0.1:{port}"))
    header = f"00-{TRACE}-{PARENT}-01"
    try:
        for traceparent in (header, ""):
            request = GenerationRequest(
                (Message("user", "hi"),), max_tokens=8, temperature=0, traceparent=traceparent
            )
            async for _ in backend.generate(request):
                pass
    finally:
        await backend.aclose()
        await server.stop(0)
    assert servicer.metadata[0]["traceparent"] == header
    assert "traceparent" not in servicer.metadata[1]


# -- trace context -------------------------------------------------------------------------------


def test_traceparent_parsing() -> None:
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-01") == (TRACE, PARENT, True)
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-00") == (TRACE, PARENT, False)
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-03") == (TRACE, PARENT, True)
    assert parse_traceparent(f"01-{TRACE}-{PARENT}-01-future") == (TRACE, PARENT, True)
    for bad in (
        f"00-{TRACE}-{PARENT}-01-extra",  # version 00 has no more fields
        f"ff-{TRACE}-{PARENT}-01",
        f"00-{'0' * 32}-{PARENT}-01",
        f"00-{TRACE}-{'0' * 16}-01",
        f"00-{TRACE.upper()}-{PARENT}-01",
        f"00-{TRACE[:-1]}-{PARENT}-01",
        "",
        "x" * 10_000,
    ):
        assert parse_traceparent(bad) is None, bad


@given(st.text(max_size=80))
def test_any_header_parses_or_is_refused(header: str) -> None:
    parsed = parse_traceparent(header)
    if parsed is not None:
        trace_id, parent_id, _ = parsed
        assert len(trace_id) == 32 and len(parent_id) == 16


@given(st.integers(1, 2**128 - 1), st.integers(1, 2**64 - 1), st.booleans())
def test_a_continued_trace_keeps_its_ids(trace: int, parent: int, sampled: bool) -> None:
    header = f"00-{trace:032x}-{parent:016x}-{'01' if sampled else '00'}"
    token = TRACEPARENT.set(header)
    try:
        context = new_trace()
    finally:
        TRACEPARENT.reset(token)
    assert (context.trace_id, context.parent_id, context.sampled) == (
        f"{trace:032x}",
        f"{parent:016x}",
        sampled,
    )
    # without tracing, the caller's header goes on as it came
    assert outgoing_traceparent(context, None) == header


def test_sampling_by_ratio_and_by_the_caller() -> None:
    tracing = Tracing(SimpleSpanProcessor(InMemorySpanExporter()), sample_ratio=0.25)
    rng = random.Random(7)
    contexts = [TraceContext(f"{rng.getrandbits(128):032x}") for _ in range(4000)]
    share = sum(tracing.sampled(c) for c in contexts) / len(contexts)
    assert 0.22 < share < 0.28
    never = Tracing(SimpleSpanProcessor(InMemorySpanExporter()), sample_ratio=0.0)
    always = Tracing(SimpleSpanProcessor(InMemorySpanExporter()), sample_ratio=1.0)
    assert not any(never.sampled(c) for c in contexts)
    assert all(always.sampled(c) for c in contexts)
    assert never.sampled(TraceContext(TRACE, PARENT, sampled=True))  # the caller decided
    assert not always.sampled(TraceContext(TRACE, PARENT, sampled=False))
    # a new trace goes to the backend with a span of ours and the sampling decision
    context = TraceContext(TRACE)
    assert outgoing_traceparent(context, always) == f"00-{TRACE}-{context.generate_id:016x}-01"
    assert outgoing_traceparent(context, never).endswith("-00")
    with pytest.raises(ValueError, match="sample_ratio"):
        Tracing(SimpleSpanProcessor(InMemorySpanExporter()), sample_ratio=1.5)


# -- request logs --------------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_request_log_lines_carry_request_and_trace_ids(trained_config: LoadedConfig) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("plexus.requests.test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    async def run() -> None:
        from router.calls import RouteQuery

        plexus = Plexus(trained_config, recorders=[RequestLog(logger)])
        try:
            caller = plexus.keys.authenticate(DEMO_KEY)
            token = TRACEPARENT.set(f"00-{TRACE}-{PARENT}-01")
            try:
                await plexus.pipeline.route(
                    caller, RouteQuery("storefront", "hi", request_id="l-1")
                )
            finally:
                TRACEPARENT.reset(token)
            with pytest.raises(NotFound):
                await plexus.pipeline.route(caller, RouteQuery("no\nsuch app", "hi"))
        finally:
            await plexus.aclose()

    try:
        asyncio.run(run())
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # one per request, the forged newline escaped
    first, second = (json.loads(line) for line in lines)
    assert first["request_id"] == "l-1" and first["trace_id"] == TRACE
    assert first["tenant"] == "retail" and first["rpc"] == "Route" and first["outcome"] == "OK"
    assert first["route"] and isinstance(first["server_us"], int) and first["level"] == "INFO"
    assert "text" not in first and "hi" not in first.values()
    assert second["outcome"] == "NOT_FOUND" and second["app"] == repr("no\nsuch app")
    assert len(second["trace_id"]) == 32 and second["trace_id"] != TRACE


def test_configure_logging_is_json_unless_a_terminal() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        for stream, expect_json in ((io.StringIO(), True), (Terminal(), False)):
            configure_logging("auto", logging.INFO, stream=stream)
            logging.getLogger("plexus.requests").info("a request", extra={"tenant": "retail"})
            line = stream.getvalue().strip()
            if expect_json:
                assert json.loads(line)["tenant"] == "retail"
            else:
                assert line.endswith("INFO plexus.requests: a request")
        stream = Terminal()
        configure_logging("json", stream=stream)
        logging.getLogger("plexus.x").warning("forced")
        assert json.loads(stream.getvalue())["message"] == "forced"
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        logging.getLogger("plexus.requests").setLevel(logging.NOTSET)
