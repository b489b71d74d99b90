"""Retrieval quality through the served path: the corpus ingested as a collection, every
judged query asked through ``Stitch`` in process.

A tenant in a temporary directory has one collection (default ``CollectionConfig``: chunked,
the index kind it chooses for its size, the lexical index) and two routes whose context is that
collection (so whatever the fast model decides, the same source answers). The corpus file is
ingested by path (its ``_id`` names each source), and ``Plexus(loaded).pipeline.stitch()`` is
called once per query with a budget that places every retrieved chunk. The ranking is the
order of the placed pieces, each FAQ entry counted at its first chunk, scored as the exact
search is (:func:`bench.retrieval.quality.query_metrics`).

Each variant is one search setting of the same ingested collection (``hybrid`` is search-time
only): the collection's defaults, and the vectors alone (``bm25_weight: 0``) beside it; each
has its own ``Plexus`` in the one process and they take turns query by query.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench import api
from bench.report import percentiles_us, say

TENANT = "faq"
APP = "help"
COLLECTION = "stackfaq"
KEY = "bench-retrieval-key"
CHUNKS_PER_QUERY = 50  # chunks retrieved per question: enough to hold ten distinct entries
OTHER_EXAMPLES = [
    "talk to a person",
    "I want a human agent",
    "cancel my subscription please",
    "what are your opening hours",
    "hello there",
    "thanks, that is all",
    "can someone call me back",
    "my invoice is wrong",
    "I have a complaint",
    "where is your office",
    "speak to support",
    "goodbye",
]
"""The second route's examples (the routes share one context, so routing does not matter)."""


def _config(workdir: Path, titles: list[str], hybrid: dict[str, Any]) -> dict[str, Any]:
    context = {
        "sources": [{"kind": "collection", "collection": COLLECTION, "k": CHUNKS_PER_QUERY}],
        "budget_tokens": 32_768,
        "diversity": 1.0,
    }
    return {
        "server": {
            "address": "127.0.0.1:0",
            "model_dir": str(workdir / "models"),
            "data_dir": str(workdir / "data"),
        },
        "tenants": {
            TENANT: {
                "api_keys": [{"name": "bench", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}],
                "model": {"family": "fast", "fallback_route": "faq", "seed": 0},
                "apps": {APP: {"description": "questions about web applications"}},
                "collections": {COLLECTION: {"hybrid": hybrid}},
                "backends": {"local": {"kind": "local"}},
                "routes": [
                    {"name": "faq", "target": "local", "context": context, "examples": titles},
                    {
                        "name": "other",
                        "target": "local",
                        "context": context,
                        "examples": OTHER_EXAMPLES,
                    },
                ],
            }
        },
    }


def _load(workdir: Path, name: str, titles: list[str], hybrid: dict[str, Any]) -> Any:
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_config(workdir, titles, hybrid)), encoding="utf-8")
    return api.load_config(path)


def _entry(source: str) -> str:
    """The FAQ entry of a piece's source (``stackfaq:/path/corpus.jsonl#d12`` -> ``d12``)."""
    return source.rsplit("#", 1)[-1]


