"""Hybrid search: the lexical (BM25) index in the chunk store, fusion, and old collections.

Real FAISS indexes and real SQLite files; BM25 is checked against a plain-Python reference on
generated corpora, and the fused ranking against one computed from the two scores by hand.
"""

from __future__ import annotations

import logging
import math
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from router.config import CollectionConfig
from router.context.collections import CHUNKS_FILE, Collection, CollectionWriter
from router.context.ingest import TITLE_TOKENS, embedding_text, read_documents
from router.context.lexical import (
    K1,
    NOMINATING_DF,
    B,
    LexicalIndex,
    fuse,
    has_lexical_index,
    query_terms,
    terms,
    write_lexical_index,
)
from router.context.types import ChunkRecord
from router.routing.encoder import plain_tokenizer

from .test_collections import DIM, clustered, unit

# --------------------------------------------------------------------------------------------
# terms and BM25


def test_terms_fold_case_and_accents_and_split_on_everything_else() -> None:
    assert terms("Café AU-LAIT, naïve_user's 2nd résumé!") == [
        "cafe",
        "au",
        "lait",
        "naive",
        "user",
        "s",
        "2nd",
        "resume",
    ]
    assert terms("ﬁle №5") == ["file", "no5"]  # NFKD folds ligatures and compatibility forms
    assert terms("x" * 65 + " ok") == ["ok"]  # runs too long to be words are left out
    assert query_terms("the cat and the hat THE") == ["the", "cat", "and", "hat"]


def reference_bm25(documents: list[list[str]], query: list[str]) -> list[float]:
    """Okapi BM25 written out plainly, as the index must compute it."""
    n = len(documents)
    average = sum(map(len, documents)) / n if n else 0.0
    average = average or 1.0
    scores = []
    for words in documents:
        counts = Counter(words)
        score = 0.0
        for term in dict.fromkeys(query):
            df = sum(1 for other in documents if term in other)
            tf = counts.get(term, 0)
            if tf == 0:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            score += idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * len(words) / average))
        scores.append(score)
    return scores


