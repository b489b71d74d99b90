"""The gRPC service on a real server on an ephemeral port: decisions, errors, health."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from router._generated.plexus.v1 import plexus_pb2 as pb
from router._generated.plexus.v1 import plexus_pb2_grpc as pb_grpc

from .conftest import ADMIN_KEY, DEMO_KEY, OPS_ONLY_KEY, OTHER_TENANT_KEY

ROUTES = {
    "inventory_check",
    "order_status",
    "store_hours",
    "returns",
    "product_question",
    "loyalty_tier",
    "customer_dispute",
    "escalate_to_human",
}


def key(api_key: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", api_key),)


def route(
    channel: grpc.Channel, text: str, app: str = "storefront", api_key: str = DEMO_KEY, **kwargs
) -> pb.RouteDecision:
    stub = pb_grpc.RouterStub(channel)
    return stub.Route(
        pb.RouteRequest(app=app, text=text, **kwargs), metadata=key(api_key), timeout=10
    )


def assert_status(code: grpc.StatusCode, call, *args, **kwargs) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    assert info.value.code() == code, info.value.details()
    details = info.value.details()
    assert "Traceback" not in details
    return details


def test_route_returns_a_full_decision(channel):
    decision = route(
        channel,
        "is the blue hoodie in size M in stock at store 1432?",
        metadata={"store_id": "1432"},
        user_tier="gold",
        request_id="r-1",
    )
    assert decision.route in ROUTES
    assert decision.target
    assert 0.0 <= decision.confidence <= 1.0
    assert decision.model_version.startswith("v")
    assert decision.request_id == "r-1"
    assert [t.stage for t in decision.timings] == [
        "prep",
        "pii",
        "injection",
        "route",
        "app_rules",
        "policy",
    ]
    assert decision.server_micros == sum(t.micros for t in decision.timings)
    assert decision.server_micros >= 0
    alternatives = [a.route for a in decision.alternatives]
    assert 1 <= len(alternatives) <= 3
    assert len(set(alternatives)) == len(alternatives)
    if not decision.abstained:
        assert decision.route == alternatives[0]


def test_clear_cases_route_where_expected(channel):
    assert (
        route(channel, "where is my order, the tracking number has not moved in days").route
        == "order_status"
    )
    assert route(channel, "what time does the store open on sunday?").route == "store_hours"


def test_out_of_scope_abstains_to_the_fallback(channel):
    decision = route(channel, "what is the capital of australia and how far is it from tokyo")
    assert decision.abstained and decision.fallback_used
    assert decision.route == "escalate_to_human"
    assert decision.target == "human-queue"


def test_app_route_restrictions(channel):
    decision = route(
        channel,
        "I want to dispute a double charge on my card",
        app="store_ops",
        api_key=OPS_ONLY_KEY,
    )
    assert decision.route in {
        "inventory_check",
        "store_hours",
        "product_question",
        "escalate_to_human",
    }
    assert {a.route for a in decision.alternatives} <= {
        "inventory_check",
        "store_hours",
        "product_question",
        "escalate_to_human",
    }


def test_unauthenticated(channel):
    stub = pb_grpc.RouterStub(channel)
    request = pb.RouteRequest(app="storefront", text="hello")
    assert_status(grpc.StatusCode.UNAUTHENTICATED, stub.Route, request, timeout=5)
    assert_status(
        grpc.StatusCode.UNAUTHENTICATED, stub.Route, request, metadata=key("wrong"), timeout=5
    )
    bearer = (("authorization", f"Bearer {DEMO_KEY}"),)
    assert stub.Route(request, metadata=bearer, timeout=5).route


def test_permission_denied(channel):
    assert_status(
        grpc.StatusCode.PERMISSION_DENIED,
        route,
        channel,
        "hi",
        app="storefront",
        api_key=OPS_ONLY_KEY,
    )
    admin = pb_grpc.AdminStub(channel)
    assert_status(
        grpc.StatusCode.PERMISSION_DENIED,
        admin.ListModels,
        pb.ListModelsRequest(),
        metadata=key(DEMO_KEY),
        timeout=5,
    )


def test_invalid_argument(channel, server):
    assert "empty" in assert_status(grpc.StatusCode.INVALID_ARGUMENT, route, channel, "")
    assert_status(grpc.StatusCode.INVALID_ARGUMENT, route, channel, "   \n ")
    details = assert_status(grpc.StatusCode.INVALID_ARGUMENT, route, channel, "x" * 501)
    assert "500" in details
    raw = channel.unary_unary(
        "/plexus.v1.Router/Route", response_deserializer=pb.RouteDecision.FromString
    )
    # field 1 (app) = "storefront", field 2 (text) = invalid UTF-8
    bad_utf8 = b"\x0a\x0astorefront" + b"\x12\x03\xff\xfe\xfd"
    details = assert_status(
        grpc.StatusCode.INVALID_ARGUMENT, raw, bad_utf8, metadata=key(DEMO_KEY), timeout=5
    )
    assert "UTF-8" in details
    assert_status(
        grpc.StatusCode.INVALID_ARGUMENT, raw, b"\xff\xff\xff", metadata=key(DEMO_KEY), timeout=5
    )


def test_unknown_app_is_not_found(channel):
    assert "no app" in assert_status(
        grpc.StatusCode.NOT_FOUND, route, channel, "hello", app="kiosk"
    )


def test_tenants_are_isolated(channel):
    # the wholesale key sees only the wholesale tenant: the retail app does not exist for it
    assert_status(
        grpc.StatusCode.NOT_FOUND,
        route,
        channel,
        "where is my order",
        app="storefront",
        api_key=OTHER_TENANT_KEY,
    )
    # wholesale serves the accurate family: its decisions run off the event loop
    decision = route(channel, "bulk price for pallets", app="buyers", api_key=OTHER_TENANT_KEY)
    assert decision.route in {"pricing", "other"}
    assert decision.model_version == "v0001"


def test_server_keeps_serving_after_errors(channel):
    for _ in range(20):
        with pytest.raises(grpc.RpcError):
            route(channel, "")
    assert route(channel, "where is my order").route


def test_batch_and_stream(channel):
    stub = pb_grpc.RouterStub(channel)
    texts = ["where is my order", "when do you close", "return a jacket", "points balance"]
    batch = stub.RouteBatch(
        pb.RouteBatchRequest(requests=[pb.RouteRequest(app="storefront", text=t) for t in texts]),
        metadata=key(DEMO_KEY),
        timeout=10,
    )
    assert len(batch.decisions) == 4
    singles = [route(channel, t) for t in texts]
    assert [d.route for d in batch.decisions] == [d.route for d in singles]
    streamed = list(
        stub.RouteStream(
            iter(
                [
                    pb.RouteRequest(app="storefront", text=t, request_id=str(i))
                    for i, t in enumerate(texts)
                ]
            ),
            metadata=key(DEMO_KEY),
            timeout=10,
        )
    )
    assert [d.request_id for d in streamed] == ["0", "1", "2", "3"]
    assert [d.route for d in streamed] == [d.route for d in singles]
    assert_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.RouteBatch,
        pb.RouteBatchRequest(),
        metadata=key(DEMO_KEY),
        timeout=5,
    )


def test_stream_error_mid_stream_has_a_status(channel):
    stub = pb_grpc.RouterStub(channel)
    requests = [
        pb.RouteRequest(app="storefront", text="where is my order"),
        pb.RouteRequest(app="storefront", text=""),
    ]
    responses = stub.RouteStream(iter(requests), metadata=key(DEMO_KEY), timeout=10)
    assert next(responses).route
    with pytest.raises(grpc.RpcError) as info:
        next(responses)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_deadline_is_honoured(channel):
    stub = pb_grpc.RouterStub(channel)

    def slow_requests():
        yield pb.RouteRequest(app="storefront", text="where is my order")
        time.sleep(3)

    started = time.monotonic()
    responses = stub.RouteStream(slow_requests(), metadata=key(DEMO_KEY), timeout=0.5)
    assert next(responses).route
    with pytest.raises(grpc.RpcError) as info:
        next(responses)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.5


def test_oversized_message_is_refused(channel, server):
    limit = server.server.config.max_message_bytes
    assert_status(grpc.StatusCode.RESOURCE_EXHAUSTED, route, channel, "x" * (limit + 10))


def test_health_checking(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ["", "plexus.v1.Router", "plexus.v1.Admin"]:
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"plexus.v1.Router", "plexus.v1.Admin", "grpc.health.v1.Health"} <= names


def test_admin_lists_models(channel):
    admin = pb_grpc.AdminStub(channel)
    reply = admin.ListModels(pb.ListModelsRequest(), metadata=key(ADMIN_KEY), timeout=10)
    versions = [m.version for m in reply.models]
    assert versions[:2] == ["v0001", "v0002"]
    assert sum(m.active for m in reply.models) == 1
    assert all(m.family == "fast" and len(m.training_data_sha256) == 64 for m in reply.models)
    assert "inscope_accuracy" in reply.models[0].metrics
