"""Vector collections: index kinds, search, versions, hot reload and tenant isolation.

Real FAISS indexes and real SQLite files; the query-by-meaning test uses the real encoder.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

import router.context.collections as collections_module
from router.config import CollectionConfig, LoadedConfig, parse_config
from router.context.collections import (
    CURRENT_FILE,
    TEMP_PREFIX,
    Collection,
    CollectionWriter,
    TenantCollections,
    build_index,
    collection_dir,
)
from router.context.types import ChunkRecord
from router.errors import FailedPrecondition, InvalidArgument, NotFound

from .conftest import demo_config_data

DIM = 32


def make_config(
    tmp_path: Path,
    retail: Mapping[str, Any] | None = None,
    wholesale: Mapping[str, Any] | None = None,
) -> LoadedConfig:
    """The demo configuration with ``data_dir`` under ``tmp_path`` and extra collections."""
    data = demo_config_data(tmp_path / "models")
    data["server"]["data_dir"] = str(tmp_path / "data")
    for tenant, extra in (("retail", retail), ("wholesale", wholesale)):
        data["tenants"][tenant].setdefault("collections", {}).update(dict(extra or {}))
    return parse_config(data, tmp_path / "plexus.yaml")


def unit(rows: np.ndarray) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    faiss.normalize_L2(rows)
    return rows


def clustered(count: int, dim: int = DIM, *, seed: int = 0, clusters: int = 30) -> np.ndarray:
    """Random unit vectors around random centres, as sentence embeddings cluster by topic."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    points = centres[rng.integers(0, clusters, count)] + 0.5 * rng.standard_normal((count, dim))
    return unit(points)


def write(
    data_dir: Path,
    tenant: str,
    name: str,
    config: CollectionConfig,
    texts: Sequence[str],
    vectors: np.ndarray,
    *,
    source: str = "doc",
    tags: Sequence[Sequence[str]] | None = None,
) -> str:
    """One version holding ``texts`` (one source) with the given embeddings."""
    chunks = [
        ChunkRecord(source, i, text, tuple(tags[i]) if tags else (), f"title {i}")
        for i, text in enumerate(texts)
    ]
    with CollectionWriter(data_dir, tenant, name, config, vectors.shape[1]) as writer:
        writer.replace_source(source, chunks, vectors, f"digest-{len(texts)}")
        return writer.commit()


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


# --------------------------------------------------------------------------------------------
# index kinds and search


@pytest.mark.parametrize(
    ("settings", "count", "expected", "faiss_type"),
    [
        ({"index": "flat"}, 120, "flat", faiss.IndexFlatIP),
        ({"index": "hnsw", "hnsw": {"m": 8, "ef_search": 64}}, 120, "hnsw", faiss.IndexHNSWFlat),
        ({"index": "ivf", "ivf": {"nprobe": 4}}, 400, "ivf", faiss.IndexIVFFlat),
        ({"index": "ivf"}, 20, "flat", faiss.IndexFlatIP),  # too few vectors to train IVF
        ({"index": "auto", "exact_max_vectors": 200}, 120, "flat", faiss.IndexFlatIP),
        ({"index": "auto", "exact_max_vectors": 100}, 120, "hnsw", faiss.IndexHNSWFlat),
    ],
)
def test_index_kind_by_size_and_config(
    data_dir: Path, settings: dict[str, Any], count: int, expected: str, faiss_type: type
) -> None:
    config = CollectionConfig.model_validate(settings)
    vectors = clustered(count)
    write(data_dir, "retail", "docs", config, [f"chunk {i}" for i in range(count)], vectors)
    collection = Collection.load(data_dir, "retail", "docs", config)
    assert collection.index_kind == expected
    assert collection.meta["index"] == expected
    assert isinstance(faiss.downcast_index(collection._index.index), faiss_type)
    assert (collection.size, collection.dim, collection.version) == (count, DIM, "v0001")
    if expected == "hnsw":
        assert faiss.downcast_index(collection._index.index).hnsw.efSearch == config.hnsw.ef_search
    if expected == "ivf":
        assert faiss.downcast_index(collection._index.index).nprobe == config.ivf.nprobe
    scores, ids = collection.search(vectors[:10], 3)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (10, 3)
    assert list(ids[:, 0]) == list(range(10))  # every stored vector finds itself first
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert [c.text for c in collection.chunks(ids[:, 0])] == [f"chunk {i}" for i in range(10)]


