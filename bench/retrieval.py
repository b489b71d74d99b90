"""``plexus bench retrieval``: retrieval quality, index trade-offs and Stitch latency.

Three parts, each skippable:

1. StackFAQ quality (``--data DIR``, a BEIR-layout folder): the corpus embedded by the bulk
   encoder, exact inner-product search for every query, recall@1, recall@5, MRR@10 and
   nDCG@10; the folder's README is quoted for comparison.
2. Index trade-off: synthetic 384-d unit vectors shaped like sentence embeddings, at each
   ``--sizes``; every index kind built by ``router.context.collections.build_index`` (plus a
   stronger search setting for HNSW and IVF), timed one query at a time on one thread, recall@10
   against exact search.
3. Stitch end-to-end: the retail demo with a ``products`` collection of ``--stitch-chunks``
   chunks (synthetic vectors, no encoder run on them), ``Stitcher.stitch`` timed in process one
   request at a time, with each stage's share.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gc
import gzip
import io
import json
import math
import os
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.common import (
    machine_facts,
    machine_markdown,
    markdown_table,
    percentiles_us,
    publish,
    pyplot,
    say,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "examples" / "retail" / "plexus.yaml"
KNOWLEDGE = DEMO_CONFIG.parent / "knowledge"
K = 10
TARGET_RECALL = 0.95
TARGET_LATENCY_FRACTION = 0.10
BUILD_THREADS = 2  # FAISS threads while building; searches are timed on one thread
INDEX_WARMUP = 20
STRONG_EF_SEARCH = 192
STRONG_NPROBE = 48
README_MAX_CHARS = 100_000
ENCODE_BLOCK = 1024  # texts per encoder call (it sorts each call by length: less padding)
STITCH_WARMUP = 50
STITCH_REQUESTS = 1000
CHUNKS_PER_SOURCE = 10  # synthetic product chunks are grouped into sources ("products") of 10

# The synthetic embedding model (see Mixture).
LATENT_DIM = 64
WITHIN_SPREAD = 1.5
SHARED_WEIGHT = 0.5
ISOTROPIC_NOISE = 0.5
ANCHOR_OFFSET = 1.0  # stitch: weight of the mixture vector added to a real product chunk's

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
# synthetic embeddings


class Mixture:
    """Unit vectors shaped like sentence embeddings, seeded.

    Each vector is the unit-normalised sum of (a) a point of a Gaussian mixture that lives in a
    random ``LATENT_DIM``-dimensional subspace (``centers`` components with N(0, I) means and
    spread ``WITHIN_SPREAD``), (b) a direction every vector shares (weight ``SHARED_WEIGHT``,
    as real embeddings share a mean direction) and (c) isotropic noise of norm about
    ``ISOTROPIC_NOISE``. Neighbourhoods are meaningful (nearest-neighbour cosine ~0.5-0.6,
    random pairs ~0.07) and the components overlap, so approximate indexes are not given an
    easy, perfectly clustered problem.
    """

    def __init__(self, rng: np.random.Generator, dim: int, centers: int) -> None:
        self.rng = rng
        self.dim = dim
        latent = min(LATENT_DIM, dim)
        basis, _ = np.linalg.qr(rng.standard_normal((dim, latent)))
        self.basis_t = np.ascontiguousarray(basis.T, dtype=np.float32)  # [latent, dim]
        shared = rng.standard_normal(dim)
        self.shared = (shared / np.linalg.norm(shared)).astype(np.float32)
        self.centers = rng.standard_normal((max(1, centers), latent)).astype(np.float32)

    def draw(self, count: int, block: int = 20_000) -> np.ndarray:
        rng, latent = self.rng, self.basis_t.shape[0]
        out = np.empty((count, self.dim), dtype=np.float32)
        for start in range(0, count, block):
            m = min(block, count - start)
            which = rng.integers(0, len(self.centers), m)
            points = self.centers[which] + WITHIN_SPREAD * rng.standard_normal(
                (m, latent), dtype=np.float32
            )
            x = (points / np.sqrt(latent)) @ self.basis_t
            x += SHARED_WEIGHT * self.shared
            x += (ISOTROPIC_NOISE / np.sqrt(self.dim)) * rng.standard_normal(
                (m, self.dim), dtype=np.float32
            )
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[start : start + m] = x
        return out


def _mixture_for(rng: np.random.Generator, dim: int, count: int) -> Mixture:
    return Mixture(rng, dim, centers=max(1, round(math.sqrt(count))))


# --------------------------------------------------------------------------------------------
# part 1: StackFAQ (BEIR layout)


class DataError(Exception):
    """The --data folder cannot be read as a BEIR dataset."""


def _listing(folder: Path, limit: int = 60) -> str:
    found: list[str] = []
    for directory, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        depth = len(Path(directory).relative_to(folder).parts)
        if depth >= 2:
            dirnames[:] = []
        for name in sorted(filenames):
            found.append((Path(directory) / name).relative_to(folder).as_posix())
    if not found:
        return "(the folder is empty)"
    shown = ", ".join(found[:limit])
    return shown + (f", ... ({len(found) - limit} more)" if len(found) > limit else "")


def _first_file(folder: Path, names: list[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def find_beir(folder: Path) -> dict[str, Path]:
    """``corpus``, ``queries`` and ``qrels`` paths of a BEIR folder; :class:`DataError` else."""
    corpus = _first_file(folder, ["corpus.jsonl", "corpus.jsonl.gz"])
    queries = _first_file(folder, ["queries.jsonl", "queries.jsonl.gz"])
    qrels = None
    qrels_dir = folder / "qrels"
    if qrels_dir.is_dir():
        tsvs = sorted(p for p in qrels_dir.glob("*.tsv") if p.is_file())
        preferred = ["test", "dev", "validation", "val", "train"]
        tsvs.sort(key=lambda p: preferred.index(p.stem) if p.stem in preferred else 99)
        qrels = tsvs[0] if tsvs else None
    if qrels is None:
        qrels = _first_file(folder, ["qrels.tsv"])
    missing = [
        what
        for what, path in (
            ("corpus.jsonl", corpus),
            ("queries.jsonl", queries),
            ("qrels/test.tsv (or qrels/*.tsv, or qrels.tsv)", qrels),
        )
        if path is None
    ]
    if missing:
        raise DataError(
            f"{folder} is not in the BEIR layout this benchmark reads (corpus.jsonl with _id, "
            f"title, text; queries.jsonl with _id, text; qrels/test.tsv with the header "
            f"'query-id corpus-id score'). Missing: {'; '.join(missing)}. "
            f"Files found: {_listing(folder)}"
        )
    assert corpus is not None and queries is not None and qrels is not None
    return {"corpus": corpus, "queries": queries, "qrels": qrels}


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")  # noqa: SIM115 - closed by the caller's with


def _records(path: Path) -> Iterator[dict[str, Any]]:
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {number}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}: line {number}: expected a JSON object")
            record_id = record.get("_id", record.get("id"))
            if record_id is None or not isinstance(record.get("text", ""), str):
                raise DataError(f"{path}: line {number}: expected '_id' and a string 'text'")
            yield record


def load_corpus(path: Path) -> tuple[list[str], list[str]]:
    ids, texts = [], []
    for record in _records(path):
        title = record.get("title") or ""
        text = record.get("text") or ""
        ids.append(str(record.get("_id", record.get("id"))))
        texts.append(f"{title} {text}".strip() if isinstance(title, str) else text)
    if not ids:
        raise DataError(f"{path}: no documents")
    return ids, texts


def load_queries(path: Path) -> dict[str, str]:
    return {str(r.get("_id", r.get("id"))): r.get("text") or "" for r in _records(path)}


def load_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with _open_text(path) as handle:
        for number, row in enumerate(csv.reader(handle, delimiter="\t"), start=1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 3:
                raise DataError(
                    f"{path}: line {number}: expected 'query-id<TAB>corpus-id<TAB>score', "
                    f"got {row!r}"
                )
            query_id, doc_id, score = row[0].strip(), row[1].strip(), row[-1].strip()
            try:
                value = int(float(score))
            except ValueError:
                if number == 1:  # the header
                    continue
                raise DataError(f"{path}: line {number}: score {score!r} is not a number") from None
            qrels.setdefault(query_id, {})[doc_id] = value
    if not qrels:
        raise DataError(f"{path}: no relevance judgements")
    return qrels


def query_metrics(ranked: list[str], relevant: dict[str, int]) -> dict[str, float]:
    """recall@1, recall@5, MRR@10 and nDCG@10 (linear gain, as trec_eval and BEIR compute it)
    of one ranking; ``relevant`` holds the graded judgements (score > 0 is relevant)."""
    positive = {d: s for d, s in relevant.items() if s > 0}
    hits = [d in positive for d in ranked[:K]]
    rank = next((i for i, hit in enumerate(hits) if hit), None)
    dcg = sum(positive.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:K]))
    ideal = sorted(positive.values(), reverse=True)[:K]
    idcg = sum(gain / math.log2(i + 2) for i, gain in enumerate(ideal))
    return {
        "recall@1": sum(hits[:1]) / len(positive),
        "recall@5": sum(hits[:5]) / len(positive),
        "mrr@10": 0.0 if rank is None else 1.0 / (rank + 1),
        "ndcg@10": dcg / idcg if idcg else 0.0,
    }


def _embed(encoder: Any, texts: list[str], desc: str) -> np.ndarray:
    from tqdm import tqdm

    out = np.empty((len(texts), int(encoder.dim)), dtype=np.float32)
    with tqdm(total=len(texts), unit="text", desc=desc, file=sys.stderr, disable=None) as bar:
        for start in range(0, len(texts), ENCODE_BLOCK):
            batch = texts[start : start + ENCODE_BLOCK]
            out[start : start + len(batch)] = encoder.encode(batch)
            bar.update(len(batch))
    return out


def readme_files(folder: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name.lower().startswith("readme"):
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError as exc:
                text = f"(cannot read: {exc.strerror})"
            found.append(
                {
                    "name": path.name,
                    "truncated": len(text) > README_MAX_CHARS,
                    "text": text[:README_MAX_CHARS],
                }
            )
    return found


def run_stackfaq(folder: Path, files: dict[str, Path]) -> dict[str, Any]:
    import faiss

    from router.routing.encoder import bulk_encoder

    started = time.monotonic()
    say(f"[stackfaq] reading {folder}")
    doc_ids, doc_texts = load_corpus(files["corpus"])
    queries = load_queries(files["queries"])
    qrels = load_qrels(files["qrels"])
    known = set(doc_ids)
    judged = {
        q: {d: s for d, s in rels.items() if d in known}
        for q, rels in qrels.items()
        if q in queries
    }
    evaluated = {q: rels for q, rels in judged.items() if any(s > 0 for s in rels.values())}
    if not evaluated:
        raise DataError(
            f"{files['qrels']}: no judged query has a relevant document in the corpus and a "
            f"text in {files['queries'].name}"
        )
    missing_docs = sum(1 for rels in qrels.values() for d in rels if d not in known)
    encoder = bulk_encoder()
    say(f"[stackfaq] embedding {len(doc_texts)} documents with {encoder.name}")
    t0 = time.perf_counter()
    doc_vectors = _embed(encoder, doc_texts, "embedding corpus")
    encode_seconds = time.perf_counter() - t0
    query_ids = sorted(evaluated)
    query_vectors = _embed(encoder, [queries[q] for q in query_ids], "embedding queries")
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    index = faiss.IndexFlatIP(doc_vectors.shape[1])
    index.add(doc_vectors)
    t0 = time.perf_counter()
    _, found = index.search(query_vectors, min(K + 1, len(doc_ids)))
    search_seconds = time.perf_counter() - t0
    totals: dict[str, float] = {}
    identical = 0
    for row, query_id in enumerate(query_ids):
        ranked = [doc_ids[i] for i in found[row] if i >= 0]
        if query_id in ranked:  # BEIR ignores a document that is the query itself
            identical += 1
            ranked.remove(query_id)
        for name, value in query_metrics(ranked[:K], evaluated[query_id]).items():
            totals[name] = totals.get(name, 0.0) + value
    metrics = {name: value / len(query_ids) for name, value in totals.items()}
    relevant_counts = [sum(1 for s in evaluated[q].values() if s > 0) for q in query_ids]
    return {
        "run": True,
        "folder": str(folder),
        "files": {k: str(v.relative_to(folder)) for k, v in files.items()},
        "documents": len(doc_ids),
        "queries_in_file": len(queries),
        "queries_judged": len(qrels),
        "queries_evaluated": len(query_ids),
        "relevant_per_query_mean": round(float(np.mean(relevant_counts)), 3),
        "graded": len({s for rels in evaluated.values() for s in rels.values() if s > 0}) > 1,
        "qrels_missing_documents": missing_docs,
        "identical_ids_ignored": identical,
        "encoder": encoder.name,
        "encode_seconds": round(encode_seconds, 2),
        "documents_per_second": round(len(doc_ids) / encode_seconds, 1) if encode_seconds else 0,
        "search_seconds": round(search_seconds, 3),
        "metrics": metrics,
        "readme": readme_files(folder),
        "seconds": round(time.monotonic() - started, 1),
    }


# --------------------------------------------------------------------------------------------
# part 2: index trade-off


def _time_searches(index: Any, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One query at a time: (latencies ns, ids [n, K])."""
    for i in range(min(INDEX_WARMUP, len(queries))):
        index.search(queries[i : i + 1], K)
    samples = np.empty(len(queries), dtype=np.int64)
    found = np.empty((len(queries), K), dtype=np.int64)
    for i in range(len(queries)):
        query = queries[i : i + 1]
        started = time.perf_counter_ns()
        _, ids = index.search(query, K)
        samples[i] = time.perf_counter_ns() - started
        found[i] = ids[0]
    return samples, found


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    per_query = [
        len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) / max(1, int((t >= 0).sum()))
        for f, t in zip(found, truth, strict=True)
    ]
    return float(np.mean(per_query))


