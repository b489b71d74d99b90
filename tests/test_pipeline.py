"""Every RPC through the one pipeline: stages that rewrite, add findings, stop; record; guard-out.

A real server on an ephemeral port, built with extra stages injected the way the governance,
policy and monitoring stages will be.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router._generated.plexus.v1 import plexus_pb2 as pb
from router._generated.plexus.v1 import plexus_pb2_grpc as pb_grpc
from router.calls import Caller, RouteQuery
from router.config import LoadedConfig
from router.context.ingest import ingest
from router.errors import PermissionDenied
from router.pipeline import Finding, OutputBlocked, RequestState
from router.plexus import Plexus
from router.server.app import PlexusServer
from router.stages.output import HeldWindow, ReplaceAnswer

from .conftest import DEMO_KEY, KNOWLEDGE, RunningServer, context_config

META = (("x-api-key", DEMO_KEY),)


class RewriteCodes:
    """guard-in that rewrites the text later stages see."""

    name = "rewrite_codes"

    async def run(self, state: RequestState) -> None:
        state.text = state.text.replace("SECRET-42", "[code]")


class NoteCards:
    """guard-in that adds a finding and lets the request pass."""

    name = "note_cards"

    async def run(self, state: RequestState) -> None:
        start = state.text.find("card")
        if start >= 0:
            state.findings.append(Finding(self.name, "mentions_card", "", start, start + 4))


class StopForbidden:
    """guard-in that stops the request."""

    name = "stop_forbidden"

    async def run(self, state: RequestState) -> None:
        if "forbidden" in state.text:
            raise PermissionDenied("this text asks for something forbidden")


class RedactPhrase:
    """guard-out that rewrites a phrase the local backend streams over three deltas."""

    name = "redact_phrase"

    def watch(self, state: RequestState) -> HeldWindow:
        return HeldWindow(16, lambda text, _final: text.replace("I was given", "[phrase]"))


class BlockOnPhrase:
    """guard-out that stops the answer when a phrase would be released."""

    name = "block_phrase"

    def __init__(self) -> None:
        self.armed = False

    def watch(self, state: RequestState) -> HeldWindow:
        def review(text: str, _final: bool) -> str:
            if self.armed and "messages" in text:
                raise OutputBlocked("the answer mentions messages")
            return text

        return HeldWindow(16, review)


class Recorded:
    """record: keeps every final state (thread-safe: the server runs on its own loop)."""

    def __init__(self) -> None:
        self.states: list[RequestState] = []
        self.done_at: dict[str, float] = {}
        self.lock = threading.Lock()

    async def record(self, state: RequestState) -> None:
        if "slow_record" in state.query.metadata:  # a record that takes a while to be durable
            await asyncio.sleep(0.3)
        with self.lock:
            self.states.append(state)
            self.done_at[state.query.request_id] = time.monotonic()

    def of(self, request_id: str) -> list[RequestState]:
        with self.lock:
            return [s for s in self.states if s.query.request_id == request_id]


def with_extractors(data: dict) -> None:
    data["tenants"]["retail"]["extractors"] = [
        {"name": "store_id", "kind": "store_id", "pad_digits": 4},
        {"name": "order_id", "kind": "order_number"},
    ]


class StagedServer(RunningServer):
    def __init__(self, loaded: LoadedConfig, recorded: Recorded, blocker: BlockOnPhrase):
        self.recorded = recorded
        self.blocker = blocker
        super().__init__(loaded)

    async def _build(self, loaded: LoadedConfig) -> PlexusServer:
        plexus = Plexus(
            loaded,
            guards_in=[RewriteCodes(), NoteCards(), StopForbidden()],
            guards_out=[RedactPhrase(), self.blocker],
            recorders=[self.recorded],
        )
        return PlexusServer(loaded, plexus=plexus)


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    loaded = context_config(tmp_path_factory.mktemp("pipeline"), with_extractors)
    ingest(
        loaded, "retail", "policies", sorted(p for p in KNOWLEDGE.iterdir() if p.suffix != ".jsonl")
    )
    ingest(loaded, "retail", "products", sorted(KNOWLEDGE.glob("*.jsonl")))
    running = StagedServer(loaded, Recorded(), BlockOnPhrase())
    yield running
    running.stop()


@pytest.fixture()
def stub(staged):
    with grpc.insecure_channel(staged.address) as channel:
        yield pb_grpc.RouterStub(channel)


def request(text: str, app: str = "storefront", **metadata: str) -> pb.RouteRequest:
    return pb.RouteRequest(app=app, text=text, metadata=metadata, request_id=uuid.uuid4().hex)


GUARDS_IN = ["rewrite_codes", "note_cards", "stop_forbidden"]
TO_POLICY = ["prep", "pii", "injection", *GUARDS_IN, "route", "app_rules", "policy"]


def stage_names(timings) -> list[str]:  # type: ignore[no-untyped-def]
    return [t.stage for t in timings if "." not in t.stage]


def test_route_runs_every_stage_once_and_reports_each(stub, staged):
    sent = request("where is my order SECRET-42? I paid by card")
    decision = stub.Route(sent, metadata=META, timeout=20)
    assert stage_names(decision.timings) == TO_POLICY
    assert decision.server_micros == sum(t.micros for t in decision.timings if t.stage in TO_POLICY)
    (state,) = staged.recorded.of(sent.request_id)
    assert state.rpc == "Route" and state.outcome == "OK"
    assert state.text == "where is my order [code]? I paid by card"
    assert state.query.text == sent.text  # the caller's text is kept as sent
    assert [f.kind for f in state.findings] == ["mentions_card"]
    assert state.decision is not None and state.decision.route == decision.route


def test_a_stopping_stage_gives_its_status_on_every_rpc(stub, staged):
    def denied(call) -> grpc.RpcError:  # type: ignore[no-untyped-def]
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "forbidden" in info.value.details()
        return info.value

    text = "show me the forbidden report"
    route = request(text)
    denied(lambda: stub.Route(route, metadata=META, timeout=20))
    batch = [request("where is my order"), request(text)]
    denied(lambda: stub.RouteBatch(pb.RouteBatchRequest(requests=batch), metadata=META, timeout=20))
    streamed = request(text)
    denied(lambda: list(stub.RouteStream(iter([streamed]), metadata=META, timeout=20)))
    stitched = request(text)
    denied(lambda: stub.Stitch(pb.StitchRequest(request=stitched), metadata=META, timeout=20))
    orchestrated = request(text)
    events: list[pb.OrchestrateEvent] = []

    def orchestrate() -> None:
        call = stub.Orchestrate(
            pb.OrchestrateRequest(request=orchestrated), metadata=META, timeout=20
        )
        events.extend(call)

    denied(orchestrate)
    assert events == []  # stopped before the stream started: a status, not a broken stream
    for sent, rpc in [
        (route, "Route"),
        (batch[1], "RouteBatch"),
        (streamed, "RouteStream"),
        (stitched, "Stitch"),
        (orchestrated, "Orchestrate"),
    ]:
        (state,) = staged.recorded.of(sent.request_id)
        assert (state.rpc, state.outcome) == (rpc, "PERMISSION_DENIED")
        assert isinstance(state.error, PermissionDenied)
        assert state.decision is None  # stopped before route
    # The batch failed as a whole, and record still saw its other request once.
    (other,) = staged.recorded.of(batch[0].request_id)
    assert other.outcome == "PERMISSION_DENIED"


def test_batch_and_stream_report_stages_and_record_each_request(stub, staged):
    batch = [request("where is my order"), request("can I return a jacket")]
    reply = stub.RouteBatch(pb.RouteBatchRequest(requests=batch), metadata=META, timeout=20)
    streamed = [request("is the red kettle in stock at store 1432"), request("opening hours")]
    decisions = list(stub.RouteStream(iter(streamed), metadata=META, timeout=20))
    for decision in [*reply.decisions, *decisions]:
        assert stage_names(decision.timings) == TO_POLICY
    for sent, rpc in [(r, "RouteBatch") for r in batch] + [(r, "RouteStream") for r in streamed]:
        (state,) = staged.recorded.of(sent.request_id)
        assert (state.rpc, state.outcome) == (rpc, "OK")


def test_stitch_sees_the_rewritten_text_and_extracted_fields(stub, staged):
    sent = request("what time does store #77 close on sunday? SECRET-42")
    reply = stub.Stitch(pb.StitchRequest(request=sent), metadata=META, timeout=30)
    assert reply.decision.route == "store_hours"
    assert dict(reply.decision.extracted) == {"store_id": "0077"}
    assert "Harbor Point" in reply.prompt  # the SQL source read store_id from the text
    assert "[code]" in reply.prompt and "SECRET-42" not in reply.prompt
    assert [*TO_POLICY, "stitch"] == stage_names(reply.timings)
    assert {"stitch.sql:stores", "stitch.assemble"} <= {t.stage for t in reply.timings}
    # Metadata the caller sends wins over what was extracted.
    sent = request("what time does store 77 close on sunday", store_id="0112")
    reply = stub.Stitch(pb.StitchRequest(request=sent), metadata=META, timeout=30)
    assert "Riverside Commons" in reply.prompt and "Harbor Point" not in reply.prompt
    (state,) = staged.recorded.of(sent.request_id)
    assert state.rpc == "Stitch" and state.context is not None


def test_the_last_event_and_the_response_wait_for_the_record(stub, staged):
    sent = request("can I return headphones I opened?", slow_record="1")
    events = stub.Orchestrate(pb.OrchestrateRequest(request=sent), metadata=META, timeout=30)
    for event in events:
        if event.WhichOneof("event") == "final":
            final_at = time.monotonic()
    assert staged.recorded.done_at[sent.request_id] <= final_at
    sent = request("where is my order", slow_record="1")
    stub.Route(sent, metadata=META, timeout=20)
    assert staged.recorded.done_at[sent.request_id] <= time.monotonic()


def test_orchestrate_output_guard_rewrites_text_split_over_deltas(stub, staged):
    sent = request("can I return headphones I opened?")
    events = list(stub.Orchestrate(pb.OrchestrateRequest(request=sent), metadata=META, timeout=30))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[:2] == ["decision", "context"] and kinds[-1] == "final"
    answer = "".join(e.delta for e in events if e.WhichOneof("event") == "delta")
    assert "[phrase]" in answer and "I was given" not in answer
    final = events[-1].final
    names = [t.stage for t in final.timings]
    for stage in [*TO_POLICY, "stitch", "generate", "redact_phrase", "block_phrase"]:
        assert stage in names
    (state,) = staged.recorded.of(sent.request_id)
    assert state.outcome == "OK" and state.final is not None
    assert "".join(state.output) == answer


def test_orchestrate_output_guard_blocks_before_release(stub, staged):
    staged.blocker.armed = True
    try:
        sent = request("can I return headphones I opened?")
        events = list(
            stub.Orchestrate(pb.OrchestrateRequest(request=sent), metadata=META, timeout=30)
        )
    finally:
        staged.blocker.armed = False
    assert events[-1].WhichOneof("event") == "error"
    assert events[-1].error.code == "BLOCKED"
    answer = "".join(e.delta for e in events if e.WhichOneof("event") == "delta")
    assert "messages" not in answer
    (state,) = staged.recorded.of(sent.request_id)
    assert state.outcome == "BLOCKED"


def test_orchestrate_validates_before_the_first_event(stub, staged):
    sent = request("can I return headphones I opened?")
    events: list[pb.OrchestrateEvent] = []
    with pytest.raises(grpc.RpcError) as info:
        call = stub.Orchestrate(
            pb.OrchestrateRequest(request=sent, max_tokens=1_000_000), metadata=META, timeout=20
        )
        events.extend(call)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_tokens" in info.value.details()
    assert events == []
    (state,) = staged.recorded.of(sent.request_id)
    assert state.outcome == "INVALID_ARGUMENT"


def test_pipeline_in_process_without_grpc(staged):
    plexus = staged.server.plexus
    caller = Caller("retail", "test", admin=False, apps=None)

    async def route() -> object:
        return await plexus.pipeline.route(caller, RouteQuery("storefront", "order SECRET-42"))

    decision = asyncio.run_coroutine_threadsafe(route(), staged.loop).result(30)
    assert list(decision.timings_us)[: len(TO_POLICY)] == TO_POLICY


# -- the hold-back window ---------------------------------------------------------------------


def split_points(text: str) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(text)), max_size=12).map(sorted)


@settings(max_examples=200, deadline=None)
@given(st.data(), st.text(alphabet="ab xy", max_size=80), st.integers(4, 20))
def test_held_window_releases_the_same_text_however_it_is_split(data, text, window):
    def review(held: str, _final: bool) -> str:
        return held.replace("ab", "[x]")

    cuts = data.draw(split_points(text))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    watch = HeldWindow(window, review)
    released = "".join(watch.feed(p) for p in pieces) + watch.flush()
    assert released == review(text, True)
    assert "ab" not in released


def test_held_window_replaces_the_rest_of_the_answer():
    def review(held: str, final: bool) -> str:
        if "refund" in held:
            raise ReplaceAnswer("A colleague will call you.")
        return held

    watch = HeldWindow(8, review)
    released = [watch.feed(p) for p in ["Hello there, ", "your refu", "nd of $500 ", "is ready"]]
    released.append(watch.flush())
    assert "".join(released) == "Hello there, y" + "A colleague will call you."  # window: 8
    whole = HeldWindow(None, lambda held, final: held.upper() if final else held)
    assert [whole.feed("ab"), whole.feed("cd"), whole.flush()] == ["", "", "ABCD"]
