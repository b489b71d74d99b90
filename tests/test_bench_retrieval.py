"""bench retrieval's StackFAQ part on a small BEIR folder written here: exact search, the dev
split made from the corpus, and the served path (ingest + Stitch in process) scored alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.retrieval import quality

ENTRIES = {
    "d0": ("Strikethrough with GitHub Markdown", "Wrap the words in two tildes on each side."),
    "d1": (
        "How do I delete my Facebook account?",
        "Open the help centre, choose delete account and confirm with your password.",
    ),
    "d2": (
        "Export a Google Docs file as PDF",
        "Use File, then Download, then PDF document to save a copy.",
    ),
    "d3": (
        "Change the Gmail display language",
        "Open settings, pick the language menu and select the one you want.",
    ),
}
QUERIES = {
    "q0": ("cross out text in a github readme", "d0"),
    "q1": ("permanently remove my facebook profile", "d1"),
    "q2": ("save a google document as a pdf file", "d2"),
    "q3": ("switch gmail to french", "d3"),
}


@pytest.fixture()
def beir(tmp_path: Path) -> Path:
    folder = tmp_path / "faq"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(
        "".join(
            json.dumps({"_id": i, "title": title, "text": text}) + "\n"
            for i, (title, text) in ENTRIES.items()
        ),
        encoding="utf-8",
    )
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": text}) + "\n" for q, (text, _) in QUERIES.items()),
        encoding="utf-8",
    )
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, (_, d) in QUERIES.items()),
        encoding="utf-8",
    )
    return folder


def test_exact_dev_split_and_served_path_are_scored(beir: Path) -> None:
    part = quality.run(beir, quality.find_beir(beir))
    assert part["queries_evaluated"] == 4 and part["metrics"]["ndcg@10"] > 0.5

    dev = part["dev_split"]
    assert dev["questions"] == 4 and dev["chunks"] == 4
    assert {row["fusion"] for row in dev["grid"]} == {"blend", "rrf"}
    assert dev["best"]["ndcg@10"] == max(row["ndcg@10"] for row in dev["grid"])

    served = part["served"]
    defaults, dense = served["rows"]
    assert served["ingest"]["chunks"] == 4
    assert (defaults["hybrid_active"], dense["hybrid_active"]) == (True, False)
    assert defaults["index"] == dense["index"] == "flat" and defaults["chunks"] == 4
    # min_score 0 (the source's default) leaves out entries of negative cosine
    assert 1 <= defaults["distinct_entries_min"] <= 4
    for row in (defaults, dense):
        assert row["metrics"]["ndcg@10"] == 1.0  # four unmistakable questions
        assert "p50" in row["stitch_us"]
    text = quality.markdown(part)
    assert "Through the served path" in text and "vectors alone" in text
    assert "dev split" in text.lower()