def _setting(index: Any, kind: str) -> str:
    import faiss

    inner = faiss.downcast_index(index.index)
    if kind == "hnsw":
        return (
            f"M {inner.hnsw.nb_neighbors(1)}, efConstruction {inner.hnsw.efConstruction}, "
            f"efSearch {inner.hnsw.efSearch}"
        )
    if kind == "ivf":
        return f"nlist {inner.nlist}, nprobe {inner.nprobe}"
    return "exact"


def run_index(sizes: list[int], query_count: int, seed: int) -> dict[str, Any]:
    import faiss

    from router.config import CollectionConfig
    from router.context.collections import _set_search_params, build_index

    dim = 384
    defaults = CollectionConfig()
    strong = {
        "hnsw": CollectionConfig(
            index="hnsw",
            hnsw=defaults.hnsw.model_copy(update={"ef_search": STRONG_EF_SEARCH}),
        ),
        "ivf": CollectionConfig(
            index="ivf", ivf=defaults.ivf.model_copy(update={"nprobe": STRONG_NPROBE})
        ),
    }
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    for size in sizes:
        rng = np.random.default_rng([seed, size])
        mixture = _mixture_for(rng, dim, size)
        say(f"[index] n={size}: generating {size} + {query_count} vectors ({dim}-d)")
        base = mixture.draw(size)
        queries = mixture.draw(query_count)
        ids = np.arange(size, dtype=np.int64)
        truth: np.ndarray | None = None
        flat_p50 = float("nan")
        for kind in ("flat", "hnsw", "ivf"):
            config = CollectionConfig(index=kind)
            faiss.omp_set_num_threads(BUILD_THREADS)
            t0 = time.perf_counter()
            index, built = build_index(base, ids, config)
            build_seconds = time.perf_counter() - t0
            memory = int(faiss.serialize_index(index).nbytes)
            faiss.omp_set_num_threads(1)
            say(
                f"[index] n={size}: built {built} in {build_seconds:.1f} s "
                f"({memory / 2**20:.0f} MiB)"
            )
            variants = [("default", config)]
            if kind in strong:
                variants.append(("stronger", strong[kind]))
            for variant, search_config in variants:
                _set_search_params(index, built, search_config)
                samples, found = _time_searches(index, queries)
                stats = percentiles_us(samples)
                if kind == "flat":
                    truth, flat_p50 = found, stats["p50"]
                assert truth is not None
                recall = _recall(found, truth)
                fraction = stats["p50"] / flat_p50 if flat_p50 else float("nan")
                rows.append(
                    {
                        "size": size,
                        "kind": built,
                        "variant": variant,
                        "setting": _setting(index, built),
                        "build_seconds": round(build_seconds, 2),
                        "memory_bytes": memory,
                        "p50_us": stats["p50"],
                        "p99_us": stats["p99"],
                        "mean_us": stats["mean"],
                        "recall_at_10": recall,
                        "latency_fraction": fraction,
                        "meets_target": bool(
                            recall >= TARGET_RECALL and fraction <= TARGET_LATENCY_FRACTION
                        ),
                    }
                )
                say(
                    f"[index] n={size} {built} {variant}: p50 {stats['p50']:.0f} us, "
                    f"recall@10 {recall:.3f}"
                )
            del index
        del base, queries
    return {
        "run": True,
        "dim": dim,
        "queries": query_count,
        "seed": seed,
        "build_threads": BUILD_THREADS,
        "mixture": {
            "centers": "round(sqrt(n))",
            "latent_dim": LATENT_DIM,
            "within_spread": WITHIN_SPREAD,
            "shared_weight": SHARED_WEIGHT,
            "isotropic_noise": ISOTROPIC_NOISE,
        },
        "target": {"recall_at_10": TARGET_RECALL, "latency_fraction": TARGET_LATENCY_FRACTION},
        "rows": rows,
        "seconds": round(time.monotonic() - started, 1),
    }