def test_search_finds_the_chunk_that_answers(data_dir: Path) -> None:
    from router.routing.encoder import shared_encoder

    encoder = shared_encoder()
    texts = [
        "Our stores open at 9 am and close at 9 pm, and on Sundays they close at 6 pm.",
        "Items can be returned within 30 days with the receipt for a full refund.",
        "Gold tier members earn two points per dollar spent in store and online.",
        "Standard shipping takes three to five business days; express arrives next day.",
        "The Ninja air fryer has a 4 quart basket and a dishwasher-safe crisper plate.",
    ]
    config = CollectionConfig(index="flat")
    write(data_dir, "retail", "docs", config, texts, encoder.encode(texts))
    collection = Collection.load(data_dir, "retail", "docs", config)
    queries = {
        "what time does the shop shut on sunday": 0,
        "can I get my money back for something I bought": 1,
        "how many reward points do I get": 2,
        "when will my package arrive": 3,
    }
    vectors = encoder.encode(list(queries))
    for (query, expected), vector in zip(queries.items(), vectors, strict=True):
        hits = collection.search_hits(vector, 2)
        assert hits[0].chunk.text == texts[expected], query
        assert hits[0].score > hits[1].score


def test_ids_map_to_chunks_in_order(data_dir: Path) -> None:
    config = CollectionConfig(index="flat")
    vectors = clustered(8)
    write(data_dir, "retail", "docs", config, [f"text {i}" for i in range(8)], vectors)
    collection = Collection.load(data_dir, "retail", "docs", config)
    chunks = collection.chunks([5, -1, 2, 999, 5, 0])
    assert [c.chunk_id for c in chunks] == [5, 2, 5, 0]
    assert [(c.source, c.position, c.text, c.title) for c in chunks[:2]] == [
        ("doc", 5, "text 5", "title 5"),
        ("doc", 2, "text 2", "title 2"),
    ]
    scores, ids = collection.search(vectors[:2], 20)  # more neighbours than chunks
    assert ids.shape == (2, 20) and (ids[:, 8:] == -1).all() and np.isneginf(scores[:, 8:]).all()
    assert sorted(ids[0, :8]) == list(range(8))
    with pytest.raises(InvalidArgument):
        collection.search(np.zeros((1, DIM + 1), np.float32), 3)


def test_tag_filter_and_min_score(data_dir: Path) -> None:
    config = CollectionConfig(index="flat")
    count = 300
    vectors = clustered(count, seed=3)
    rare = set(range(0, count, 25))  # 12 chunks carry "rare"
    tags = [("rare", "x") if i in rare else ("common",) for i in range(count)]
    write(data_dir, "retail", "docs", config, [f"t{i}" for i in range(count)], vectors, tags=tags)
    collection = Collection.load(data_dir, "retail", "docs", config)
    query = vectors[7]
    hits = collection.search_hits(query, 5, tags=["rare"])
    brute = sorted(rare, key=lambda i: -float(vectors[i] @ query))[:5]
    assert [h.chunk.chunk_id for h in hits] == brute  # over-fetching found the best tagged ones
    assert all("rare" in h.chunk.tags for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert collection.search_hits(query, 20, tags=["rare", "x"]) and all(
        h.chunk.chunk_id in rare for h in collection.search_hits(query, 20, tags=["rare", "x"])
    )
    assert len(collection.search_hits(query, 20, tags=["rare"])) == len(rare)
    assert collection.search_hits(query, 5, tags=["missing"]) == []
    exact = collection.search_hits(query, 5, min_score=0.999)
    assert [h.chunk.chunk_id for h in exact] == [7]
    some = collection.search_hits(query, 50, min_score=0.5)
    assert some and all(h.score >= 0.5 for h in some)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_recall_at_10_vs_flat(kind: str) -> None:
    vectors = clustered(3000, seed=11)
    rng = np.random.default_rng(12)
    queries = unit(
        vectors[rng.choice(3000, 200, replace=False)] + 0.1 * rng.standard_normal((200, DIM))
    )
    ids = np.arange(3000, dtype=np.int64)
    flat, _ = build_index(vectors, ids, CollectionConfig(index="flat"))
    approximate, built = build_index(vectors, ids, CollectionConfig(index=kind))
    assert built == kind
    _, exact_ids = flat.search(queries, 10)
    _, found_ids = approximate.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact_ids, found_ids, strict=True)])
    assert recall >= 0.9, f"{kind} recall@10 {recall:.3f}"


