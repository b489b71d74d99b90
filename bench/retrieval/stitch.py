"""Stitch end to end: the retail demo with a large ``products`` collection, timed in process.

The retail demo in a temporary directory (model trained, SQL mirror built, ``policies`` and the
real product notes ingested); ``products`` then gets ``--stitch-chunks`` synthetic chunks
written straight through ``CollectionWriter`` (no encoder run: each vector is a real note's
embedding plus a point of the synthetic mixture). ``Plexus(loaded).pipeline.stitch()`` (the
Stitch call in process) is timed one request at a time: the whole call and each entry of
``timings_us``.
"""

from __future__ import annotations

import asyncio
import gc
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench import api, common
from bench.report import num, percentiles_us, say, table
from bench.retrieval.index import BUILD_THREADS, mixture_for

DEMO_CONFIG = common.DEMO_CONFIG
STITCH_WARMUP = 50
STITCH_REQUESTS = 1000
CHUNKS_PER_SOURCE = 10  # synthetic product chunks are grouped into sources ("products") of 10
ANCHOR_OFFSET = 1.0  # weight of the mixture vector added to a real product chunk's

# Short product questions for the stitch part (they route to product_question or
# inventory_check with the retail demo's model).
STITCH_QUESTIONS = [
    "does the TrailRunner 5 run small?",
    "is the merino base layer true to size?",
    "will the percale sheets fit a 15 inch mattress?",
    "is the air fryer basket dishwasher safe?",
    "does the smart thermostat need a C wire?",
    "is the Alpine jacket waterproof?",
    "what is the battery life of the Aura ANC headphones?",
    "is the Pulse smartwatch water resistant?",
    "is the Harbor down parka machine washable?",
    "is the stand mixer bowl dishwasher safe?",
    "how do I mount the 65 inch QLED TV on the wall?",
    "does the Northwind denim shrink in the wash?",
    "is the TrailRunner 5 in stock at this store?",
    "do you have the Vista QLED TV in stock?",
    "is the Summit 4 tent available at store 1432?",
    "is the robot vacuum in stock at store 1432?",
]

_WORD_LIST = """
trail shoe jacket merino wool down parka denim boot leather waterproof breathable insulated
lightweight zipper pocket hood seam sole tread cushion arch heel toe width size fit small large
regular slim relaxed stretch cotton polyester nylon fleece lining warranty repair return
exchange wash dry tumble cold gentle cycle detergent reproof spray membrane rating degree
temperature battery charge hours bluetooth pairing app screen mount bracket wall stand cable
remote setting picture sound volume capacity quart basket nonstick cast iron seasoning oven safe
dishwasher handle lid steel comforter sheet depth mattress queen king twin tent pole stake
rainfly backpack strap frame liter bottle vacuum filter brush schedule thermostat wire compatible
"""
WORDS = _WORD_LIST.split()

# --------------------------------------------------------------------------------------------
# part 3: Stitch end to end


def _synthetic_texts(rng: np.random.Generator, start: int, count: int) -> list[str]:
    lengths = rng.integers(40, 70, count)
    picks = rng.integers(0, len(WORDS), int(lengths.sum()))
    texts, offset = [], 0
    for i, length in enumerate(lengths.tolist()):
        words = [WORDS[j] for j in picks[offset : offset + length].tolist()]
        offset += length
        texts.append(f"Product note {start + i}: " + " ".join(words) + ".")
    return texts