# --------------------------------------------------------------------------------------------
# part 3: Stitch end to end


def _stitch_config(workdir: Path) -> Any:
    from router.config import parse_config

    data = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
    data.setdefault("server", {})
    data["server"]["model_dir"] = str(workdir / "models")
    data["server"]["data_dir"] = str(workdir / "data")
    data["server"]["address"] = "127.0.0.1:0"
    for tenant in data["tenants"].values():
        model = tenant["model"]
        if model.get("data"):
            model["data"] = str((DEMO_CONFIG.parent / model["data"]).resolve())
        for name, mirror in tenant.get("sql_mirrors", {}).items():
            mirror["url"] = f"sqlite:///{workdir / f'{name}.db'}"
    path = workdir / "plexus.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return parse_config(data, path)


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

    from router.context.collections import CollectionWriter
    from router.context.types import ChunkRecord
    from router.routing.encoder import SERVING_ENCODER_NAME

    tenant = loaded.config.tenants["retail"]
    config = tenant.collections["products"]
    dim = 384
    rng = np.random.default_rng([seed, chunks, 3])
    with CollectionWriter(
        loaded.data_dir,
        "retail",
        "products",
        config,
        dim,
        encoder=SERVING_ENCODER_NAME,
        configured=tenant.collections,
    ) as writer:
        _, anchors = writer.embeddings_matrix()
        real = len(anchors)
        mixture = _mixture_for(rng, dim, chunks)
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
                    ChunkRecord(source, position, text, (), f"Synthetic product {number}")
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


