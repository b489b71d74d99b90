"""A collection's lexical (BM25) index, kept beside its chunks in the SQLite store.

Every chunk's title and text are cut into terms (:func:`terms`: NFKD, diacritics removed,
casefolded, runs of letters and digits). At commit the writer stores each term's document
frequency and where its postings start (``lexicon``), and in ``lexical`` the chunk ids in row
order and every posting: a row and its BM25 weight without the idf (Okapi BM25, k1 1.2,
b 0.75, the average length taken over the whole version). A loaded collection holds the
postings in memory (8 bytes each); a search looks its terms up in the store, nominates the
chunks best by BM25 over the question's discriminating terms (:meth:`LexicalIndex.nominate`:
those in at most 10% of the chunks, so the long lists of common words are never read whole),
and scores each pooled chunk on every term by binary search (:meth:`LexicalIndex.score_rows`).

Why not SQLite FTS5 and its ``bm25()``: measured at 100,000 chunks, ``bm25()`` costs about
5 µs per matching row, 200-500 ms for a question whose words are common, and reading the
postings back out of the store as blobs at each search cost ~3 ms; held in memory, even
scoring every posting of such a question (~80,000) took about a millisecond.

A store written before this index existed has no ``lexical`` table; :func:`has_lexical_index`
tells, and such a collection is searched by its vectors alone until it is re-ingested.
"""

from __future__ import annotations

import math
import re
import sqlite3
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

LEXICAL_FORMAT = "words-nfkd-casefold+bm25-weights-v2"
"""Names how :func:`terms` cuts text and how the postings are stored; a store written another
way is not read."""

K1 = 1.2
B = 0.75
MAX_TERM_CHARS = 64  # longer runs (hashes, encoded blobs) are not words anyone searches for
MAX_QUERY_TERMS = 64
NOMINATING_DF = 0.1  # a term in more of the chunks than this share nominates no candidate
RRF_K = 60  # reciprocal rank fusion's usual constant
_BLOCK = 5_000  # chunks tokenised between two flushes of the postings buffers

_WORD = re.compile(r"[^\W_]+")
_COMBINING = re.compile("[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]")

SCHEMA = """
CREATE TABLE IF NOT EXISTS lexicon (
    term TEXT PRIMARY KEY,
    df INTEGER NOT NULL,
    start INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS lexical (key TEXT PRIMARY KEY, value BLOB NOT NULL);
"""


def terms(text: str) -> list[str]:
    """The terms of ``text`` in order: NFKD, combining marks removed, casefolded, then each
    run of letters and digits (at most :data:`MAX_TERM_CHARS` long) is a term."""
    folded = _COMBINING.sub("", unicodedata.normalize("NFKD", text)).casefold()
    return [word for word in _WORD.findall(folded) if len(word) <= MAX_TERM_CHARS]


def query_terms(text: str) -> list[str]:
    """The distinct terms of a question, first occurrence first, at most
    :data:`MAX_QUERY_TERMS`."""
    return list(dict.fromkeys(terms(text)))[:MAX_QUERY_TERMS]


def has_lexical_index(connection: sqlite3.Connection) -> bool:
    """Whether the store holds a lexical index written with this module's tokenizer."""
    tables = {
        row[0]
        for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('lexicon', 'lexical')"
        )
    }
    if tables != {"lexicon", "lexical"}:
        return False
    found = connection.execute("SELECT value FROM lexical WHERE key = 'format'").fetchone()
    return found is not None and bytes(found[0]).decode("utf-8", "replace") == LEXICAL_FORMAT


