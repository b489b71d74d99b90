"""Orchestrate over a real server, against a real OpenAI-protocol peer that can misbehave."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from router._generated.plexus.v1 import plexus_pb2 as pb
from router._generated.plexus.v1 import plexus_pb2_grpc as pb_grpc
from router.context.ingest import ingest

from .conftest import DEMO_KEY, KNOWLEDGE, OTHER_TENANT_KEY, RunningServer, context_config
from .openai_peer import Behaviour, OpenAIPeer

DISPUTE = "you charged my card twice for one order and I want my money back"


@pytest.fixture(scope="module")
def peer():
    running = OpenAIPeer()
    yield running
    running.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, peer):
    def big_model_at_the_peer(data: dict) -> None:
        data["tenants"]["retail"]["backends"]["reasoning-large"] = {
            "kind": "openai",
            "url": peer.url,
            "model": "big-model",
            "timeout_seconds": 10,
            "retry": {"attempts": 2, "backoff_ms": 10, "max_backoff_ms": 50},
            "breaker": {"failures": 50, "reset_seconds": 1},
            "price": {"input_per_1k": 3.0, "output_per_1k": 15.0},
        }

    loaded = context_config(tmp_path_factory.mktemp("orchestrate"), big_model_at_the_peer)
    ingest(loaded, "retail", "policies", [KNOWLEDGE / "disputes.txt"])
    running = RunningServer(loaded)
    yield running
    running.stop()


@pytest.fixture()
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.RouterStub(channel)


def orchestrate(stub, text: str, key: str = DEMO_KEY, timeout: float = 20, **metadata):
    request = pb.OrchestrateRequest(
        request=pb.RouteRequest(app="storefront", text=text, metadata=metadata)
    )
    return list(stub.Orchestrate(request, metadata=(("x-api-key", key),), timeout=timeout))


def kinds(events) -> list[str]:
    return [e.WhichOneof("event") for e in events]


def test_streams_decision_context_deltas_final(stub, peer):
    peer.behaviour = Behaviour(text="We will refund the duplicate charge within two days.")
    events = orchestrate(stub, DISPUTE)
    order = kinds(events)
    assert order[:2] == ["decision", "context"] and order[-1] == "final"
    assert set(order[2:-1]) == {"delta"}
    assert events[0].decision.route == "customer_dispute"
    assert events[1].context.pieces and events[1].context.packet.signature
    text = "".join(e.delta for e in events if e.WhichOneof("event") == "delta")
    assert text.split() == peer.behaviour.text.split()
    final = events[-1].final
    assert final.backend == "reasoning-large" and list(final.fallbacks_tried) == []
    body = peer.requests[-1].body
    assert body["model"] == "big-model" and body["stream"] is True
    assert "[1]" in body["messages"][-1]["content"]  # the stitched, cited prompt was sent
    usage = final.usage
    assert usage.completion_tokens == len(peer.behaviour.words())
    assert final.cost == pytest.approx(
        (usage.prompt_tokens * 3.0 + usage.completion_tokens * 15.0) / 1000
    )
    assert {"prep", "route", "policy", "stitch", "stitch.assemble", "generate"} <= {
        t.stage for t in final.timings
    }
    assert final.breakers["reasoning-large"] == "closed"


def test_retryable_failure_is_retried(stub, peer):
    peer.script(Behaviour(status=503), Behaviour(text="second time lucky"))
    events = orchestrate(stub, DISPUTE)
    final = events[-1].final
    assert final.backend == "reasoning-large" and final.attempts == 2


def test_failure_before_tokens_falls_back(stub, peer):
    peer.script(Behaviour(status=500))
    events = orchestrate(stub, DISPUTE)
    final = events[-1].final
    assert final.backend == "policy-medium"
    assert list(final.fallbacks_tried) == ["reasoning-large"]
    text = "".join(e.delta for e in events if e.WhichOneof("event") == "delta")
    assert text.startswith("[local:policy-medium]")


def test_failure_after_tokens_ends_with_an_error_event(stub, peer):
    peer.script(Behaviour(text="one two three four five six", reset_after_chunks=2))
    events = orchestrate(stub, DISPUTE)
    order = kinds(events)
    assert "delta" in order and order[-1] == "error" and "final" not in order
    assert events[-1].error.code == "INTERRUPTED"
    assert events[-1].error.backend == "reasoning-large"


def test_an_oversized_chunk_after_tokens_is_an_error_event(stub, peer):
    peer.script(Behaviour(text="one two three four", big_delta=6_000_000, big_delta_after=2))
    events = orchestrate(stub, DISPUTE)
    assert kinds(events)[-1] == "error" and events[-1].error.code == "INTERRUPTED"
    assert all(len(e.delta) <= 65_536 for e in events if e.WhichOneof("event") == "delta")


def test_an_oversized_chunk_before_tokens_falls_back(stub, peer):
    peer.script(Behaviour(text="one two", big_delta=6_000_000, big_delta_after=0))
    final = orchestrate(stub, DISPUTE)[-1].final
    assert final.backend == "policy-medium"
    assert list(final.fallbacks_tried) == ["reasoning-large"]


def test_deadline_bounds_the_backend_call(stub, peer):
    peer.script(Behaviour(first_byte_delay=5.0))
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        orchestrate(stub, DISPUTE, timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 4.0
    peer.script()
    for _ in range(100):  # the server gave the connection back or closed it
        if peer.open_connections <= 1:
            break
        time.sleep(0.05)
    assert peer.open_connections <= 1


def test_local_backend_route(stub):
    events = orchestrate(stub, "what time does the store close on sunday?", store_id="1432")
    assert events[0].decision.route == "store_hours"
    final = events[-1].final
    assert final.backend == "lookup-small"
    text = "".join(e.delta for e in events if e.WhichOneof("event") == "delta")
    assert "route=store_hours" in text


def test_errors_before_the_stream_are_statuses(stub):
    with pytest.raises(grpc.RpcError) as info:
        orchestrate(stub, "")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    request = pb.OrchestrateRequest(request=pb.RouteRequest(app="buyers", text="pallet price"))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Orchestrate(request, metadata=(("x-api-key", OTHER_TENANT_KEY),), timeout=10))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no backends" in info.value.details()


def test_in_process_orchestrate_and_no_leaked_tasks(server, peer):
    from router.calls import Caller, RouteQuery

    caller = Caller("retail", "test", admin=False, apps=None)

    def on_server_loop(coroutine):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, server.loop).result(30)

    async def tasks() -> int:
        await asyncio.sleep(0.1)
        return len([t for t in asyncio.all_tasks() if t is not asyncio.current_task()])

    async def run(behaviour: Behaviour) -> list:
        peer.script(behaviour)
        return [
            e
            async for e in server.server.plexus.pipeline.orchestrate(
                caller, RouteQuery("storefront", DISPUTE)
            )
        ]

    baseline = on_server_loop(tasks())
    events = on_server_loop(run(Behaviour(text="in process works")))
    assert type(events[-1]).__name__ == "FinalEvent"
    on_server_loop(run(Behaviour(reset_after_chunks=1)))
    on_server_loop(run(Behaviour(status=500)))
    assert on_server_loop(tasks()) <= baseline