async def _time_stitch(plexus: Any, caller: Any, store_id: str) -> dict[str, Any]:
    from router.routing.service import RouteQuery

    stitcher = plexus.stitcher

    async def once(i: int) -> Any:
        text = STITCH_QUESTIONS[i % len(STITCH_QUESTIONS)]
        query = RouteQuery(app="storefront", text=text, metadata={"store_id": store_id})
        return await stitcher.stitch(caller, query)

    for i in range(STITCH_WARMUP):
        await once(i)
    gc.collect()
    gc.freeze()  # as PlexusServer.start does: long-lived objects out of the collector's way
    totals = np.empty(STITCH_REQUESTS, dtype=np.int64)
    stages: dict[str, list[int]] = {}
    other: list[int] = []
    routes: Counter[str] = Counter()
    pieces: Counter[str] = Counter()
    synthetic = 0
    try:
        for i in range(STITCH_REQUESTS):
            started = time.perf_counter_ns()
            result = await once(i)
            totals[i] = time.perf_counter_ns() - started
            for stage, us in result.timings_us.items():
                stages.setdefault(stage, []).append(int(us))
            other.append(totals[i] // 1000 - sum(result.timings_us.values()))
            routes[result.decision.route] += 1
            for placed in result.assembly.placed:
                pieces[placed.piece.kind] += 1
                synthetic += placed.piece.source.startswith("products:synthetic/")
    finally:
        gc.unfreeze()
    total = percentiles_us(totals)
    stage_rows = []
    for stage, values in stages.items():
        p50, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 99])
        stage_rows.append(
            {"stage": stage, "calls": len(values), "p50_us": float(p50), "p99_us": float(p99)}
        )
    p50, p99 = np.percentile(np.asarray(other, dtype=np.float64), [50, 99])
    stage_rows.append(
        {"stage": "other", "calls": len(other), "p50_us": float(p50), "p99_us": float(p99)}
    )
    return {
        "requests": STITCH_REQUESTS,
        "warmup": STITCH_WARMUP,
        "total": total,
        "stages": stage_rows,
        "routes": dict(routes.most_common()),
        "pieces_per_request": {k: v / STITCH_REQUESTS for k, v in pieces.most_common()},
        "synthetic_pieces_per_request": synthetic / STITCH_REQUESTS,
    }


