"""Rate limits and budgets over a real server, on the in-process store and on a real Redis.

The backend is the real OpenAI-protocol peer, slowed down so that every call of a burst holds
its reservation at the same time: the budget, not the timing, decides who is admitted.
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import yaml

from router._generated.plexus.v1 import plexus_pb2 as pb
from router._generated.plexus.v1 import plexus_pb2_grpc as pb_grpc
from router.context.ingest import ingest
from router.stages.budget import prompt_token_estimate

from .conftest import ADMIN_KEY, DEMO_KEY, KNOWLEDGE, RunningServer, context_config
from .openai_peer import Behaviour, OpenAIPeer
from .redis_server import RedisServer, require_redis_server

DISPUTE = "you charged my card twice for one order and I want my money back"
MAX_TOKENS = 8
# The budgets are sized in calls once the prompt's estimate is known (see ``per_call``).
ONE_CALL_BUDGET_CALLS = 1.5
FIVE_CALL_BUDGET_CALLS = 5.5


@pytest.fixture(scope="module")
def peer():
    running = OpenAIPeer()
    yield running
    running.close()


@pytest.fixture(scope="module", params=["memory", "redis"])
def store_kind(request):
    if request.param == "memory":
        yield "memory", None
        return
    require_redis_server()
    redis = RedisServer()
    redis.start()
    yield "redis", redis
    redis.close()


def limits_config(peer: OpenAIPeer, kind: str, redis: RedisServer | None, per_call: int):
    def adjust(data: dict) -> None:
        if redis is not None:
            data["server"]["state"] = {"kind": "redis", "url": redis.url, "timeout_ms": 300}
        retail = data["tenants"]["retail"]
        retail["apps"]["claims"] = {"routes": ["customer_dispute", "escalate_to_human"]}
        retail["backends"]["reasoning-large"] = {
            "kind": "openai",
            "url": peer.url,
            "model": "big-model",
            "max_concurrency": 128,
            "retry": {"attempts": 1},
            "breaker": {"failures": 1000, "reset_seconds": 1},
            "price": {"input_per_1k": 3.0, "output_per_1k": 15.0},
        }
        retail["policy"] = {
            "rules": [],
            "rate_limits": [
                {
                    "name": "per-user-requests",
                    "per": "user",
                    "apps": ["store_ops"],
                    "requests": {"rate": 3, "per_seconds": 3600, "burst": 3},
                }
            ],
            "budgets": [
                {
                    "name": "one-call",
                    "per": "user",
                    "period": "day",
                    "apps": ["storefront"],
                    "tokens": int(per_call * ONE_CALL_BUDGET_CALLS),
                },
                {
                    "name": "five-calls",
                    "per": "user",
                    "period": "month",
                    "apps": ["case_desk"],
                    "tokens": int(per_call * FIVE_CALL_BUDGET_CALLS),
                },
                {
                    "name": "roomy",
                    "per": "user",
                    "period": "day",
                    "apps": ["claims"],
                    "tokens": per_call * 100,
                },
                {"name": "spend", "per": "tenant", "period": "day", "cost": 10_000.0},
            ],
            "user_field": "user",
            "on_state_error": "fail_closed",
        }

    return adjust


@pytest.fixture(scope="module")
def served(tmp_path_factory, peer, store_kind):
    kind, redis = store_kind
    root = tmp_path_factory.mktemp(f"limits-{kind}")
    loaded = context_config(root, limits_config(peer, kind, redis, per_call=10**9))
    ingest(loaded, "retail", "policies", [KNOWLEDGE / "disputes.txt"])
    running = RunningServer(loaded)
    # The prompt a dispute sends tells what a call reserves; the budgets are sized in calls,
    # and swapped in by a reload.
    with grpc.insecure_channel(running.address) as channel:
        reply = pb_grpc.RouterStub(channel).Stitch(
            pb.StitchRequest(request=pb.RouteRequest(app="case_desk", text=DISPUTE)),
            metadata=(("x-api-key", DEMO_KEY),),
            timeout=30,
        )
        per_call = prompt_token_estimate(reply.prompt) + MAX_TOKENS
        data = yaml.safe_load(loaded.path.read_text())
        limits_config(peer, kind, redis, per_call)(data)
        loaded.path.write_text(yaml.safe_dump(data))
        pb_grpc.AdminStub(channel).ReloadConfig(
            pb.ReloadConfigRequest(), metadata=(("x-api-key", ADMIN_KEY),), timeout=60
        )
    yield running, redis, per_call
    running.stop()


@pytest.fixture()
def channel(served):
    with grpc.insecure_channel(served[0].address) as channel:
        yield channel


def orchestrate(channel, app: str, user: str, cancel_after: int | None = None):  # type: ignore[no-untyped-def]
    """The events, or the RpcError; with ``cancel_after``, cancel after that many deltas."""
    request = pb.OrchestrateRequest(
        request=pb.RouteRequest(
            app=app, text=DISPUTE, metadata={"user": user}, request_id=uuid.uuid4().hex
        ),
        max_tokens=MAX_TOKENS,
    )
    call = pb_grpc.RouterStub(channel).Orchestrate(
        request, metadata=(("x-api-key", DEMO_KEY),), timeout=60
    )
    events = []
    try:
        for event in call:
            events.append(event)
            deltas = sum(1 for e in events if e.WhichOneof("event") == "delta")
            if cancel_after is not None and deltas >= cancel_after:
                call.cancel()
                return events
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED and cancel_after is not None:
            return events
        return exc
    return events


def usage(channel, user: str) -> dict[str, pb.BudgetUsage]:
    reply = pb_grpc.AdminStub(channel).GetUsage(
        pb.GetUsageRequest(user=user), metadata=(("x-api-key", ADMIN_KEY),), timeout=10
    )
    return {f"{b.budget}:{b.unit}:{b.scope}": b for b in reply.budgets}


def used_tokens(events) -> int:  # type: ignore[no-untyped-def]
    final = events[-1].final
    return final.usage.prompt_tokens + final.usage.completion_tokens


def burst(channel, n: int, app: str, user: str):  # type: ignore[no-untyped-def]
    start = threading.Barrier(n)

    def one(_: int):  # type: ignore[no-untyped-def]
        start.wait()
        return orchestrate(channel, app, user)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_concurrent_calls_admit_exactly_what_the_budget_fits(channel, peer):
    user = uuid.uuid4().hex
    peer.behaviour = Behaviour(text="a b c d e f g h i j", first_byte_delay=3.0)
    try:
        results = burst(channel, 64, "case_desk", user)
    finally:
        peer.behaviour = Behaviour()
    answered = [r for r in results if isinstance(r, list)]
    refused = [r for r in results if isinstance(r, grpc.RpcError)]
    assert len(answered) == 5 and len(refused) == 59
    assert {r.code() for r in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert "five-calls" in refused[0].details()
    assert all(r[-1].WhichOneof("event") == "final" for r in answered)
    counters = usage(channel, user)["five-calls:tokens:" + user]
    assert counters.reserved == 0
    assert counters.used == sum(used_tokens(r) for r in answered)
    assert counters.remaining == counters.limit - counters.used


def test_simultaneous_first_calls_of_a_new_user_admit_one(channel, peer):
    user = uuid.uuid4().hex
    peer.behaviour = Behaviour(first_byte_delay=2.0)
    try:
        results = burst(channel, 10, "storefront", user)
    finally:
        peer.behaviour = Behaviour()
    assert sum(isinstance(r, list) for r in results) == 1
    counters = usage(channel, user)["one-call:tokens:" + user]
    assert counters.reserved == 0 and counters.used > 0


def test_failures_and_cancellations_settle_what_was_used(channel, peer, served):
    _, _, per_call = served
    user = uuid.uuid4().hex
    plans = ["ok", "fail-before", "cut-off", "cancel", "ok", "fail-before", "cancel", "ok"]
    expected = 0
    for plan in plans:
        if plan == "fail-before":  # the large model fails; the medium one answers
            peer.script(Behaviour(status=503))
        elif plan == "cut-off":
            peer.script(Behaviour(text="one two three four five six", reset_after_chunks=3))
        elif plan == "cancel":
            peer.script(Behaviour(text="one two three four five six", chunk_delay=0.3))
        events = orchestrate(channel, "claims", user, 1 if plan == "cancel" else None)
        assert isinstance(events, list)
        last = events[-1].WhichOneof("event")
        if plan in ("ok", "fail-before"):
            assert last == "final"
            expected += used_tokens(events)
        elif plan == "cut-off":
            assert last == "error" and events[-1].error.code == "INTERRUPTED"
            words = sum(len(e.delta.split()) for e in events if e.WhichOneof("event") == "delta")
            expected += per_call - MAX_TOKENS + words  # the prompt's estimate and what was sent
    counters = usage(channel, user)["roomy:tokens:" + user]
    for _ in range(100):  # a cancelled call settles on the server after the client has left
        if counters.reserved == 0:
            break
        threading.Event().wait(0.05)
        counters = usage(channel, user)["roomy:tokens:" + user]
    assert counters.reserved == 0
    # A cancelled call counts its prompt and the words released before the cancel arrived.
    cancelled = counters.used - expected
    assert 2 * (per_call - MAX_TOKENS) <= cancelled <= 2 * (per_call - MAX_TOKENS + 6)


def test_over_the_rate_limit_is_resource_exhausted_with_retry_after(channel):
    stub = pb_grpc.RouterStub(channel)
    user = uuid.uuid4().hex
    key = (("x-api-key", DEMO_KEY),)

    def route(who: str):  # type: ignore[no-untyped-def]
        request = pb.RouteRequest(
            app="store_ops", text="is the blue kettle in stock", metadata={"user": who}
        )
        return stub.Route(request, metadata=key, timeout=10)

    for _ in range(3):
        route(user)
    with pytest.raises(grpc.RpcError) as info:
        route(user)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "per-user-requests" in info.value.details()
    trailing = dict(info.value.trailing_metadata())
    assert 1190 <= int(trailing["retry-after"]) <= 1200  # one request per 1200 s
    assert 0 < int(trailing["retry-after-ms"]) <= 1_200_000
    route(uuid.uuid4().hex)  # another user is not held back
    # other apps are not limited by it
    stub.Route(
        pb.RouteRequest(app="storefront", text="hi", metadata={"user": user}),
        metadata=key,
        timeout=10,
    )


def test_an_unreachable_store_fails_closed_then_recovers(channel, served):
    _, redis, _ = served
    if redis is None:
        pytest.skip("the in-process store is always reachable")
    stub = pb_grpc.RouterStub(channel)
    request = pb.RouteRequest(
        app="store_ops", text="is the blue kettle in stock", metadata={"user": uuid.uuid4().hex}
    )
    key = (("x-api-key", DEMO_KEY),)
    redis.stop()
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.Route(request, metadata=key, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "cannot be checked" in info.value.details()
    finally:
        redis.start()
    for _ in range(50):  # the client reconnects by itself
        try:
            stub.Route(request, metadata=key, timeout=10)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            threading.Event().wait(0.1)
    else:
        pytest.fail("the store did not recover after Redis came back")


def test_plexus_usage_prints_the_windows(served, capsys):
    running, redis, _ = served
    from router.cli import main

    user = uuid.uuid4().hex
    with grpc.insecure_channel(running.address) as channel:
        assert isinstance(orchestrate(channel, "claims", user), list)
    argv = ["usage", "--remote", running.address, "--api-key", ADMIN_KEY, "--user", user]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    roomy = next(line for line in lines if line.startswith("roomy"))
    assert f"user={user}"[:20] in roomy and roomy.endswith("tokens")
    assert any(line.startswith("spend") and line.endswith("cost") for line in lines)
    config = str(running.server.loaded.path)
    if redis is None:  # the counters live inside the server
        assert main(["usage", config, "--tenant", "retail"]) == 2
        assert "--remote" in capsys.readouterr().err
    else:  # straight from the shared store
        assert main(["usage", config, "--tenant", "retail", "--user", user]) == 0
        assert roomy in capsys.readouterr().out.splitlines()