# --------------------------------------------------------------------------------------------
# versions


def test_versions_switch_atomically_and_keep_the_previous_one(data_dir: Path) -> None:
    config = CollectionConfig(index="flat")
    directory = collection_dir(data_dir, "retail", "docs", None)
    assert write(data_dir, "retail", "docs", config, ["one"], clustered(1)) == "v0001"
    first = Collection.load(data_dir, "retail", "docs", config)

    writer = CollectionWriter(data_dir, "retail", "docs", config, DIM)
    writer.replace_source("other", [ChunkRecord("other", 0, "two")], clustered(1, seed=1), "d")
    # while a version is being built, readers see only the published one
    temps = [p for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert len(temps) == 1 and (temps[0] / "chunks.sqlite").is_file()
    assert (directory / CURRENT_FILE).read_text().strip() == "v0001"
    assert Collection.load(data_dir, "retail", "docs", config).size == 1
    with pytest.raises(FailedPrecondition, match="another ingestion"):
        CollectionWriter(data_dir, "retail", "docs", config, DIM)
    assert writer.commit() == "v0002"
    assert not any(p.name.startswith(TEMP_PREFIX) for p in directory.iterdir())
    second = Collection.load(data_dir, "retail", "docs", config)
    assert (second.version, second.size) == ("v0002", 2)  # started from the previous chunks
    assert sorted(c.text for c in second.chunks(range(2))) == ["one", "two"]

    with CollectionWriter(data_dir, "retail", "docs", config, DIM) as writer:
        assert writer.source_digest("other") == "d"
        assert writer.delete_source("other") and not writer.delete_source("other")
        assert writer.commit() == "v0003"
    versions = sorted(p.name for p in directory.iterdir() if p.name.startswith("v"))
    assert versions == ["v0002", "v0003"]  # the previous version is kept, older ones go
    assert (directory / CURRENT_FILE).read_text().strip() == "v0003"
    # a collection loaded before keeps serving after its files are gone
    assert [c.text for c in first.chunks([0])] == ["one"]
    assert first.search(clustered(1), 1)[1][0, 0] == 0

    with CollectionWriter(data_dir, "retail", "docs", config, DIM) as writer:
        writer.replace_source("x", [ChunkRecord("x", 0, "three")], clustered(1, seed=2), "e")
        # leaving without commit publishes nothing and leaves nothing behind
    assert Collection.load(data_dir, "retail", "docs", config).version == "v0003"
    assert sorted(p.name for p in directory.iterdir() if not p.name.startswith(".lock")) == [
        CURRENT_FILE,
        "v0002",
        "v0003",
    ]
    with pytest.raises(FailedPrecondition, match="dimension"):
        CollectionWriter(data_dir, "retail", "docs", config, DIM * 2)


def test_reload_swaps_while_searches_run(tmp_path: Path) -> None:
    loaded = make_config(tmp_path, retail={"docs": {"index": "flat"}, "later": {}})
    config = loaded.config.tenants["retail"].collections["docs"]
    vectors = clustered(200, seed=5)
    write(loaded.data_dir, "retail", "docs", config, [f"v1 {i}" for i in range(200)], vectors)
    tenant = TenantCollections.from_config(loaded, "retail")
    assert tenant.names() == ["docs"]
    with pytest.raises(NotFound, match="has not been ingested"):
        tenant.get("later")

    errors: list[BaseException] = []
    seen_versions: set[str] = set()
    stop = threading.Event()

    def search() -> None:
        try:
            while not stop.is_set():
                collection = tenant.get("docs")
                hits = collection.search_hits(vectors[3], 5, tags=[])
                assert len(hits) == 5
                assert hits[0].chunk.text.endswith(" 3")
                seen_versions.add(collection.version)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=search) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for round_ in range(2, 5):
            texts = [f"v{round_} {i}" for i in range(200)]
            version = write(loaded.data_dir, "retail", "docs", config, texts, vectors)
            assert tenant.reload("docs") == version
            assert tenant.get("docs").version == version
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not errors, errors
    assert tenant.get("docs").search_hits(vectors[3], 1)[0].chunk.text == "v4 3"
    assert tenant.get("docs").chunks([0]) == []  # ids are never reused across versions
    assert "v0004" in seen_versions or tenant.get("docs").version == "v0004"

    write(loaded.data_dir, "retail", "later", config, ["late"], clustered(1))
    assert tenant.reload("later") == "v0001" and tenant.names() == ["docs", "later"]