async def _serve_in_process(loaded: Any) -> dict[str, Any]:
    from router.routing.service import Caller
    from router.server.app import PlexusServer

    plexus = PlexusServer(loaded)  # built as `plexus serve` builds it, never started
    try:
        products = plexus.collections["retail"].get("products")
        collection = {
            "index": products.index_kind,
            "size": products.size,
            "version": products.version,
            "build_seconds": products.meta.get("build_seconds"),
        }
        caller = Caller(tenant="retail", key_name="bench", admin=False, apps=None)
        say(f"[stitch] timing {STITCH_REQUESTS} stitches one at a time ({products!r})")
        timing = await _time_stitch(plexus, caller, "1432")
        timing["products"] = collection
        return timing
    finally:
        plexus.executor.shutdown(wait=True)
        plexus.stitcher.close()
        for name in plexus.collections["retail"].names():
            plexus.collections["retail"].get(name).close()


def run_stitch(chunks: int, seed: int) -> dict[str, Any]:
    from router.context.ingest import ingest
    from router.routing.tenant_training import train_tenant

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="plexus-bench-retrieval-") as tmp:
        workdir = Path(tmp)
        loaded = _stitch_config(workdir)
        with sqlite3.connect(workdir / "stores.db") as db:
            db.executescript((DEMO_CONFIG.parent / "stores.sql").read_text(encoding="utf-8"))
        say("[stitch] training the retail model (fast family)")
        trained = train_tenant(loaded, "retail", family="fast")
        policies = sorted(
            p for p in KNOWLEDGE.iterdir() if p.suffix.lower() in {".md", ".html", ".txt"}
        )
        say("[stitch] ingesting the policies and the real product notes")
        policy_report = ingest(loaded, "retail", "policies", policies)
        ingest(loaded, "retail", "products", [KNOWLEDGE / "products.jsonl"])
        filled = fill_products(loaded, chunks, seed)
        timing = asyncio.run(_serve_in_process(loaded))
    return {
        "run": True,
        "model": {
            "version": trained.version,
            "family": trained.trained.card.family,
            "threshold": trained.trained.card.threshold,
        },
        "policies_chunks": policy_report.total_chunks,
        "products": {**filled, **timing.pop("products")},
        "questions": STITCH_QUESTIONS,
        **timing,
        "seconds": round(time.monotonic() - started, 1),
    }