async def _ask_all(
    configs: list[Any], query_ids: list[str], queries: dict[str, str]
) -> list[dict[str, Any]]:
    """Every query through each configuration's ``Plexus``, the variants taking turns query by
    query (so a change in the machine's load falls on all of them alike)."""
    servers = [api.Plexus(loaded) for loaded in configs]
    try:
        for plexus in servers:
            await plexus.warm()
        callers = [plexus.keys.authenticate(KEY) for plexus in servers]
        for query_id in query_ids[:20]:  # warm-up
            for plexus, caller in zip(servers, callers, strict=True):
                query = api.RouteQuery(app=APP, text=queries[query_id])
                await plexus.pipeline.stitch(caller, query)
        rankings: list[dict[str, list[str]]] = [{} for _ in servers]
        samples = np.empty((len(servers), len(query_ids)), dtype=np.int64)
        distinct: list[list[int]] = [[] for _ in servers]
        for n, query_id in enumerate(query_ids):
            for v, (plexus, caller) in enumerate(zip(servers, callers, strict=True)):
                query = api.RouteQuery(app=APP, text=queries[query_id])
                started = time.perf_counter_ns()
                result = await plexus.pipeline.stitch(caller, query)
                samples[v, n] = time.perf_counter_ns() - started
                entries = [
                    _entry(p.piece.source)
                    for p in result.assembly.placed
                    if p.piece.kind == "collection"
                ]
                ranked = list(dict.fromkeys(entries))
                distinct[v].append(len(ranked))
                rankings[v][query_id] = ranked
        out = []
        for v, plexus in enumerate(servers):
            collection = plexus.collections[TENANT].get(COLLECTION)
            out.append(
                {
                    "index": collection.index_kind,
                    "chunks": collection.size,
                    "version": collection.version,
                    "hybrid_active": collection.hybrid_active,
                    "rankings": rankings[v],
                    "stitch": percentiles_us(samples[v]),
                    "distinct_entries_min": min(distinct[v], default=0),
                }
            )
        return out
    finally:
        for plexus in servers:
            await plexus.aclose()
            for name in plexus.collections[TENANT].names():
                plexus.collections[TENANT].get(name).close()


def run(
    corpus: Path,
    titles: list[str],
    queries: dict[str, str],
    evaluated: dict[str, dict[str, int]],
    score: Any,
) -> dict[str, Any]:
    """The served-path rows: ``score(ranked, judged) -> metrics`` averaged per variant."""
    started = time.monotonic()
    query_ids = sorted(evaluated)
    variants = {
        "served, collection defaults": api.CollectionConfig().hybrid.model_dump(),
        "served, vectors alone (bm25_weight 0)": {"bm25_weight": 0.0},
    }
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="plexus-bench-served-") as tmp:
        workdir = Path(tmp)
        (workdir / "data").mkdir()
        first = _load(workdir, "defaults", titles, {})
        say(f"[stackfaq served] training tenant {TENANT!r}'s fast model")
        api.train_tenant(first, TENANT, family="fast")
        say(f"[stackfaq served] ingesting {corpus}")
        t0 = time.perf_counter()
        report = api.ingest(first, TENANT, COLLECTION, [corpus])
        ingest_seconds = time.perf_counter() - t0
        configs = [
            first if n == 0 else _load(workdir, f"variant{n}", titles, hybrid)
            for n, hybrid in enumerate(variants.values())
        ]
        say(f"[stackfaq served] {len(query_ids)} Stitch calls for each of {len(configs)} settings")
        answers = asyncio.run(_ask_all(configs, query_ids, queries))
        for (name, hybrid), asked in zip(variants.items(), answers, strict=True):
            totals: dict[str, float] = {}
            for query_id in query_ids:
                ranked = [d for d in asked["rankings"][query_id] if d != query_id]
                for metric, value in score(ranked[:10], evaluated[query_id]).items():
                    totals[metric] = totals.get(metric, 0.0) + value
            rows.append(
                {
                    "variant": name,
                    "hybrid": hybrid,
                    "hybrid_active": asked["hybrid_active"],
                    "index": asked["index"],
                    "chunks": asked["chunks"],
                    "distinct_entries_min": asked["distinct_entries_min"],
                    "stitch_us": asked["stitch"],
                    "metrics": {m: v / len(query_ids) for m, v in totals.items()},
                }
            )
    return {
        "run": True,
        "collection": COLLECTION,
        "chunks_per_query": CHUNKS_PER_QUERY,
        "ingest": {
            "chunks": report.total_chunks,
            "duplicates_dropped": report.duplicates_dropped,
            "seconds": round(ingest_seconds, 1),
        },
        "rows": rows,
        "seconds": round(time.monotonic() - started, 1),
    }