# --------------------------------------------------------------------------------------------
# isolation


CRAFTED_NAMES = [
    "../wholesale/collections/docs",
    "../../wholesale/collections/docs",
    "pricing",  # a collection of the other tenant only
    "",
    "a" * 10000,
    "x/../../y",
    "docs/../../../wholesale/collections/docs",
    "docs\x00",
    "\x00",
    "docs\n",
    "dócs",
    "ドキュメント",
    "docs/",
    "/docs",
    ".",
    "..",
    " docs",
    "DOCS",
]


def test_a_tenant_only_ever_reaches_its_own_chunks(tmp_path: Path) -> None:
    loaded = make_config(
        tmp_path,
        retail={"docs": {"index": "flat"}, "linked": {"index": "flat"}},
        wholesale={"docs": {"index": "flat"}, "pricing": {"index": "flat"}},
    )
    data_dir = loaded.data_dir
    retail_configs = loaded.config.tenants["retail"].collections
    wholesale_configs = loaded.config.tenants["wholesale"].collections
    vectors = clustered(20, seed=9)
    write(
        data_dir,
        "retail",
        "docs",
        retail_configs["docs"],
        [f"retail {i}" for i in range(20)],
        vectors,
    )
    for name in ("docs", "pricing"):
        texts = [f"wholesale secret {i}" for i in range(20)]
        write(data_dir, "wholesale", name, wholesale_configs[name], texts, vectors)
    # a configured name whose directory is a link into the other tenant
    os.symlink(
        data_dir / "wholesale" / "collections" / "docs",
        data_dir / "retail" / "collections" / "linked",
    )

    retail = TenantCollections.from_config(loaded, "retail")
    wholesale = TenantCollections.from_config(loaded, "wholesale")
    assert retail.names() == ["docs"]  # the linked one is refused at load
    for hit in retail.get("docs").search_hits(vectors[0], 20):
        assert hit.chunk.text.startswith("retail ")
    for hit in wholesale.get("docs").search_hits(vectors[0], 20):
        assert hit.chunk.text.startswith("wholesale ")

    flat = CollectionConfig(index="flat")
    for name in [*CRAFTED_NAMES, "linked"]:
        with pytest.raises(NotFound):
            retail.get(name)
        with pytest.raises(NotFound):
            retail.reload(name)
        with pytest.raises(NotFound):
            Collection.load(data_dir, "retail", name, retail_configs.get(name))
        with pytest.raises(NotFound):  # even with a config in hand, the tenant must have it
            Collection.load(data_dir, "retail", name, flat, configured=retail_configs)
        with pytest.raises(NotFound):
            CollectionWriter(data_dir, "retail", name, flat, DIM, configured=retail_configs)
    for name in CRAFTED_NAMES:
        if name in ("pricing", "DOCS", "linked"):
            continue  # valid names (another tenant's, or absent): refused only by configuration
        with pytest.raises(NotFound):
            collection_dir(data_dir, "retail", name, None)
    for tenant in ["../wholesale", "wholesale/..", "", "a" * 10000, "retail\x00", "rétail"]:
        with pytest.raises(NotFound):
            Collection.load(data_dir, tenant, "docs", flat)
        with pytest.raises(NotFound):
            TenantCollections(data_dir, tenant, {"docs": flat})
    # a tenant folder that links to another tenant's folder is refused too
    os.symlink(data_dir / "wholesale", data_dir / "mirror")
    assert TenantCollections(data_dir, "mirror", {"docs": flat}).names() == []
    with pytest.raises(NotFound):
        Collection.load(data_dir, "mirror", "docs", flat)
    error = pytest.raises(NotFound, retail.get, "a" * 10000)
    assert len(str(error.value)) < 300  # hostile names are not echoed in full
    # nothing was created outside the tenants' own collections
    assert sorted(p.name for p in (data_dir / "retail" / "collections").iterdir()) == [
        "docs",
        "linked",
    ]


