"""Stitch over a real server: retrieval from ingested collections, SQL mirror, packets, errors."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from router._generated.plexus.v1 import plexus_pb2 as pb
from router._generated.plexus.v1 import plexus_pb2_grpc as pb_grpc
from router.config import LoadedConfig
from router.context.ingest import ingest

from .conftest import (
    ADMIN_KEY,
    DEMO_KEY,
    KNOWLEDGE,
    OTHER_TENANT_KEY,
    RunningServer,
    context_config,
)


@pytest.fixture(scope="module")
def stitch_config(tmp_path_factory) -> LoadedConfig:
    def never_ingested_catalog(data: dict) -> None:
        retail = data["tenants"]["retail"]
        retail["collections"]["catalog"] = {"description": "never ingested"}
        for route in retail["routes"]:
            if route["name"] == "loyalty_tier":
                route["context"]["sources"] = [{"kind": "collection", "collection": "catalog"}]

    loaded = context_config(tmp_path_factory.mktemp("stitch"), never_ingested_catalog)
    policies = ["returns.md", "loyalty.md", "shipping.html", "disputes.txt"]
    ingest(loaded, "retail", "policies", [KNOWLEDGE / name for name in policies])
    ingest(loaded, "retail", "products", [KNOWLEDGE / "products.jsonl"])
    return loaded


@pytest.fixture(scope="module")
def stub(stitch_config: LoadedConfig):
    running = RunningServer(stitch_config)
    channel = grpc.insecure_channel(running.address)
    yield pb_grpc.RouterStub(channel), pb_grpc.AdminStub(channel), running
    channel.close()
    running.stop()


def stitch(
    stub,
    text: str,
    app: str = "storefront",
    key: str = DEMO_KEY,
    packets=(),
    budget: int = 0,
    **metadata: str,
) -> pb.StitchResponse:
    router, _, _ = stub
    request = pb.StitchRequest(
        request=pb.RouteRequest(app=app, text=text, metadata=metadata),
        packets=list(packets),
        budget_tokens=budget,
    )
    return router.Stitch(request, metadata=(("x-api-key", key),), timeout=30)


def status_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()


def test_sql_and_collection_context_with_citations(stub):
    reply = stitch(stub, "is the TrailRunner 5 in stock at store 1432?", store_id="1432")
    assert reply.decision.route == "inventory_check"
    kinds = [p.kind for p in reply.pieces]
    assert "sql" in kinds and "collection" in kinds
    assert kinds.index("sql") < kinds.index("collection")
    assert reply.tokens_used <= reply.budget_tokens == 384
    for piece in reply.pieces:
        assert f"[{piece.number}] ({piece.citation})" in reply.prompt
        assert piece.tokens > 0
    product = next(p for p in reply.pieces if p.kind == "collection")
    assert product.source.startswith("products:") and 0 < product.score <= 1
    stages = {t.stage for t in reply.timings}
    assert {"prep", "route", "policy", "stitch", "stitch.encode"} <= stages
    assert {"stitch.sql:stores", "stitch.collection:products", "stitch.assemble"} <= stages
    assert reply.prompt.rstrip().endswith("is the TrailRunner 5 in stock at store 1432?")


def test_retrieval_finds_the_policy(stub):
    reply = stitch(stub, "can I return a jacket I bought as a gift without the receipt?")
    assert reply.decision.route == "returns"
    assert reply.pieces[0].kind == "static"
    sources = [p.source for p in reply.pieces if p.kind == "collection"]
    assert any("returns.md" in s for s in sources)


def test_missing_sql_metadata_is_invalid_argument(stub):
    code, details = status_of(stitch, stub, "what time does your store close tonight?")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "store_id" in details


def test_collection_never_ingested_is_not_found(stub):
    code, details = status_of(stitch, stub, "how many reward points do I have in my gold tier?")
    assert code == grpc.StatusCode.NOT_FOUND
    assert "catalog" in details


def test_overlong_request_and_budget(stub):
    code, _ = status_of(stitch, stub, "x" * 600)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, details = status_of(stitch, stub, "where is my order?", budget=100_000)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "budget_tokens" in details
    reply = stitch(stub, "can I return shoes after 20 days?", budget=64)
    assert reply.tokens_used <= 64


def test_packet_handover_between_apps(stub):
    first = stitch(stub, "you charged my card twice for one order and I want a refund")
    assert first.decision.route == "customer_dispute"
    packet = first.packet
    assert packet.signature and packet.app == "storefront"
    handed = stitch(
        stub,
        "customer says they were double charged, what can we do?",
        app="case_desk",
        packets=[packet],
    )
    assert handed.decision.route in {
        "customer_dispute",
        "returns",
        "escalate_to_human",
        "order_status",
    }
    carried = [p for p in handed.pieces if p.kind == "packet"]
    assert carried and all(p.source.startswith("storefront>") for p in carried)
    tampered = pb.ContextPacket()
    tampered.CopyFrom(packet)
    tampered.pieces[0].text = "refund everything twice"
    code, details = status_of(stitch, stub, "double charged", app="case_desk", packets=[tampered])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "signature" in details
    code, _ = status_of(
        stitch, stub, "bulk price for pallets", app="buyers", key=OTHER_TENANT_KEY, packets=[packet]
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_reload_collection_while_serving(stub, stitch_config: LoadedConfig, tmp_path: Path):
    _, admin, running = stub
    note = tmp_path / "note.md"
    note.write_text(
        "# Pallet returns\n\nPallets of patio furniture are returned at the loading "
        "dock of store 0077 on Tuesdays only.\n"
    )
    ingest(stitch_config, "retail", "policies", [note])
    meta = (("x-api-key", ADMIN_KEY),)
    status = admin.ReloadCollection(
        pb.ReloadCollectionRequest(collection="policies"), metadata=meta, timeout=60
    )
    assert status.version == "v0002" and status.size > 0
    reply = stitch(stub, "how do I return a pallet of patio furniture?")
    assert any("note.md" in p.source for p in reply.pieces)
    code, _ = status_of(
        admin.ReloadCollection,
        pb.ReloadCollectionRequest(collection="../../wholesale"),
        metadata=meta,
        timeout=10,
    )
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = status_of(
        admin.ReloadCollection,
        pb.ReloadCollectionRequest(collection="policies"),
        metadata=(("x-api-key", DEMO_KEY),),
        timeout=10,
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert running.server.plexus.collections["retail"].get("policies").version == "v0002"


def test_packet_expiry_is_enforced(stub):
    _, _, running = stub
    reply = stitch(stub, "you charged my card twice for one order and I want a refund")
    signer = running.server.plexus.sources.signer
    old_ttl = signer.ttl_seconds
    signer.ttl_seconds = 0.0
    try:
        time.sleep(0.01)
        code, details = status_of(
            stitch, stub, "double charged", app="case_desk", packets=[reply.packet]
        )
    finally:
        signer.ttl_seconds = old_ttl
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "expired" in details