# --------------------------------------------------------------------------------------------
# report


def _fence(text: str) -> str:
    longest, run = 0, 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text.rstrip()}\n{fence}"


def _us(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:,.0f}"


def _stackfaq_markdown(part: dict[str, Any]) -> str:
    if not part.get("run"):
        return f"Not run: {part['reason']}."
    m = part["metrics"]
    table = markdown_table(
        ["documents", "queries", "recall@1", "recall@5", "MRR@10", "nDCG@10", "embed docs/s"],
        [
            [
                part["documents"],
                part["queries_evaluated"],
                f"{m['recall@1']:.3f}",
                f"{m['recall@5']:.3f}",
                f"{m['mrr@10']:.3f}",
                f"{m['ndcg@10']:.3f}",
                f"{part['documents_per_second']:,.0f}",
            ]
        ],
    )
    files = ", ".join(f"`{v}`" for v in part["files"].values())
    if part["readme"]:
        readme = "\n\n".join(
            f"#### {item['name']}{' (truncated)' if item['truncated'] else ''}\n\n"
            f"{_fence(item['text'])}"
            for item in part["readme"]
        )
    else:
        readme = f"No README was found in `{part['folder']}`, so there is nothing to quote here."
    notes = [
        f"Data: `{part['folder']}` ({files}); {part['queries_evaluated']} of "
        f"{part['queries_in_file']} queries have a relevant document in the corpus and are "
        f"scored ({part['relevant_per_query_mean']} relevant documents per query on average"
        f"{', graded' if part['graded'] else ''}).",
        f"Encoder `{part['encoder']}` (the bulk encoder, every core); exact inner-product "
        f"search (FAISS IndexFlatIP) over the unit-norm embeddings of title + text.",
        "recall@k: the share of a query's relevant documents in its top k; MRR@10: 1/rank of "
        "the first relevant document in the top 10; nDCG@10 with linear gains from the qrels "
        "scores (as trec_eval / BEIR); all averaged over queries.",
    ]
    if part["qrels_missing_documents"]:
        missing = part["qrels_missing_documents"]
        notes.append(
            f"{missing} judgement{'s' if missing != 1 else ''} name{'' if missing != 1 else 's'} "
            "documents absent from the corpus (ignored)."
        )
    if part["identical_ids_ignored"]:
        notes.append(
            f"{part['identical_ids_ignored']} result(s) that were the query itself were "
            "ignored (as BEIR does)."
        )
    return "\n".join(
        [
            "\n".join(f"- {n}" for n in notes),
            "",
            table,
            "",
            "### Reference numbers (from the dataset folder's README)",
            "",
            readme,
        ]
    )