def write_lexical_index(
    connection: sqlite3.Connection, chunks: Iterable[tuple[int, str, str]]
) -> int:
    """Replace the store's lexical index with one over ``chunks`` (``(chunk_id, title, text)``
    in ascending id order); the number of distinct terms."""
    vocabulary: dict[str, int] = {}
    term_parts: list[np.ndarray] = []
    row_parts: list[np.ndarray] = []
    tf_parts: list[np.ndarray] = []
    ids: list[int] = []
    lengths: list[int] = []
    buffer_terms: list[int] = []
    buffer_rows: list[int] = []
    buffer_tfs: list[int] = []

    def flush() -> None:
        if buffer_terms:
            term_parts.append(np.asarray(buffer_terms, dtype=np.int32))
            row_parts.append(np.asarray(buffer_rows, dtype=np.int32))
            tf_parts.append(np.asarray(buffer_tfs, dtype=np.int32))
            buffer_terms.clear()
            buffer_rows.clear()
            buffer_tfs.clear()

    previous = None
    for row, (chunk_id, title, text) in enumerate(chunks):
        if previous is not None and chunk_id <= previous:
            raise ValueError("chunks must come in ascending chunk_id order")
        previous = chunk_id
        words = terms(f"{title}\n{text}" if title else text)
        ids.append(int(chunk_id))
        lengths.append(len(words))
        counts: dict[int, int] = {}
        for word in words:
            term_id = vocabulary.setdefault(word, len(vocabulary))
            counts[term_id] = counts.get(term_id, 0) + 1
        buffer_terms.extend(counts)
        buffer_rows.extend([row] * len(counts))
        buffer_tfs.extend(counts.values())
        if row % _BLOCK == _BLOCK - 1:
            flush()
    flush()
    # one statement at a time: executescript would commit the writer's open transaction
    connection.execute("DROP TABLE IF EXISTS lexicon")
    connection.execute("DROP TABLE IF EXISTS lexical")
    for statement in SCHEMA.split(";"):
        if statement.strip():
            connection.execute(statement)
    term_ids = np.concatenate(term_parts) if term_parts else np.zeros(0, np.int32)
    rows = np.concatenate(row_parts) if row_parts else np.zeros(0, np.int32)
    tfs = np.concatenate(tf_parts).astype(np.float32) if tf_parts else np.zeros(0, np.float32)
    order = np.argsort(term_ids, kind="stable")  # rows stay ascending within a term
    term_ids, rows, tfs = term_ids[order], rows[order], tfs[order]
    length = np.asarray(lengths, dtype=np.float32)
    average = float(length.mean()) if len(length) and length.mean() > 0 else 1.0
    # BM25 but for the idf, which depends only on a term's df: computed at search time
    weights = tfs * (K1 + 1.0) / (tfs + K1 * (1.0 - B + B * length[rows] / average))
    if len(term_ids):
        bounds = np.flatnonzero(np.diff(term_ids)) + 1
        starts = np.concatenate(([0], bounds))
        counts = np.diff(np.concatenate((starts, [len(term_ids)])))
        words = list(vocabulary)
        connection.executemany(
            "INSERT INTO lexicon (term, df, start) VALUES (?, ?, ?)",
            (
                (words[int(term_ids[at])], int(count), int(at))
                for at, count in zip(starts.tolist(), counts.tolist(), strict=True)
            ),
        )
    connection.executemany(
        "INSERT INTO lexical (key, value) VALUES (?, ?)",
        [
            ("format", LEXICAL_FORMAT.encode()),
            ("ids", np.asarray(ids, dtype="<i8").tobytes()),
            ("rows", rows.astype(np.int32).tobytes()),
            ("weights", weights.astype(np.float32).tobytes()),
        ],
    )
    return len(vocabulary)


