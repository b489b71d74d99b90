"""The retail demo: train the routing model, build the context sources, serve, and call it."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from pathlib import Path

from router.client import PlexusClient
from router.config import LoadedConfig
from router.context.ingest import ingest
from router.routing.tenant_training import train_tenant
from router.server.app import PlexusServer

DEMO_KEY = "retail-demo-key"
ROUTE_CALLS = [
    ("storefront", "is the 65 inch QLED tv in stock at store 1432?", {"store_id": "1432"}),
    ("storefront", "you charged my card twice for the same order and I want it fixed", {}),
    ("storefront", "when does the Elm Street store close on sunday", {"store_id": "1432"}),
    ("storefront", "what's a good recipe for banana bread", {}),
    ("store_ops", "how many gold tier points do I have", {}),
]


def _say(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def prepare(loaded: LoadedConfig) -> None:
    """Train the model, load the SQL mirror and ingest the knowledge base."""
    root = loaded.base_dir
    print("== training the retail routing model", flush=True)
    result = train_tenant(loaded, "retail", progress=_say)
    metrics = result.trained.card.metrics
    print(
        f"   {result.version}: held-out in-scope accuracy {metrics['inscope_accuracy']:.3f}, "
        f"out-of-scope recall {metrics.get('oos_recall', float('nan')):.3f}, "
        f"threshold {result.trained.card.threshold:.2f}"
    )
    database = loaded.data_dir / "stores.db"
    print(f"== loading the store mirror into {database}", flush=True)
    database.parent.mkdir(parents=True, exist_ok=True)
    database.unlink(missing_ok=True)
    with sqlite3.connect(database) as connection:
        connection.executescript((root / "stores.sql").read_text(encoding="utf-8"))
    knowledge = root / "knowledge"
    for collection, paths in [
        ("policies", sorted(p for p in knowledge.iterdir() if p.suffix != ".jsonl")),
        ("products", sorted(knowledge.glob("*.jsonl"))),
    ]:
        report = ingest(loaded, "retail", collection, paths, progress=_say)
        print(
            f"== collection {collection}: {report.total_chunks} chunks, version {report.version}",
            flush=True,
        )


def _calls(address: str) -> None:
    with PlexusClient(address, DEMO_KEY) as client:
        print("== Route: decisions only", flush=True)
        for app, text, meta in ROUTE_CALLS:
            d = client.route(app, text, meta)
            flag = " (abstained -> fallback)" if d.abstained else ""
            print(
                f"   [{app}] {text!r}\n      -> {d.route} @ {d.target}, confidence "
                f"{d.confidence:.2f}{flag}, model {d.model_version}, "
                f"{d.server_micros} us server-side"
            )
        print("== Stitch: the decision plus a cited prompt", flush=True)
        reply = client.stitch("storefront", "can I return a jacket I got as a gift?")
        _show(reply)
        print("== Stitch: the store number lifted out of the text feeds the SQL mirror", flush=True)
        _show(client.stitch("storefront", "what time does store #77 close on sunday?"))
        print("== Handing a case from storefront to case_desk with a context packet", flush=True)
        first = client.stitch("storefront", "you charged my card twice for order 88123")
        second = client.stitch(
            "case_desk", "customer reports a double charge, next steps?", packets=[first.packet]
        )
        _show(second)
        print("== Orchestrate: route, stitch, generate (local backend) and stream", flush=True)
        for event in client.orchestrate("storefront", "can I return headphones I opened?"):
            kind = event.WhichOneof("event")
            if kind == "decision":
                print(f"   decision: {event.decision.route} -> {event.decision.target}")
            elif kind == "context":
                print(
                    f"   context: {len(event.context.pieces)} cited pieces, "
                    f"{event.context.tokens_used} tokens"
                )
            elif kind == "delta":
                print(event.delta, end="", flush=True)
            elif kind == "final":
                final = event.final
                print(
                    f"\n   final: backend {final.backend}, {final.usage.prompt_tokens} + "
                    f"{final.usage.completion_tokens} tokens, cost {final.cost:.6f}"
                )
            else:
                print(f"\n   error: {event.error.code}: {event.error.message}")


def _show(reply) -> None:  # type: ignore[no-untyped-def]
    timings = ", ".join(f"{t.stage} {t.micros} us" for t in reply.timings)
    extracted = "".join(f"; {k}={v}" for k, v in reply.decision.extracted.items())
    print(
        f"   route {reply.decision.route}{extracted}; {reply.tokens_used}/{reply.budget_tokens} "
        f"tokens; {timings}"
    )
    print("   " + reply.prompt.replace("\n", "\n   "))


def run_demo(loaded: LoadedConfig) -> None:
    prepare(loaded)

    async def serve_and_call() -> None:
        server = PlexusServer(loaded, address="127.0.0.1:0")
        port = await server.start()
        print(f"== serving on 127.0.0.1:{port}", flush=True)
        try:
            await asyncio.get_running_loop().run_in_executor(None, _calls, f"127.0.0.1:{port}")
        finally:
            await server.stop(grace=1)

    asyncio.run(serve_and_call())
    print(
        f"== done. Serve it yourself: plexus serve {Path(loaded.path).name} "
        f"(from {loaded.base_dir})"
    )