def _index_markdown(part: dict[str, Any]) -> str:
    if not part.get("run"):
        return f"Not run: {part['reason']}."
    rows = []
    for r in part["rows"]:
        setting = r["setting"] + (" (default)" if r["variant"] == "default" else "")
        rows.append(
            [
                f"{r['size']:,}",
                r["kind"],
                setting,
                f"{r['build_seconds']:.1f}" + (" (same)" if r["variant"] == "stronger" else ""),
                f"{r['memory_bytes'] / 2**20:.1f}",
                _us(r["p50_us"]),
                _us(r["p99_us"]),
                f"{r['recall_at_10']:.3f}",
                f"{100 * r['latency_fraction']:.1f}%",
                "**yes**" if r["meets_target"] else "no",
            ]
        )
    table = markdown_table(
        [
            "vectors",
            "index",
            "setting",
            "build s",
            "memory MiB",
            "p50 µs",
            "p99 µs",
            "recall@10",
            "p50 / exact p50",
            "meets target",
        ],
        rows,
    )
    mix = part["mixture"]
    return "\n".join(
        [
            f"- Data: synthetic {part['dim']}-d unit vectors (the encoder's dimension), seed "
            f"{part['seed']}: a Gaussian mixture of round(sqrt(n)) components in a random "
            f"{mix['latent_dim']}-d subspace (spread {mix['within_spread']}), plus a direction "
            f"every vector shares (weight {mix['shared_weight']}) and isotropic noise (norm "
            f"~{mix['isotropic_noise']}), normalised; {part['queries']} queries are fresh points "
            "of the same mixture.",
            "- Each index is built by `router.context.collections.build_index` from a "
            "`CollectionConfig` (FAISS on "
            f"{part['build_threads']} threads); the stronger rows apply only a search-time "
            "setting to the same index (as `Collection.load` does), so build time and memory "
            "are the default's. Memory is the size of `faiss.serialize_index`.",
            "- Latency: one query at a time, k = 10, FAISS on one thread (as the server runs "
            f"it), after {INDEX_WARMUP} warm-up queries. recall@10 is against the exact (flat) "
            "results.",
            f"- Target: recall@10 ≥ {TARGET_RECALL} at ≤ {100 * TARGET_LATENCY_FRACTION:.0f}% "
            "of exact search's p50 latency.",
            "",
            table,
        ]
    )


def _stitch_markdown(part: dict[str, Any]) -> str:
    if not part.get("run"):
        return f"Not run: {part['reason']}."
    p = part["products"]
    total = part["total"]
    summary = markdown_table(
        ["requests", "p50 µs", "p99 µs", "p99.9 µs", "mean µs", "products index", "chunks"],
        [
            [
                part["requests"],
                _us(total["p50"]),
                _us(total["p99"]),
                _us(total["p99_9"]),
                _us(total["mean"]),
                p["index"],
                f"{p['size']:,}",
            ]
        ],
    )
    stages = markdown_table(
        ["stage", "requests with it", "p50 µs", "p99 µs"],
        [[s["stage"], s["calls"], _us(s["p50_us"]), _us(s["p99_us"])] for s in part["stages"]],
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
            f"- Calls: `PlexusServer(loaded).stitcher.stitch(...)` in process (no gRPC), one "
            f"request at a time after {part['warmup']} warm-up requests, app `storefront`, "
            f"metadata store_id 1432, cycling through {len(part['questions'])} short product "
            "questions. Routes taken: "
            f"{routes}. Pieces placed per request: {pieces} "
            f"({part['synthetic_pieces_per_request']:.2f} of them synthetic).",
            "- Stages come from `result.timings_us`. `encode` is measured around the "
            "micro-batcher (executor hand-off included); `other` = whole call − the stages "
            "(routing decision, executor hand-offs, packet signing).",
            "",
            summary,
            "",
            stages,
        ]
    )


