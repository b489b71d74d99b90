"""The retail demo: train the routing model, build the context sources, serve, and call it.

``plexus demo`` copies the retail example shipped in the package (``router/examples/retail``)
into a working folder, ``./plexus-demo`` by default, and runs there, so it works from any
directory and leaves the installed copy untouched. An existing working folder is reused: its
configuration, models and collections stay, and re-ingesting skips what has not changed.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import sys
from importlib.resources.abc import Traversable
from pathlib import Path

from router.client import (
    ContextEvent,
    DecisionEvent,
    DeltaEvent,
    FinalEvent,
    PlexusClient,
    Stitched,
)
from router.config import LoadedConfig
from router.context.ingest import ingest
from router.context.ingest_cli import load_sql_mirror
from router.routing.registry import ACTIVE_FILE
from router.routing.tenant_training import train_tenant
from router.server.app import PlexusServer

DEMO_KEY = "retail-demo-key"
ADMIN_KEY = "retail-admin-key"
DEFAULT_WORKDIR = Path("plexus-demo")
CONFIG_NAME = "plexus.yaml"
ROUTE_CALLS = [
    ("storefront", "is the 65 inch QLED tv in stock at store 1432?", {"store_id": "1432"}),
    ("storefront", "you charged my card twice for the same order and I want it fixed", {}),
    ("storefront", "when does the Elm Street store close on sunday", {"store_id": "1432"}),
    ("storefront", "what's a good recipe for banana bread", {}),
    ("store_ops", "how many gold tier points do I have", {}),
]


def _say(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def example() -> Traversable:
    """The retail example as shipped in the package."""
    return importlib.resources.files("router") / "examples" / "retail"


def _copy_tree(source: Traversable, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.name.startswith(".") or entry.name in ("models", "data", "__pycache__"):
            continue
        destination = target / entry.name
        if entry.is_dir():
            _copy_tree(entry, destination)
        elif not destination.exists():
            destination.write_bytes(entry.read_bytes())


def prepare_workdir(workdir: Path) -> Path:
    """A working copy of the retail example in ``workdir`` (an existing one is reused);
    returns its configuration file."""
    config = workdir / CONFIG_NAME
    if config.is_file():
        print(f"== using the demo in {workdir.resolve()}", flush=True)
    else:
        _copy_tree(example(), workdir)
        print(f"== copied the retail example into {workdir.resolve()}", flush=True)
    return config


def prepare(loaded: LoadedConfig) -> None:
    """Train the model, load the SQL mirror and ingest the knowledge base."""
    root = loaded.base_dir
    print("== training the retail routing model", flush=True)
    # A rerun serves what it trains, even where a load or rollback left ACTIVE on an older
    # version; a first run leaves no ACTIVE (the newest is served).
    pinned = (loaded.model_dir / "retail" / ACTIVE_FILE).is_file()
    result = train_tenant(loaded, "retail", progress=_say, activate=pinned)
    metrics = result.trained.card.metrics
    print(
        f"   {result.version}: held-out in-scope accuracy {metrics['inscope_accuracy']:.3f}, "
        f"out-of-scope recall {metrics.get('oos_recall', float('nan')):.3f}, "
        f"threshold {result.trained.card.threshold:.2f}"
    )
    mirror = load_sql_mirror(loaded, "retail", "stores", root / "stores.sql")
    rows = ", ".join(f"{table} {count}" for table, count in mirror.tables.items())
    print(f"== SQL mirror stores: {mirror.path} ({rows} rows)", flush=True)
    knowledge = root / "knowledge"
    for collection, paths in [
        ("policies", sorted(p for p in knowledge.iterdir() if p.suffix != ".jsonl")),
        ("products", sorted(knowledge.glob("*.jsonl"))),
    ]:
        report = ingest(loaded, "retail", collection, paths, progress=_say)
        print(
            f"== collection {collection}: {report.total_chunks} chunks, version {report.version} "
            f"({len(report.added_sources)} sources added, {len(report.replaced_sources)} "
            f"replaced, {len(report.unchanged_sources)} unchanged)",
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
        _show(client.stitch("storefront", "can I return a jacket I got as a gift?"))
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
            if isinstance(event, DecisionEvent):
                print(f"   decision: {event.decision.route} -> {event.decision.target}")
            elif isinstance(event, ContextEvent):
                print(f"   context: {len(event.pieces)} cited pieces, {event.tokens_used} tokens")
            elif isinstance(event, DeltaEvent):
                print(event.text, end="", flush=True)
            elif isinstance(event, FinalEvent):
                print(
                    f"\n   final: backend {event.backend}, {event.usage.prompt_tokens} + "
                    f"{event.usage.completion_tokens} tokens, cost {event.cost:.6f}"
                )
            else:
                print(f"\n   error: {event.code}: {event.message}")


def _show(reply: Stitched) -> None:
    timings = ", ".join(f"{stage} {us} us" for stage, us in reply.timings.items())
    extracted = "".join(f"; {k}={v}" for k, v in reply.decision.extracted.items())
    print(
        f"   route {reply.decision.route}{extracted}; {reply.tokens_used}/{reply.budget_tokens} "
        f"tokens; {timings}"
    )
    print("   " + reply.prompt.replace("\n", "\n   "))


def _shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it is below it."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


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
    config = _shown_path(loaded.path)
    print(f"== done. Everything is in {loaded.base_dir}. Next:")
    print(f"   plexus serve {config}")
    print(
        f"   plexus route --remote {loaded.config.server.address} --api-key {DEMO_KEY} "
        f"--app storefront --text 'where is my order 88123?'"
    )
    print(f"   plexus models list --remote {loaded.config.server.address} --api-key {ADMIN_KEY}")
    print(f"   ({DEMO_KEY} and {ADMIN_KEY} are demo keys: replace them, see plexus keys new)")