def fill_products(loaded: Any, chunks: int, seed: int) -> dict[str, Any]:
    """Add ``chunks`` synthetic chunks to the retail ``products`` collection (no encoder run).

    The vectors cluster around the real product chunks' embeddings (already ingested): each is
    a real chunk's embedding plus ``ANCHOR_OFFSET`` x a vector of the synthetic mixture, so a
    product question finds real and synthetic chunks with realistic scores.
    """
    import faiss

    tenant = loaded.config.tenants["retail"]
    config = tenant.collections["products"]
    dim = 384
    rng = np.random.default_rng([seed, chunks, 3])
    with api.CollectionWriter(
        loaded.data_dir,
        "retail",
        "products",
        config,
        dim,
        encoder=api.SERVING_ENCODER_NAME,
        configured=tenant.collections,
    ) as writer:
        _, anchors = writer.embeddings_matrix()
        real = len(anchors)
        mixture = mixture_for(rng, dim, chunks)
        say(f"[stitch] writing {chunks} synthetic product chunks beside {real} real ones")
        block = 10_000
        for start in range(0, chunks, block):
            count = min(block, chunks - start)
            vectors = anchors[rng.integers(0, real, count)] + ANCHOR_OFFSET * mixture.draw(count)
            texts = _synthetic_texts(rng, start, count)
            for first in range(0, count, CHUNKS_PER_SOURCE):
                number = (start + first) // CHUNKS_PER_SOURCE
                source = f"synthetic/product-{number:06d}"
                part = texts[first : first + CHUNKS_PER_SOURCE]
                records = [
                    api.ChunkRecord(source, position, text, (), f"Synthetic product {number}")
                    for position, text in enumerate(part)
                ]
                writer.replace_source(
                    source, records, vectors[first : first + len(part)], f"synthetic:{seed}"
                )
        say(f"[stitch] building the products index over {writer.size} chunks")
        faiss.omp_set_num_threads(BUILD_THREADS)
        t0 = time.perf_counter()
        version = writer.commit()
        commit_seconds = time.perf_counter() - t0
    return {
        "real_chunks": real,
        "synthetic_chunks": chunks,
        "version": version,
        "commit_seconds": round(commit_seconds, 1),
    }


def _percentiles(stage: str, values: list[int]) -> dict[str, Any]:
    p50, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 99])
    return {"stage": stage, "calls": len(values), "p50_us": float(p50), "p99_us": float(p99)}