def test_a_changed_index_configuration_alone_makes_a_new_version(data_dir: Path) -> None:
    flat = CollectionConfig(index="flat")
    write(data_dir, "retail", "docs", flat, [f"t{i}" for i in range(60)], clustered(60))
    with CollectionWriter(data_dir, "retail", "docs", flat, DIM) as writer:
        assert not writer.changed  # same settings, same chunks: nothing to publish
    searched = CollectionConfig(index="flat", description="new words", ivf={"nprobe": 3})
    with CollectionWriter(data_dir, "retail", "docs", searched, DIM) as writer:
        assert not writer.changed  # nothing the index is built with
    hnsw = CollectionConfig(index="hnsw")
    with CollectionWriter(data_dir, "retail", "docs", hnsw, DIM) as writer:
        assert writer.changed
        assert writer.commit() == "v0002"
    collection = Collection.load(data_dir, "retail", "docs", hnsw)
    assert (collection.index_kind, collection.size) == ("hnsw", 60)


# --------------------------------------------------------------------------------------------
# devices


def test_cuda_without_a_gpu_falls_back_to_the_cpu(data_dir: Path, caplog) -> None:
    """On machines without a GPU (or a CPU-only FAISS) `device: cuda` serves from the CPU."""
    if collections_module._gpu_available():
        pytest.skip("a GPU is present: the fallback cannot be observed here")
    config = CollectionConfig(index="flat")
    vectors = clustered(50)
    write(data_dir, "retail", "kb", config, [f"text {i}" for i in range(50)], vectors)
    with caplog.at_level("WARNING", logger=collections_module.__name__):
        collection = Collection.load(
            data_dir, "retail", "kb", config, device="cuda", configured={"kb": config}
        )
    assert collection.device == "cpu"
    assert "no GPU support" in caplog.text
    _, ids = collection.search(vectors[:3], 1)
    assert [c.text for c in collection.chunks(ids[:, 0])] == ["text 0", "text 1", "text 2"]


@pytest.mark.skipif(not collections_module._gpu_available(), reason="no GPU-enabled FAISS here")
def test_cuda_search_matches_the_cpu(data_dir: Path) -> None:
    config = CollectionConfig(index="flat")
    vectors = clustered(500)
    write(data_dir, "retail", "kb", config, [f"text {i}" for i in range(500)], vectors)
    cpu = Collection.load(data_dir, "retail", "kb", config, configured={"kb": config})
    gpu = Collection.load(
        data_dir, "retail", "kb", config, device="cuda", configured={"kb": config}
    )
    assert gpu.device == "cuda"
    np.testing.assert_array_equal(cpu.search(vectors[:20], 5)[1], gpu.search(vectors[:20], 5)[1])


def test_a_linked_version_folder_or_file_is_never_served(tmp_path: Path) -> None:
    loaded = make_config(
        tmp_path, retail={"docs": {"index": "flat"}}, wholesale={"docs": {"index": "flat"}}
    )
    data_dir = loaded.data_dir
    config = CollectionConfig(index="flat")
    vectors = clustered(20, seed=3)
    write(data_dir, "retail", "docs", config, [f"retail {i}" for i in range(20)], vectors)
    write(data_dir, "wholesale", "docs", config, [f"secret {i}" for i in range(20)], vectors)
    retail_dir = data_dir / "retail" / "collections" / "docs"
    wholesale_version = data_dir / "wholesale" / "collections" / "docs" / "v0001"
    retail = TenantCollections.from_config(loaded, "retail")
    assert retail.get("docs").version == "v0001"

    # A version folder that is a link to the other tenant's, made live through CURRENT.
    os.symlink(wholesale_version, retail_dir / "v0002")
    (retail_dir / CURRENT_FILE).write_text("v0002\n")
    with pytest.raises(NotFound):
        retail.reload("docs")
    for hit in retail.get("docs").search_hits(vectors[0], 20):  # still the old, own version
        assert hit.chunk.text.startswith("retail ")
    with pytest.raises(NotFound):
        Collection.load(data_dir, "retail", "docs", config)

    # A real version folder whose chunk store is a link to the other tenant's.
    (retail_dir / "v0002").unlink()
    (retail_dir / "v0002").mkdir()
    for part in (wholesale_version).iterdir():
        target = retail_dir / "v0002" / part.name
        if part.name.startswith("chunks"):
            os.symlink(part, target)
        else:
            target.write_bytes(part.read_bytes())
    with pytest.raises(NotFound):
        retail.reload("docs")
    for hit in retail.get("docs").search_hits(vectors[0], 20):
        assert hit.chunk.text.startswith("retail ")