class LexicalIndex:
    """BM25 over one store's lexical index: the postings held in memory (8 bytes each), the
    terms looked up in the store (through the caller's connection, under the caller's lock)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        values = dict(connection.execute("SELECT key, value FROM lexical").fetchall())
        self.ids = np.frombuffer(values["ids"], dtype="<i8").astype(np.int64)
        # read-only views of the store's bytes: 8 bytes a posting, no copy
        self._rows = np.frombuffer(values["rows"], dtype=np.int32)
        self._weights = np.frombuffer(values["weights"], dtype=np.float32)
        if len(self._rows) != len(self._weights):
            raise ValueError("the lexical index's rows and weights differ in length")
        self.size = len(self.ids)
        if len(self._rows) and int(self._rows.max()) >= self.size:
            raise ValueError("the lexical index names rows past its chunks")
        self.postings_count = len(self._rows)

    def postings(self, connection: sqlite3.Connection, words: Sequence[str]) -> list[slice]:
        """Where each of ``words`` that the index holds has its postings."""
        if not words:
            return []
        marks = ",".join("?" * len(words))
        found = connection.execute(
            f"SELECT df, start FROM lexicon WHERE term IN ({marks})", list(words)
        ).fetchall()
        return [slice(int(start), int(start) + int(df)) for df, start in found]

    def _idf(self, span: slice) -> np.float32:
        df = span.stop - span.start
        return np.float32(math.log1p((self.size - df + 0.5) / (df + 0.5)))

    def scores(self, postings: Sequence[slice]) -> np.ndarray:
        """BM25 of every row (0 where no term occurs), float32 ``[size]``."""
        if not postings or self.size == 0:
            return np.zeros(self.size, dtype=np.float32)
        rows = [self._rows[span] for span in postings]
        weights = [self._weights[span] * self._idf(span) for span in postings]
        return np.bincount(
            np.concatenate(rows), weights=np.concatenate(weights), minlength=self.size
        ).astype(np.float32)

    def nominate(self, postings: Sequence[slice], n: int) -> np.ndarray:
        """The rows of the ``n`` best chunks by BM25 over the question's discriminating terms,
        best first: those held by at most :data:`NOMINATING_DF` of the chunks (else the
        rarest of them). Common words still count in :meth:`score_rows`, but a chunk that
        holds nothing else is no lexical candidate, and a search never reads their long
        posting lists."""
        if not postings or self.size == 0 or n < 1:
            return np.zeros(0, dtype=np.int64)
        limit = max(1, int(NOMINATING_DF * self.size))
        chosen = [span for span in postings if span.stop - span.start <= limit]
        if not chosen:  # only common words: the rarest of them (all, when they tie)
            rarest = min(span.stop - span.start for span in postings)
            chosen = [span for span in postings if span.stop - span.start == rarest]
        rows = np.concatenate([self._rows[span] for span in chosen])
        weights = np.concatenate([self._weights[span] * self._idf(span) for span in chosen])
        if len(chosen) == 1:  # one term: its rows are already distinct
            unique, totals = rows, weights
        elif len(rows) * 16 > self.size:  # many postings: a dense tally beats sorting them
            dense = np.bincount(rows, weights=weights, minlength=self.size)
            unique = np.flatnonzero(dense)
            totals = dense[unique]
        else:
            unique, inverse = np.unique(rows, return_inverse=True)
            totals = np.bincount(inverse, weights=weights, minlength=len(unique))
        best = np.argpartition(-totals, n - 1)[:n] if len(unique) > n else np.arange(len(unique))
        best = best[np.argsort(-totals[best], kind="stable")]
        return unique[best].astype(np.int64)

    def score_rows(self, postings: Sequence[slice], rows: np.ndarray) -> np.ndarray:
        """BM25 over every term of the question for the given rows (0 for -1), float32: a
        binary search of each term's postings (rows ascend within a term)."""
        wanted = np.asarray(rows, dtype=np.int64)
        out = np.zeros(len(wanted), dtype=np.float32)
        if not len(wanted):
            return out
        for span in postings:
            held = self._rows[span]
            if not len(held):
                continue
            at = np.minimum(np.searchsorted(held, wanted), len(held) - 1)
            found = held[at] == wanted
            out += np.where(found, self._weights[span][at] * self._idf(span), 0.0).astype(
                np.float32
            )
        return out

    def rows_of(self, chunk_ids: np.ndarray) -> np.ndarray:
        """The row of each chunk id (-1 where the index does not hold it)."""
        wanted = np.asarray(chunk_ids, dtype=np.int64)
        if self.size == 0:
            return np.full(len(wanted), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.ids, wanted), self.size - 1)
        return np.where(self.ids[at] == wanted, at, -1)


def fuse(cosines: np.ndarray, lexical: np.ndarray, fusion: str, weight: float) -> np.ndarray:
    """One relevance in [0, 1] per candidate from its cosine and its BM25 score.

    ``blend``: ``(1 - weight)`` x the cosine min-max scaled over the candidates plus
    ``weight`` x BM25 over the candidates' best BM25 (0 without a term in common).
    ``rrf`` (reciprocal rank fusion): ``(1 - weight) / (60 + dense rank) + weight / (60 +
    lexical rank)``, a candidate without a term in common taking no lexical part, scaled so
    that first in both lists is 1.
    """
    cos = np.asarray(cosines, dtype=np.float64)
    bm = np.asarray(lexical, dtype=np.float64)
    if len(cos) == 0:
        return np.zeros(0, dtype=np.float32)
    if fusion == "rrf":
        dense_rank = np.empty(len(cos))
        dense_rank[np.argsort(-cos, kind="stable")] = np.arange(1, len(cos) + 1)
        lexical_rank = np.empty(len(bm))
        lexical_rank[np.argsort(-bm, kind="stable")] = np.arange(1, len(bm) + 1)
        fused = (1.0 - weight) / (RRF_K + dense_rank) + np.where(
            bm > 0, weight / (RRF_K + lexical_rank), 0.0
        )
        fused *= RRF_K + 1
    elif fusion == "blend":
        low, high = float(cos.min()), float(cos.max())
        dense = (cos - low) / (high - low) if high > low else np.ones_like(cos)
        best = float(bm.max())
        fused = (1.0 - weight) * dense + weight * (bm / best if best > 0 else 0.0)
    else:
        raise ValueError(f"unknown fusion {fusion!r} (expected 'blend' or 'rrf')")
    return fused.astype(np.float32)
