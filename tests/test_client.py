"""The Python client (router.client) against a real server on an ephemeral port: every RPC,
typed results, one error class, the asyncio variant, TLS and mutual TLS, and a light import."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from router import cli
from router.client import (
    AsyncPlexusClient,
    CollectionStatus,
    ContextEvent,
    Decision,
    DecisionEvent,
    DeltaEvent,
    FinalEvent,
    ModelStatus,
    Piece,
    PlexusClient,
    PlexusClientError,
    Request,
    Stitched,
)
from router.config import LoadedConfig
from router.context.ingest import ingest

from .conftest import ADMIN_KEY, DEMO_KEY, KNOWLEDGE, OTHER_TENANT_KEY, RunningServer
from .conftest import context_config as make_context_config
from .test_cli import run_cli
from .test_tls import pki, tls_config  # noqa: F401 (pki is a fixture used here)

POLICIES = sorted(p for p in KNOWLEDGE.iterdir() if p.suffix != ".jsonl")


@pytest.fixture(scope="module")
def context(tmp_path_factory) -> Iterator[tuple[RunningServer, LoadedConfig]]:
    loaded = make_context_config(tmp_path_factory.mktemp("client"))
    ingest(loaded, "retail", "policies", POLICIES)
    ingest(loaded, "retail", "products", sorted(KNOWLEDGE.glob("*.jsonl")))
    running = RunningServer(loaded)
    yield running, loaded
    running.stop()


@pytest.fixture()
def client(context) -> Iterator[PlexusClient]:
    with PlexusClient(context[0].address, DEMO_KEY) as connected:
        yield connected


def test_importing_the_client_loads_no_serving_or_training_library():
    heavy = ["numpy", "onnxruntime", "faiss", "sklearn", "scipy", "tokenizers", "pydantic"]
    code = f"import sys, router.client; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


def test_route_batch_and_stream_return_typed_decisions(client: PlexusClient):
    decision = client.route(
        "storefront", "is store #77 open on sunday?", {"channel": "web"}, "gold", request_id="r-7"
    )
    assert isinstance(decision, Decision)
    assert decision.route == "store_hours" and decision.request_id == "r-7"
    assert decision.extracted == {"store_id": "0077"}
    assert 0 < decision.confidence <= 1 and decision.model_version == "v0001"
    assert decision.alternatives and decision.alternatives[0].route == decision.route
    assert {"prep", "route", "policy"} <= set(decision.timings)
    assert decision.server_micros > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.route = "other"  # type: ignore[misc]
    texts = ["where is my order 88123", "you charged me twice", "talk to a human"]
    batch = client.route_batch([Request("storefront", t) for t in texts])
    assert [d.route for d in batch] == ["order_status", "customer_dispute", "escalate_to_human"]
    streamed = list(client.route_stream(Request("storefront", t) for t in texts))
    assert [d.route for d in streamed] == [d.route for d in batch]


def test_stitch_hands_a_packet_to_another_app(client: PlexusClient):
    first = client.stitch("storefront", "you charged my card twice for order 88123")
    assert isinstance(first, Stitched) and isinstance(first.pieces[0], Piece)
    assert first.decision.route == "customer_dispute"
    assert first.prompt and first.tokens_used <= first.budget_tokens
    assert all(p.citation and p.number for p in first.pieces)
    assert first.packet.signature
    second = client.stitch(
        "case_desk", "customer reports a double charge, next steps?", packets=[first.packet]
    )
    assert any(p.source.startswith("storefront>") for p in second.pieces)


def test_orchestrate_streams_typed_events(client: PlexusClient):
    events = list(client.orchestrate("storefront", "can I return headphones I opened?"))
    assert isinstance(events[0], DecisionEvent) and isinstance(events[1], ContextEvent)
    assert isinstance(events[-1], FinalEvent)
    deltas = events[2:-1]
    assert deltas and all(isinstance(e, DeltaEvent) for e in deltas)
    assert "route=returns" in "".join(e.text for e in deltas)
    final = events[-1]
    assert final.backend == "policy-medium" and final.usage.completion_tokens > 0
    assert final.cost > 0 and "generate" in final.timings


def test_errors_are_one_class_with_the_status_name(context, client: PlexusClient):
    running, _ = context
    wrong = PlexusClient(running.address, "wrong")
    other_tenant = PlexusClient(running.address, OTHER_TENANT_KEY)
    down = PlexusClient("127.0.0.1:1", DEMO_KEY)
    cases = [
        (lambda: client.route("nope", "hello"), "NOT_FOUND"),
        (lambda: client.route("storefront", ""), "INVALID_ARGUMENT"),
        (lambda: client.list_models(), "PERMISSION_DENIED"),
        (lambda: list(client.orchestrate("nope", "hello")), "NOT_FOUND"),
        (lambda: wrong.route("storefront", "hi"), "UNAUTHENTICATED"),
        (lambda: other_tenant.route("storefront", "hi"), "NOT_FOUND"),
        (lambda: down.route("storefront", "hi"), "UNAVAILABLE"),
    ]
    for call, code in cases:
        with pytest.raises(PlexusClientError) as info:
            call()
        assert info.value.code == code, info.value
        assert "Traceback" not in info.value.message
    for opened in (wrong, other_tenant, down):
        opened.close()


def test_admin_models_and_collection_reload(context, capsys):
    running, loaded = context
    with PlexusClient(running.address, ADMIN_KEY) as admin:
        models = admin.list_models()
        assert [(m.version, m.active) for m in models] == [("v0001", True)]
        status = admin.load_model("v0001")
        assert isinstance(status, ModelStatus) and status.active_version == "v0001"
        assert admin.rollback().active_version == "v0001"
        with pytest.raises(PlexusClientError) as info:
            admin.rollback()  # nothing left to restore
        assert info.value.code == "FAILED_PRECONDITION"
        with pytest.raises(PlexusClientError) as info:
            admin.load_model("v0042")
        assert info.value.code == "NOT_FOUND"
        with pytest.raises(PlexusClientError) as info:
            admin.reload_collection("nope")
        assert info.value.code == "NOT_FOUND"

        before = admin.reload_collection("policies")
        assert isinstance(before, CollectionStatus) and before.version == "v0001"
        changed = Path(loaded.base_dir) / "gift-cards.md"
        changed.write_text("# Gift cards\n\nGift cards never expire and work in every store.")
        assert ingest(loaded, "retail", "policies", [changed]).version == "v0002"
        after = admin.reload_collection("policies")
        assert (after.collection, after.version, after.size) == (
            "policies",
            "v0002",
            before.size + 1,
        )
    # the same through the command
    argv = ["collections", "reload", "policies", "--remote", running.address]
    code, out, _ = run_cli(capsys, *argv, "--api-key", ADMIN_KEY)
    assert code == 0 and json.loads(out)["version"] == "v0002"


async def test_the_asyncio_client_speaks_every_rpc(context):
    running, _ = context

    async def requests() -> AsyncIterator[Request]:
        for text in ["where is my order 88123", "talk to a human"]:
            yield Request("storefront", text)

    async with AsyncPlexusClient(running.address, DEMO_KEY) as client:
        decision = await client.route("storefront", "is store #77 open on sunday?")
        assert decision.route == "store_hours" and decision.extracted == {"store_id": "0077"}
        batch = await client.route_batch([Request("storefront", "you charged me twice")])
        assert [d.route for d in batch] == ["customer_dispute"]
        streamed = [d.route async for d in client.route_stream(requests())]
        assert streamed == ["order_status", "escalate_to_human"]
        stitched = await client.stitch("storefront", "can I return a jacket I got as a gift?")
        assert stitched.decision.route == "returns" and stitched.pieces
        events = [e async for e in client.orchestrate("storefront", "can I return headphones?")]
        assert isinstance(events[0], DecisionEvent) and isinstance(events[-1], FinalEvent)
        with pytest.raises(PlexusClientError) as info:
            await client.route("nope", "hello")
        assert info.value.code == "NOT_FOUND"
        with pytest.raises(PlexusClientError) as info:
            [e async for e in client.orchestrate("storefront", "")]
        assert info.value.code == "INVALID_ARGUMENT"
    async with AsyncPlexusClient(running.address, ADMIN_KEY) as admin:
        assert [m.version for m in await admin.list_models()] == ["v0001"]
        assert (await admin.load_model("v0001", force=True)).active_version == "v0001"
        assert (await admin.rollback()).active_version == "v0001"
        assert (await admin.reload_collection("products")).size > 0


async def test_tls_and_mutual_tls(
    trained_config: LoadedConfig,
    tmp_path: Path,
    pki: dict[str, Path],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
):
    tls = {"cert": str(pki["server"]), "key": str(pki["server-key"]), "client_ca": str(pki["ca"])}
    running = RunningServer(tls_config(trained_config, tmp_path, tls))
    try:
        with PlexusClient(
            running.address,
            DEMO_KEY,
            root_certificates=pki["ca"],
            certificate_chain=pki["client"],
            private_key=pki["client-key"].read_bytes(),
        ) as client:
            assert client.route("storefront", "where is my order").route == "order_status"
        async with AsyncPlexusClient(
            running.address,
            DEMO_KEY,
            root_certificates=pki["ca"].read_bytes(),
            certificate_chain=pki["client"],
            private_key=pki["client-key"],
        ) as aclient:
            assert (await aclient.route("storefront", "where is my order")).route
        for client_pem in (None, "stranger"):  # no client certificate, or a stranger's
            with (
                PlexusClient(
                    running.address,
                    DEMO_KEY,
                    root_certificates=pki["ca"],
                    certificate_chain=pki[client_pem] if client_pem else None,
                    private_key=pki[f"{client_pem}-key"] if client_pem else None,
                    timeout=5,
                ) as client,
                pytest.raises(PlexusClientError) as info,
            ):
                client.route("storefront", "where is my order")
            assert info.value.code == "UNAVAILABLE"
        with pytest.raises(PlexusClientError) as info:
            PlexusClient(running.address, DEMO_KEY, certificate_chain=pki["client"])
        assert info.value.code == "INVALID_ARGUMENT" and "private_key" in info.value.message
        # the command's TLS flags
        argv = ["route", "--remote", running.address, "--api-key", DEMO_KEY, "--app", "storefront"]
        mtls = [
            "--ca",
            str(pki["ca"]),
            "--cert",
            str(pki["client"]),
            "--key",
            str(pki["client-key"]),
        ]
        code, out, _ = run_cli(capsys, *argv, "--text", "where is my order", *mtls)
        assert code == 0 and json.loads(out)["route"] == "order_status"
        code, _, err = run_cli(capsys, *argv, "--text", "where is my order", "--ca", str(pki["ca"]))
        assert code == cli.EXIT_UNAVAILABLE and "no Plexus server answers" in err
    finally:
        running.stop()
