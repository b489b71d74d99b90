"""Retrieval quality on a BEIR-layout dataset (StackFAQ): exact search and the served path.

The corpus (title + text) is embedded by the bulk encoder, every judged query is searched
exactly (FAISS ``IndexFlatIP``) and scored: recall@1, recall@5, MRR@10 and nDCG@10 (linear
gains from the qrels scores, as trec_eval / BEIR; a result that is the query itself is
ignored, as BEIR does). Then the same queries go through the served path
(:mod:`bench.retrieval.served`: the corpus ingested as a collection, each query a ``Stitch``
call) and are scored the same way. The folder's README is quoted for comparison.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench import api
from bench.report import fence, markdown_table, say
from bench.retrieval import dev_split
from bench.retrieval import served as served_path

K = 10
README_MAX_CHARS = 100_000
ENCODE_BLOCK = 1024  # texts per encoder call (it sorts each call by length: less padding)


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
        rows = api.jsonl_objects(handle, lambda message: DataError(f"{path}: {message}"))
        for number, record in rows:
            record_id = record.get("_id", record.get("id"))
            if record_id is None or not isinstance(record.get("text", ""), str):
                raise DataError(f"{path}: line {number}: expected '_id' and a string 'text'")
            yield record


def load_corpus(path: Path) -> tuple[list[str], list[str]]:
    """``(ids, title + text)`` of every document."""
    ids, texts, _ = load_corpus_titles(path)
    return ids, texts


def load_corpus_titles(path: Path) -> tuple[list[str], list[str], list[str]]:
    """``(ids, title + text, titles)`` of every document."""
    ids, texts, titles = [], [], []
    for record in _records(path):
        title = record.get("title") or ""
        text = record.get("text") or ""
        ids.append(str(record.get("_id", record.get("id"))))
        texts.append(f"{title} {text}".strip() if isinstance(title, str) else text)
        titles.append(title if isinstance(title, str) else "")
    if not ids:
        raise DataError(f"{path}: no documents")
    return ids, texts, titles


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


def run(
    folder: Path, files: dict[str, Path], served: bool = True, dev: bool = True
) -> dict[str, Any]:
    """The exact-search metrics; with ``dev``, the fusion grid on the corpus-made dev split
    (:func:`bench.retrieval.dev_split.run`); with ``served``, the served path's metrics
    (:func:`bench.retrieval.served.run`)."""
    import faiss

    started = time.monotonic()
    say(f"[stackfaq] reading {folder}")
    doc_ids, doc_texts, doc_titles = load_corpus_titles(files["corpus"])
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
    encoder = api.bulk_encoder()
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
    dev_part: dict[str, Any] = {"run": False, "reason": "skipped (--skip-dev-split)"}
    if dev:
        dev_part = dev_split.run(files["corpus"])
    served_part: dict[str, Any] = {"run": False, "reason": "skipped (--skip-served)"}
    if served:
        titles = [t for t in doc_titles if t.strip()]
        served_part = served_path.run(files["corpus"], titles, queries, evaluated, query_metrics)
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
        "dev_split": dev_part,
        "served": served_part,
        "readme": readme_files(folder),
        "seconds": round(time.monotonic() - started, 1),
    }


def markdown(part: dict[str, Any]) -> str:
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
            f"{fence(item['text'])}"
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
            "### Choosing the fusion on a dev split made from the corpus",
            "",
            dev_split.markdown(part.get("dev_split") or {"run": False, "reason": "not run"}),
            "",
            "### Through the served path (ingested collection, Stitch in process)",
            "",
            served_markdown(part.get("served") or {"run": False, "reason": "not measured"}, m),
            "",
            "### Reference numbers (from the dataset folder's README)",
            "",
            readme,
        ]
    )


def served_markdown(part: dict[str, Any], exact: dict[str, float]) -> str:
    """The served-path rows beside the exact search's."""
    if not part.get("run"):
        return f"Not run: {part['reason']}."
    rows = [["exact search over whole entries (above)", "flat", "-", "-", "-"]]
    rows[0] += [f"{exact[k]:.3f}" for k in ("recall@1", "recall@5", "mrr@10", "ndcg@10")]
    rows[0] += ["-", "-"]
    for row in part["rows"]:
        m = row["metrics"]
        hybrid = row["hybrid"]
        setting = (
            f"{hybrid.get('fusion', 'blend')}, bm25_weight {hybrid.get('bm25_weight')}"
            if row["hybrid_active"]
            else "vectors alone"
        )
        rows.append(
            [
                row["variant"],
                row["index"],
                f"{row['chunks']:,}",
                setting,
                row["distinct_entries_min"],
                *[f"{m[k]:.3f}" for k in ("recall@1", "recall@5", "mrr@10", "ndcg@10")],
                f"{row['stitch_us']['p50']:,.0f}",
                f"{row['stitch_us']['p99']:,.0f}",
            ]
        )
    table = markdown_table(
        [
            "search",
            "index",
            "chunks",
            "scores",
            "fewest entries in a result",
            "recall@1",
            "recall@5",
            "MRR@10",
            "nDCG@10",
            "Stitch p50 µs",
            "Stitch p99 µs",
        ],
        rows,
    )
    ingest = part["ingest"]
    notes = [
        f"The corpus file is ingested by path into one collection with the default "
        f"`CollectionConfig` ({ingest['chunks']} chunks, {ingest['duplicates_dropped']} "
        f"duplicates dropped, {ingest['seconds']} s); each chunk is embedded with its entry's "
        "title on the line before its text.",
        f"Each query is one `pipeline.stitch()` call in process (prep, route, policy, stitch: "
        f"the query encoded, {part['chunks_per_query']} chunks retrieved, the prompt "
        "assembled), one at a time; the ranking is the placed pieces' order, each entry "
        "counted at its first chunk. The Stitch columns time the whole call.",
        "The collection source keeps its default `min_score` 0 (chunks of negative cosine "
        "are left out, so a result can hold fewer than ten entries).",
        "The variants search the same ingested version with another `hybrid` setting "
        "(search-time only), each in its own `Plexus`, taking turns query by query.",
    ]
    return "\n".join(["\n".join(f"- {n}" for n in notes), "", table])