async def _time_stitch(runs: list[tuple[Any, Any]], store_id: str) -> list[dict[str, Any]]:
    """Each ``(plexus, caller)`` timed on the same requests, taking turns request by request
    (so a change in the machine's load falls on all of them alike)."""

    async def once(plexus: Any, caller: Any, i: int) -> Any:
        text = STITCH_QUESTIONS[i % len(STITCH_QUESTIONS)]
        query = api.RouteQuery(app="storefront", text=text, metadata={"store_id": store_id})
        return await plexus.pipeline.stitch(caller, query)

    for i in range(STITCH_WARMUP):
        for plexus, caller in runs:
            await once(plexus, caller, i)
    gc.collect()
    gc.freeze()  # as PlexusServer.start does: long-lived objects out of the collector's way
    totals = np.empty((len(runs), STITCH_REQUESTS), dtype=np.int64)
    stages: list[dict[str, list[int]]] = [{} for _ in runs]
    other: list[list[int]] = [[] for _ in runs]
    routes: list[Counter[str]] = [Counter() for _ in runs]
    pieces: list[Counter[str]] = [Counter() for _ in runs]
    synthetic = [0 for _ in runs]
    try:
        for i in range(STITCH_REQUESTS):
            for r, (plexus, caller) in enumerate(runs):
                started = time.perf_counter_ns()
                result = await once(plexus, caller, i)
                totals[r, i] = time.perf_counter_ns() - started
                for stage, us in result.timings_us.items():
                    stages[r].setdefault(stage, []).append(int(us))
                # "stage.part" names time inside a stage: the remainder is over the stages alone
                top = sum(us for stage, us in result.timings_us.items() if "." not in stage)
                other[r].append(totals[r, i] // 1000 - top)
                routes[r][result.decision.route] += 1
                for placed in result.assembly.placed:
                    pieces[r][placed.piece.kind] += 1
                    synthetic[r] += placed.piece.source.startswith("products:synthetic/")
    finally:
        gc.unfreeze()
    out = []
    for r in range(len(runs)):
        top = [stage for stage in stages[r] if "." not in stage]  # each stage, then its parts

        def place(stage: str, top: list[str] = top) -> tuple[int, bool]:
            parent = stage.split(".", 1)[0]
            return (top.index(parent) if parent in top else len(top), "." in stage)

        stage_rows = [_percentiles(st, stages[r][st]) for st in sorted(stages[r], key=place)]
        stage_rows.append(_percentiles("other", other[r]))
        out.append(
            {
                "requests": STITCH_REQUESTS,
                "warmup": STITCH_WARMUP,
                "total": percentiles_us(totals[r]),
                "stages": stage_rows,
                "routes": dict(routes[r].most_common()),
                "pieces_per_request": {k: v / STITCH_REQUESTS for k, v in pieces[r].most_common()},
                "synthetic_pieces_per_request": synthetic[r] / STITCH_REQUESTS,
            }
        )
    return out


async def _serve_in_process(loaded: Any, vectors_alone: Any) -> dict[str, Any]:
    """The configuration as it is, and the same data searched by vectors alone, timed
    together; the first one's timing, with the other's under ``vectors_alone``."""
    servers = [api.Plexus(loaded), api.Plexus(vectors_alone)]  # what the server serves
    try:
        for plexus in servers:
            await plexus.warm()
        products = servers[0].collections[common.TENANT].get("products")
        collection = {
            "index": products.index_kind,
            "size": products.size,
            "version": products.version,
            "build_seconds": products.meta.get("build_seconds"),
            "lexical": products.meta.get("lexical"),
            "hybrid": products.hybrid.model_dump() if products.hybrid_active else None,
        }
        runs = [(plexus, plexus.keys.authenticate(common.api_key())) for plexus in servers]
        say(
            f"[stitch] timing {STITCH_REQUESTS} stitches one at a time ({products!r}), "
            "hybrid and vectors alone taking turns"
        )
        timing, baseline = await _time_stitch(runs, "1432")
        timing["products"] = collection
        timing["vectors_alone"] = {k: baseline[k] for k in ("total", "stages")}
        return timing
    finally:
        for plexus in servers:
            await plexus.aclose()
            for name in plexus.collections[common.TENANT].names():
                plexus.collections[common.TENANT].get(name).close()


def _vectors_alone(config: Path) -> Any:
    """The workspace's configuration with every collection of the demo tenant searched by its
    vectors alone (``hybrid.bm25_weight: 0``), beside it."""
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    for settings in raw["tenants"][common.TENANT].get("collections", {}).values():
        settings["hybrid"] = {**(settings.get("hybrid") or {}), "bm25_weight": 0.0}
    copy = config.with_name("plexus-vectors-alone.yaml")
    copy.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return api.load_config(copy)


def run(chunks: int, seed: int) -> dict[str, Any]:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="plexus-bench-retrieval-") as tmp:
        say("[stitch] the retail demo: model, SQL mirror, policies and the real product notes")
        space = common.workspace(DEMO_CONFIG, Path(tmp), data=True)
        filled = fill_products(space.loaded, chunks, seed)
        timing = asyncio.run(_serve_in_process(space.loaded, _vectors_alone(space.config)))
    model = space.models[common.TENANT]
    return {
        "run": True,
        "model": {k: model[k] for k in ("version", "family", "threshold")},
        "policies_chunks": space.collections["policies"]["chunks"],
        "products": {**filled, **timing.pop("products")},
        "questions": STITCH_QUESTIONS,
        **timing,
        "seconds": round(time.monotonic() - started, 1),
    }


