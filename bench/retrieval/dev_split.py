"""Choosing the hybrid fusion on a split made from the corpus alone (never its queries).

The dev task: each entry's title is the question, and the entries' answers alone (titles left
out of both the embeddings and the BM25 index) are the collection. Each entry is chunked as
ingestion chunks it (the default ``CollectionConfig``), its chunks embedded by the bulk encoder
and written through ``CollectionWriter``; then every fusion and weight of the grid is a
``Collection.load`` with that ``hybrid`` setting, and every title is one ``search_hits`` call
(the served search code), scored by nDCG@10 over entries (each counted at its first chunk).
The setting with the best dev nDCG@10 is what ``HybridConfig`` ships as its default.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import api
from bench.report import markdown_table, say

WEIGHTS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.75, 1.0]
FUSIONS = ["blend", "rrf"]
K = 10
SEARCH_K = 50  # chunks per search, as the served part asks for


def _ndcg(ranked: list[str], relevant: str) -> float:
    top = list(dict.fromkeys(ranked))[:K]
    return 1.0 / math.log2(top.index(relevant) + 2) if relevant in top else 0.0


def run(corpus: Path) -> dict[str, Any]:
    """The dev grid: nDCG@10 per fusion and weight, and the best setting."""
    from bench.retrieval.quality import _records
    from router.config import HybridConfig
    from router.context.collections import Collection
    from router.context.ingest import chunk_text, clean_line, clean_text

    started = time.monotonic()
    config = api.CollectionConfig()
    entries: list[tuple[str, str]] = []  # (id, title)
    chunks: dict[str, list[Any]] = {}
    for record in _records(corpus):
        entry = str(record.get("_id", record.get("id")))
        title = clean_line(str(record.get("title") or ""))
        text = clean_text(str(record.get("text") or ""))
        if not title or not text or entry in chunks:
            continue
        entries.append((entry, title))
        pieces = chunk_text(text, config.chunk_tokens, config.chunk_overlap)
        chunks[entry] = [api.ChunkRecord(entry, n, piece, (), "") for n, piece in enumerate(pieces)]
    records = [record for entry, _ in entries for record in chunks[entry]]
    encoder = api.bulk_encoder()
    say(f"[dev split] embedding {len(records)} title-less chunks and {len(entries)} titles")
    vectors = encoder.encode([r.text for r in records])
    questions = encoder.encode([title for _, title in entries])
    grid: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="plexus-bench-dev-") as tmp:
        data_dir = Path(tmp)
        with api.CollectionWriter(data_dir, "dev", "answers", config, int(encoder.dim)) as writer:
            at = 0
            for entry, _ in entries:
                mine = chunks[entry]
                writer.replace_source(entry, mine, vectors[at : at + len(mine)], "dev")
                at += len(mine)
            writer.commit()
        for fusion in FUSIONS:
            for weight in WEIGHTS:
                if fusion == "rrf" and weight == 0.0:
                    continue  # the same ranking as blend's 0: vectors alone
                hybrid = {"fusion": fusion, "bm25_weight": weight}
                setting = config.model_copy(update={"hybrid": HybridConfig(**hybrid)})
                collection = Collection.load(data_dir, "dev", "answers", setting)
                try:
                    total = 0.0
                    for (entry, title), vector in zip(entries, questions, strict=True):
                        hits = collection.search_hits(vector, SEARCH_K, text=title)
                        total += _ndcg([h.chunk.source for h in hits], entry)
                finally:
                    collection.close()
                grid.append({**hybrid, "ndcg@10": total / len(entries)})
    best = max(grid, key=lambda row: row["ndcg@10"])
    return {
        "run": True,
        "questions": len(entries),
        "chunks": len(records),
        "grid": grid,
        "best": best,
        "seconds": round(time.monotonic() - started, 1),
    }


def markdown(part: dict[str, Any]) -> str:
    if not part.get("run"):
        return f"Not run: {part['reason']}."
    by_fusion: dict[str, dict[float, float]] = {}
    for row in part["grid"]:
        by_fusion.setdefault(row["fusion"], {})[row["bm25_weight"]] = row["ndcg@10"]
    weights = sorted({row["bm25_weight"] for row in part["grid"]})
    rows = [
        [fusion, *[f"{values[w]:.4f}" if w in values else "-" for w in weights]]
        for fusion, values in by_fusion.items()
    ]
    best = part["best"]
    return "\n".join(
        [
            f"- Dev split from the corpus alone: {part['questions']} entry titles as questions "
            f"against the entries' answers ({part['chunks']} chunks, titles left out of the "
            "embeddings and of BM25); nDCG@10 over entries through `Collection.search_hits`.",
            f"- Best: {best['fusion']}, bm25_weight {best['bm25_weight']} "
            f"(nDCG@10 {best['ndcg@10']:.4f}); bm25_weight 0 is the vectors alone.",
            "",
            markdown_table(["fusion \\ bm25_weight", *[f"{w:g}" for w in weights]], rows),
        ]
    )