def to_markdown(report: dict[str, Any]) -> str:
    return f"""# Plexus retrieval: quality, index trade-offs and Stitch latency

{machine_markdown(report["machine"])}

## 1. StackFAQ retrieval quality (exact search)

{_stackfaq_markdown(report["stackfaq"])}

## 2. Index trade-off: recall@10 vs single-thread latency

{_index_markdown(report["index"])}

## 3. Stitch end-to-end latency (in process, single client)

{_stitch_markdown(report["stitch"])}

Run time {report["seconds"]} s. Plot: `retrieval.png`.
"""


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    index = report["index"]
    if index.get("run"):
        colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
        markers = {"flat": "s", "hnsw": "o", "ivf": "^"}
        sizes = sorted({r["size"] for r in index["rows"]})
        for n, size in enumerate(sizes):
            color = colors[n % len(colors)]
            for kind, marker in markers.items():
                rows = [r for r in index["rows"] if r["size"] == size and r["kind"] == kind]
                if not rows:
                    continue
                left.plot(
                    [r["p50_us"] for r in rows],
                    [r["recall_at_10"] for r in rows],
                    "-" + marker,
                    color=color,
                    label=f"{kind}, n={size:,}",
                )
        left.axhline(TARGET_RECALL, color="grey", linestyle=":", linewidth=1)
        left.set_xscale("log")
        left.set_xlabel("p50 latency per query, one thread (µs, log)")
        left.set_ylabel("recall@10 vs exact")
        left.set_title("Index trade-off (lines: default → stronger search setting)")
        left.grid(alpha=0.3, which="both")
        left.legend(fontsize=8)
    else:
        left.text(0.5, 0.5, "index part not run", ha="center", va="center")
        left.set_axis_off()
    stitch = report["stitch"]
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# entry point


def _check(args: argparse.Namespace) -> None:
    if any(s < 1 for s in args.sizes):
        raise ValueError("--sizes must be at least 1")
    if args.queries < 1:
        raise ValueError("--queries must be at least 1")
    if args.stitch_chunks < 0:
        raise ValueError("--stitch-chunks must not be negative")


def main(args: argparse.Namespace) -> int:
    try:
        _check(args)
    except ValueError as exc:
        print(f"plexus bench retrieval: error: {exc}", file=sys.stderr)
        return 2
    import faiss

    threads = faiss.omp_get_max_threads()
    started = time.monotonic()
    data = Path(args.data) if args.data is not None else None
    stackfaq: dict[str, Any]
    files: dict[str, Path] | None = None
    if args.skip_stackfaq:
        stackfaq = {"run": False, "reason": "skipped (--skip-stackfaq)"}
    elif data is None:
        stackfaq = {"run": False, "reason": "no dataset folder was given (--data DIR)"}
    elif not data.exists():
        stackfaq = {"run": False, "reason": f"the dataset folder `{data}` does not exist"}
        say(f"warning: {data} does not exist; the StackFAQ part is not run")
    else:
        try:
            if not data.is_dir():
                raise DataError(f"{data} is a file; --data takes the dataset folder")
            files = find_beir(data)
        except DataError as exc:
            print(f"plexus bench retrieval: error: {exc}", file=sys.stderr)
            return 2
        stackfaq = {}
    try:
        if files is not None and data is not None:
            try:
                stackfaq = run_stackfaq(data, files)
            except DataError as exc:
                print(f"plexus bench retrieval: error: {exc}", file=sys.stderr)
                return 2
        if args.skip_index:
            index: dict[str, Any] = {"run": False, "reason": "skipped (--skip-index)"}
        else:
            index = run_index(list(dict.fromkeys(args.sizes)), args.queries, args.seed)
        if args.skip_stitch:
            stitch: dict[str, Any] = {"run": False, "reason": "skipped (--skip-stitch)"}
        else:
            stitch = run_stitch(args.stitch_chunks, args.seed)
    finally:
        faiss.omp_set_num_threads(threads)
    report = {
        "suite": "retrieval",
        "machine": machine_facts(),
        "settings": {
            "data": None if data is None else str(data),
            "sizes": list(args.sizes),
            "queries": args.queries,
            "stitch_chunks": args.stitch_chunks,
            "seed": args.seed,
        },
        "stackfaq": stackfaq,
        "index": index,
        "stitch": stitch,
        "seconds": round(time.monotonic() - started, 1),
    }
    publish(Path(args.out), "retrieval", report, to_markdown(report), plot)
    return 0