def markdown(part: dict[str, Any]) -> str:
    if not part.get("run"):
        return f"Not run: {part['reason']}."
    p = part["products"]
    hybrid = p.get("hybrid")
    searched = (
        f"hybrid ({hybrid['fusion']}, bm25_weight {hybrid['bm25_weight']})"
        if hybrid
        else "vectors alone"
    )
    alone = part.get("vectors_alone")
    rows = [{**part["total"], "search": searched}]
    if alone:
        rows.append({**alone["total"], "search": "vectors alone (bm25_weight 0), same run"})
    summary = table(
        [
            {**row, "requests": part["requests"], "index": p["index"], "size": p["size"]}
            for row in rows
        ],
        [
            ("search", "search"),
            ("requests", "requests"),
            *[(f"{k.replace('_', '.')} µs", num(k)) for k in ("p50", "p99", "p99_9", "mean")],
            ("products index", "index"),
            ("chunks", num("size")),
        ],
    )
    baseline = {row["stage"]: row for row in (alone or {}).get("stages", [])}
    stages = table(
        [
            {
                **row,
                "alone_p50": baseline.get(row["stage"], {}).get("p50_us", float("nan")),
                "alone_p99": baseline.get(row["stage"], {}).get("p99_us", float("nan")),
            }
            for row in part["stages"]
        ],
        [
            ("stage", "stage"),
            ("requests with it", "calls"),
            ("p50 µs", num("p50_us")),
            ("p99 µs", num("p99_us")),
            ("vectors alone p50 µs", num("alone_p50")),
            ("vectors alone p99 µs", num("alone_p99")),
        ],
    )
    routes = ", ".join(f"{k} {v}" for k, v in part["routes"].items())
    pieces = ", ".join(f"{v:.2f} {k}" for k, v in part["pieces_per_request"].items())
    return "\n".join(
        [
            f"- Setup: the retail demo (model {part['model']['version']}, "
            f"{part['model']['family']} family, threshold {part['model']['threshold']}); "
            f"`policies` ingested from examples/retail/knowledge ({part['policies_chunks']} "
            f"chunks); `products` = {p['real_chunks']} real product chunks + "
            f"{p['synthetic_chunks']:,} synthetic chunks written with `CollectionWriter` (no "
            "encoder run: each vector is a real product chunk's embedding plus "
            f"{ANCHOR_OFFSET} x a point of the synthetic mixture, normalised; short synthetic "
            f"texts, no tags); index kind `{p['index']}` (built in {p['build_seconds']} s).",
            f"- Calls: `Plexus(loaded).pipeline.stitch(...)` in process (no gRPC), one "
            f"request at a time after {part['warmup']} warm-up requests, app `storefront`, "
            f"metadata store_id 1432, cycling through {len(part['questions'])} short product "
            "questions. Routes taken: "
            f"{routes}. Pieces placed per request: {pieces} "
            f"({part['synthetic_pieces_per_request']:.2f} of them synthetic).",
            "- Stages come from `result.timings_us`: each pipeline stage (`prep`, `route`, "
            "`policy`, `stitch`) and, as `stage.part`, the time inside it (`stitch.encode` is "
            "measured around the micro-batcher, executor hand-off included; each source; "
            "`stitch.assemble`); `other` = whole call − the stages.",
            "- Search: each collection source searches with the question's embedding and its "
            "words (hybrid, the collections' defaults; the products BM25 index has "
            f"{(p.get('lexical') or {}).get('terms', 0):,} terms, built in "
            f"{(p.get('lexical') or {}).get('build_seconds', 0)} s of the commit). A second "
            "`Plexus` over the same data searches by vectors alone (`bm25_weight: 0`); the "
            "two take turns request by request, so the columns compare like with like.",
            "",
            summary,
            "",
            stages,
        ]
    )


def plot(stitch: dict[str, Any], right: Any) -> None:
    """The p50 of each stage and of the whole call on ``right``."""
    if stitch.get("run"):
        names = [s["stage"] for s in stitch["stages"]] + ["whole call"]
        values = [s["p50_us"] for s in stitch["stages"]] + [stitch["total"]["p50"]]
        bars = right.bar(range(len(names)), values, color=["tab:blue"] * (len(names) - 1) + ["k"])
        right.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
        right.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        right.set_ylabel("p50 (µs)")
        p = stitch["products"]
        right.set_title(f"Stitch stage p50s (products: {p['size']:,} chunks, {p['index']})")
    else:
        right.text(0.5, 0.5, "stitch part not run", ha="center", va="center")
        right.set_axis_off()