WORDS = st.sampled_from(["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "yuzu"])


@settings(max_examples=60, deadline=None)
@given(
    documents=st.lists(st.lists(WORDS, min_size=0, max_size=12), min_size=1, max_size=25),
    query=st.lists(WORDS | st.just("absent"), min_size=1, max_size=5),
)
def test_bm25_matches_the_reference(documents: list[list[str]], query: list[str]) -> None:
    connection = sqlite3.connect(":memory:")
    chunks = [(10 + 3 * i, "", " ".join(words)) for i, words in enumerate(documents)]
    write_lexical_index(connection, chunks)
    index = LexicalIndex(connection)
    scores = index.scores(index.postings(connection, query_terms(" ".join(query))))
    np.testing.assert_allclose(scores, reference_bm25(documents, query), rtol=1e-5, atol=1e-6)
    ids = np.array([c[0] for c in chunks] + [11, 999], dtype=np.int64)
    assert index.rows_of(ids).tolist() == [*range(len(chunks)), -1, -1]


@settings(max_examples=60, deadline=None)
@given(
    documents=st.lists(st.lists(WORDS, min_size=0, max_size=12), min_size=1, max_size=40),
    query=st.lists(WORDS | st.just("absent"), min_size=1, max_size=5),
    n=st.integers(1, 10),
)
def test_nominees_and_row_scores_match_the_reference(
    documents: list[list[str]], query: list[str], n: int
) -> None:
    connection = sqlite3.connect(":memory:")
    write_lexical_index(connection, [(i, "", " ".join(words)) for i, words in enumerate(documents)])
    index = LexicalIndex(connection)
    words = query_terms(" ".join(query))
    postings = index.postings(connection, words)
    full = np.array(reference_bm25(documents, words))
    rows = np.array([*range(len(documents)), -1], dtype=np.int64)
    np.testing.assert_allclose(index.score_rows(postings, rows), [*full, 0.0], rtol=1e-5, atol=1e-6)
    limit = max(1, int(NOMINATING_DF * len(documents)))
    df = {w: sum(w in d for d in documents) for w in words if any(w in d for d in documents)}
    rare = [w for w in df if df[w] <= limit] or [w for w in df if df[w] == min(df.values())]
    partial = np.array(reference_bm25(documents, rare)) if rare else np.zeros(len(documents))
    nominees = index.nominate(postings, n)
    assert len(nominees) == min(n, int((partial > 0).sum()))
    assert all(
        partial[nominees[j]] >= partial[nominees[j + 1]] - 1e-5 for j in range(len(nominees) - 1)
    )
    if len(nominees):  # nobody left out scores above the last nominee
        left_out = np.setdiff1d(np.arange(len(documents)), nominees)
        assert all(partial[i] <= partial[nominees[-1]] + 1e-5 for i in left_out)


def test_titles_count_as_words_and_ids_must_ascend() -> None:
    connection = sqlite3.connect(":memory:")
    write_lexical_index(connection, [(1, "Gift cards", "never expire"), (2, "", "gift wrap")])
    index = LexicalIndex(connection)
    scores = index.scores(index.postings(connection, ["cards"]))
    assert scores[0] > 0 and scores[1] == 0
    with pytest.raises(ValueError, match="ascending"):
        write_lexical_index(connection, [(5, "", "a"), (5, "", "b")])


def test_an_empty_store_has_an_empty_index() -> None:
    connection = sqlite3.connect(":memory:")
    write_lexical_index(connection, [])
    assert has_lexical_index(connection)
    index = LexicalIndex(connection)
    assert index.size == 0
    assert index.scores(index.postings(connection, ["anything"])).shape == (0,)


# --------------------------------------------------------------------------------------------
# fusion


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(
        st.tuples(st.floats(-1, 1, allow_nan=False), st.floats(0, 30, allow_nan=False, width=32)),
        min_size=1,
        max_size=40,
    ),
    fusion=st.sampled_from(["blend", "rrf"]),
    weight=st.floats(0, 1),
)
@example(values=[(-1.0, 0.0), (-1.0, 0.0), (0.0, 0.0), (0.0, 0.0)], fusion="rrf", weight=0.0)
def test_fused_scores_lie_in_unit_range(
    values: list[tuple[float, float]], fusion: str, weight: float
) -> None:
    cos = np.array([v[0] for v in values], dtype=np.float32)
    bm = np.array([v[1] for v in values], dtype=np.float32)
    fused = fuse(cos, bm, fusion, weight)
    assert fused.shape == cos.shape and fused.dtype == np.float32
    assert np.all(fused >= 0) and np.all(fused <= 1 + 1e-6)
    # vectors alone: cosine order, wherever the scaled scores stay apart (cosines 1e-37 apart
    # scale to the same float); equal cosines may come in either order
    if weight == 0 and len(set(fused.tolist())) == len(cos):
        ranked = cos[np.argsort(-fused, kind="stable")]
        assert np.all(ranked[:-1] >= ranked[1:])


def test_fusion_kinds() -> None:
    cos = np.array([0.9, 0.5, 0.1], dtype=np.float32)
    bm = np.array([0.0, 4.0, 8.0], dtype=np.float32)
    np.testing.assert_allclose(fuse(cos, bm, "blend", 0.25), [0.75, 0.375 + 0.125, 0.25])
    assert fuse(cos, bm, "blend", 1.0).argmax() == 2
    both_first = fuse(np.array([0.9, 0.1]), np.array([5.0, 1.0]), "rrf", 0.5)
    assert both_first[0] == pytest.approx(1.0)
    assert fuse(cos, bm, "rrf", 0.0)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse(cos, bm, "max", 0.5)
    assert fuse(np.array([]), np.array([]), "blend", 0.5).shape == (0,)


# --------------------------------------------------------------------------------------------
# collections


TEXTS = [
    "gift cards never expire and work in any store",
    "returns are accepted within thirty days with a receipt",
    "the model QX7781 blender carries a five year warranty",
    "express shipping arrives the next business day",
    "stores open at nine and close at nine",
    "gold members earn two points per dollar",
]


def build(data_dir: Path, config: CollectionConfig, vectors: np.ndarray, tags=None) -> str:
    chunks = [
        ChunkRecord("doc", i, text, tuple(tags[i]) if tags else (), "")
        for i, text in enumerate(TEXTS)
    ]
    with CollectionWriter(data_dir, "retail", "docs", config, DIM) as writer:
        writer.replace_source("doc", chunks, vectors, "digest")
        return writer.commit()


def test_hybrid_ranks_by_the_fused_score(tmp_path: Path) -> None:
    vectors = clustered(len(TEXTS), seed=3)
    config = CollectionConfig(index="flat", hybrid={"bm25_weight": 0.6, "candidates": 3})
    build(tmp_path, config, vectors)
    collection = Collection.load(tmp_path, "retail", "docs", config)
    assert collection.hybrid_active and collection.meta["lexical"]["terms"] > 20
    query = unit((vectors[0] + 0.3 * vectors[1]).reshape(1, -1))[0]
    text = "which blender has the QX7781 warranty"
    hits = collection.search_hits(query, 3, text=text)

    # by hand: the 3 nearest chunks and the 3 best by BM25 over the discriminating words
    # (held by at most max(1, 10%) of the chunks), pooled and fused on full BM25
    cos = unit(vectors) @ query
    documents = [terms(t) for t in TEXTS]
    words = query_terms(text)
    rare = [w for w in words if sum(w in d for d in documents) == 1]
    assert sorted(rare) == ["blender", "qx7781", "warranty"]
    nominee_scores = np.array(reference_bm25(documents, rare))
    nominees = [int(i) for i in np.argsort(-nominee_scores, kind="stable")[:3]]
    nominees = [i for i in nominees if nominee_scores[i] > 0]
    bm = np.array(reference_bm25(documents, words))
    pooled = list(dict.fromkeys(np.argsort(-cos)[:3].tolist() + nominees))
    fused = fuse(cos[pooled], bm[pooled], "blend", 0.6)
    expected = [pooled[j] for j in np.argsort(-fused, kind="stable")]
    assert [h.chunk.chunk_id for h in hits] == expected[:3]
    np.testing.assert_allclose([h.score for h in hits], np.sort(fused)[::-1][:3], rtol=1e-5)
    assert hits[0].chunk.position == 2  # the only chunk naming QX7781, far from the vector
    assert 2 not in np.argsort(-cos)[:3].tolist()

    dense = collection.search_hits(query, 3)  # no text: vectors alone, cosine scores
    assert [h.chunk.chunk_id for h in dense] == np.argsort(-cos)[:3].tolist()
    np.testing.assert_allclose([h.score for h in dense], np.sort(cos)[::-1][:3], rtol=1e-5)
    off = CollectionConfig(index="flat", hybrid={"bm25_weight": 0})
    plain = Collection.load(tmp_path, "retail", "docs", off)
    assert not plain.hybrid_active
    assert [h.chunk.chunk_id for h in plain.search_hits(query, 3, text=text)] == [
        h.chunk.chunk_id for h in dense
    ]


def test_min_score_and_tags_still_hold_in_hybrid_search(tmp_path: Path) -> None:
    vectors = clustered(len(TEXTS), seed=4)
    tags = [["a"], ["b"], ["b"], ["a"], ["b"], ["a"]]
    config = CollectionConfig(index="flat", hybrid={"bm25_weight": 0.9, "candidates": 1})
    build(tmp_path, config, vectors, tags)
    collection = Collection.load(tmp_path, "retail", "docs", config)
    query = vectors[0]
    cos = unit(vectors) @ query
    text = "QX7781 blender warranty"
    floor = float(cos[2]) + 1e-3  # the BM25 favourite's cosine is below the floor
    searches = []
    real_search = collection.search

    def counted(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        searches.append(k)
        return real_search(vectors, k)

    collection.search = counted  # type: ignore[method-assign]  # the real search, counted
    hits = collection.search_hits(query, 6, min_score=floor, text=text)
    assert hits and 2 not in [h.chunk.chunk_id for h in hits]
    assert all(cos[h.chunk.chunk_id] >= floor - 1e-6 for h in hits)
    searches.clear()
    # five chunks hold one of these words, more than the pool's two; one passes the floor
    alone = collection.search_hits(query, 2, min_score=0.999, text="the and a in")
    assert [h.chunk.chunk_id for h in alone] == [0]
    assert searches == [2]  # fewer than k passed, and without tags that is the answer
    tagged = collection.search_hits(query, 2, tags=["b"], text="returns thirty days")
    assert len(tagged) == 2 and all("b" in h.chunk.tags for h in tagged)
    assert tagged[0].chunk.position == 1
    searches.clear()
    rare = collection.search_hits(query, 2, min_score=-1.0, tags=["c"], text="returns")
    assert rare == [] and searches[-1] == collection.size  # a tag filter looks all the way


def test_a_collection_from_before_the_lexical_index_serves_and_reingest_adds_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vectors = clustered(len(TEXTS), seed=5)
    config = CollectionConfig(index="flat")
    build(tmp_path, config, vectors)
    store = tmp_path / "retail/collections/docs/v0001" / CHUNKS_FILE
    with sqlite3.connect(store) as old:  # as an earlier release wrote it
        old.execute("DROP TABLE lexicon")
        old.execute("DROP TABLE lexical")
    with caplog.at_level(logging.WARNING, logger="router.context.collections"):
        collection = Collection.load(tmp_path, "retail", "docs", config)
    assert collection.lexical is None and not collection.hybrid_active
    assert "re-ingest it" in caplog.text and "vectors alone" in caplog.text
    hits = collection.search_hits(vectors[1], 2, text="QX7781")
    assert hits[0].chunk.position == 1 and hits[0].score == pytest.approx(1.0, abs=1e-5)

    with CollectionWriter(tmp_path, "retail", "docs", config, DIM) as writer:
        assert writer.changed  # nothing else changed, and still a new version is due
        version = writer.commit()
    renewed = Collection.load(tmp_path, "retail", "docs", config)
    assert (version, renewed.hybrid_active) == ("v0002", True)
    scores = {h.chunk.position: h.score for h in renewed.search_hits(vectors[1], 6, text="QX7781")}
    assert len(scores) == 6 and min(scores.values()) == 0.0  # fused: the farthest, no words
    assert scores[2] >= renewed.hybrid.bm25_weight  # the one chunk naming it gets BM25's share


def test_a_damaged_lexical_index_falls_back_to_vectors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vectors = clustered(len(TEXTS), seed=6)
    config = CollectionConfig(index="flat")
    build(tmp_path, config, vectors)
    store = tmp_path / "retail/collections/docs/v0001" / CHUNKS_FILE
    with sqlite3.connect(store) as db:
        db.execute("DELETE FROM lexical WHERE key = 'weights'")
    with caplog.at_level(logging.WARNING, logger="router.context.collections"):
        collection = Collection.load(tmp_path, "retail", "docs", config)
    assert collection.lexical is None and "unreadable lexical index" in caplog.text
    assert len(collection.search_hits(vectors[0], 3, text="gift cards")) == 3


# --------------------------------------------------------------------------------------------
# what ingestion embeds


def test_a_chunk_is_embedded_with_the_start_of_its_title() -> None:
    chunk = ChunkRecord("s", 0, "Use two tildes.", (), "Strikethrough in Markdown")
    assert embedding_text(chunk) == "Strikethrough in Markdown\nUse two tildes."
    assert embedding_text(ChunkRecord("s", 0, "Untitled text.")) == "Untitled text."
    long_title = " ".join(f"word{i}" for i in range(200))
    cut = embedding_text(ChunkRecord("s", 0, "body", (), long_title)).split("\n")[0]
    assert long_title.startswith(cut)
    count = len(plain_tokenizer().encode(cut, add_special_tokens=False).ids)
    assert TITLE_TOKENS - 3 <= count <= TITLE_TOKENS


def test_json_lines_records_may_name_their_id_as_beir_does(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text(
        '{"_id": "d7", "title": "Strikethrough", "text": "Use tildes."}\n'
        '{"id": "x1", "_id": "ignored", "text": "An id wins over _id."}\n',
        encoding="utf-8",
    )
    documents, skipped = read_documents([path])
    assert not skipped
    assert [d.source for d in documents] == ["corpus.jsonl#d7", "corpus.jsonl#x1"]
