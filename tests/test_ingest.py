"""Ingestion: readers, cleaning, chunking, duplicates, re-ingestion and failure handling.

The real encoder, real FAISS indexes and real SQLite files throughout; the one test double is an
encoder that fails on demand (a real encoder cannot be made to fail mid-ingestion).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import yaml

from router import cli
from router.config import LoadedConfig
from router.context.collections import CURRENT_FILE, TEMP_PREFIX, Collection, collection_dir
from router.context.ingest import (
    chunk_text,
    clean_text,
    html_to_text,
    ingest,
    markdown_to_text,
    read_documents,
)
from router.context.types import StoredChunk
from router.errors import NotFound
from router.routing.encoder import bulk_encoder, plain_tokenizer

from .test_collections import make_config

KB = {"index": "flat", "chunk_tokens": 64, "chunk_overlap": 16}

MARKDOWN = """---
title: Returns and refunds
---
# Returns *policy*

You can return **any** item within [30 days](https://example.com/returns) with the receipt.
![our logo](logo.png) Refunds go back to the original payment method.

- Opened electronics: __15 days__
- Final sale items: `not returnable`

```
refund = price - restocking_fee
```
"""

HTML = """<!doctype html><html><head><title>Store hours</title>
<style>body { color: red }</style><script>var tracking = "pixel";</script></head>
<body><nav><a href="/">Home</a> <a href="/help">Help</a></nav>
<h1>When we are open</h1><p>Stores open at <b>9 am</b> and close at 9&nbsp;pm.</p>
<ul><li>Sundays: 10 am to 6 pm</li></ul><noscript>enable javascript</noscript></body></html>
"""


def chunks_of(collection: Collection) -> list[StoredChunk]:
    _, ids = collection.search(np.zeros((1, collection.dim), np.float32), collection.size)
    return sorted(collection.chunks(ids[0]), key=lambda c: (c.source, c.position))


def load(loaded: LoadedConfig, name: str = "kb") -> Collection:
    config = loaded.config.tenants["retail"].collections[name]
    return Collection.load(loaded.data_dir, "retail", name, config)


def write_files(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return root


@pytest.fixture()
def loaded(tmp_path: Path) -> LoadedConfig:
    return make_config(tmp_path, retail={"kb": KB})


# --------------------------------------------------------------------------------------------
# readers and cleaning


def test_markdown_and_html_lose_their_markup_and_keep_a_title() -> None:
    text, title = markdown_to_text(MARKDOWN)
    text = clean_text(text)
    assert title == "Returns and refunds"  # front matter wins over the first heading
    assert "Returns policy\nYou can return any item within 30 days with the receipt." in text
    assert "Opened electronics: 15 days" in text and "Final sale items: not returnable" in text
    assert "refund = price - restocking_fee" in text  # code kept as text
    for markup in ("#", "**", "__", "](", "logo", "`", "- Opened", "---"):
        assert markup not in text, markup
    assert markdown_to_text("intro\n\n## First *real* heading\ntext")[1] == "First real heading"

    text, title = html_to_text(HTML)
    text = clean_text(text)
    assert title == "Store hours"
    assert text == (
        "When we are open\nStores open at 9 am and close at 9 pm.\nSundays: 10 am to 6 pm"
    )
    assert html_to_text("<h1>Only a heading</h1><p>x</p>")[1] == "Only a heading"


def test_cleaning_normalises_and_collapses() -> None:
    raw = "\ufb01nal\x07 notes\u200b:\tfull\u3000width \uff21\r\n  second   line"
    raw += "\r\n\r\n\n\n para two "
    assert clean_text(raw) == "final notes: full width A second line\npara two"
    assert clean_text(" \n\x00\n ") == ""


def test_every_format_is_read_cleaned_and_ingested(tmp_path: Path, loaded: LoadedConfig) -> None:
    docs = write_files(
        tmp_path / "docs",
        {
            "policies/returns.md": MARKDOWN,
            "hours.html": HTML,
            "notes.txt": "\ufb01nal\x07 notes about   gift cards.\n\nThey never expire.",
            "faq.jsonl": "\n".join(
                [
                    json.dumps(
                        {
                            "id": "q1",
                            "title": "Price match",
                            "text": "We match prices of local competitors.",
                            "tags": ["pricing"],
                        }
                    ),
                    "",
                    json.dumps({"text": "Layaway is not offered."}),
                ]
            ),
            "products.csv": "id,title,text,tags\n"
            'sku-1,Air fryer,"The air fryer has a 4 quart basket.",kitchen;small\n'
            "sku-2,Kettle,The kettle boils a litre in three minutes.,\n",
        },
    )
    report = ingest(loaded, "retail", "kb", [docs], tags=["kb"])
    assert report.skipped_files == {}
    assert report.added_sources == [
        "docs/faq.jsonl#q1",
        "docs/faq.jsonl#3",
        "docs/hours.html",
        "docs/notes.txt",
        "docs/policies/returns.md",
        "docs/products.csv#sku-1",
        "docs/products.csv#sku-2",
    ]
    assert report.version == "v0001" and report.total_chunks == report.chunks_written == 7
    collection = load(loaded)
    by_source = {c.source: c for c in chunks_of(collection)}
    assert collection.size == 7 and collection.index_kind == "flat"

    faq = by_source["docs/faq.jsonl#q1"]
    assert (faq.title, faq.tags, faq.text) == (
        "Price match",
        ("kb", "pricing"),
        "We match prices of local competitors.",
    )
    assert by_source["docs/faq.jsonl#3"].tags == ("kb",)
    fryer = by_source["docs/products.csv#sku-1"]
    assert (fryer.title, fryer.tags) == ("Air fryer", ("kb", "kitchen", "small"))
    assert by_source["docs/notes.txt"].text == "final notes about gift cards.\nThey never expire."
    hours = by_source["docs/hours.html"]
    assert hours.title == "Store hours" and "<" not in hours.text and "tracking" not in hours.text
    returns = by_source["docs/policies/returns.md"]
    assert returns.title == "Returns and refunds" and "**" not in returns.text
    assert "30 days" in returns.text

    # a file named on its own keeps the id it had when ingested through its folder
    single = ingest(loaded, "retail", "kb", [docs / "notes.txt"], tags=["kb"])
    assert single.unchanged_sources == ["docs/notes.txt"] and single.added_sources == []


# --------------------------------------------------------------------------------------------
# chunking


def _tokens(text: str) -> list[str]:
    return plain_tokenizer().encode(text, add_special_tokens=False).tokens


def count_tokens(text: str) -> int:
    return len(_tokens(text))


def test_chunks_respect_size_and_overlap() -> None:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "unbelievably", "running", "kettle"]
    text = " ".join(rng.choice(words, 700))
    chunks = chunk_text(text, 48, 12)
    assert len(chunks) > 5
    assert text.startswith(chunks[0]) and text.endswith(chunks[-1])
    position = 0
    for previous, chunk in zip(chunks, chunks[1:], strict=False):
        assert chunk in text
        start = text.index(chunk, position)
        assert start < position + len(previous)  # no gap between consecutive chunks
        position = start
        before, after = _tokens(previous), _tokens(chunk)
        shared = max(n for n in range(len(after) + 1) if before[len(before) - n :] == after[:n])
        assert 12 <= shared < len(before)  # overlap of at least chunk_overlap tokens
    assert all(count_tokens(c) <= 48 for c in chunks)
    assert not any(c.startswith("##") or c[0] == " " for c in chunks)  # whole words only


def test_chunks_prefer_sentence_and_paragraph_ends() -> None:
    sentences = [
        f"The {w} store opens early today." for w in ["north", "south", "east", "west"] * 12
    ]
    text = " ".join(sentences)
    chunks = chunk_text(text, 40, 8)
    assert len(chunks) > 3
    assert all(c.endswith(".") for c in chunks)
    assert all(count_tokens(c) <= 40 for c in chunks)

    paragraph = "one two three four five six seven eight nine. ten eleven twelve"
    text = "\n".join([paragraph] * 6)
    chunks = chunk_text(text, 30, 4)
    assert all(c.endswith("twelve") for c in chunks[:-1])  # the paragraph end beats the sentence
    assert chunk_text("short text", 30, 4) == ["short text"]
    assert chunk_text("", 30, 4) == []


def test_ingested_chunks_fit_the_configured_window(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    words = ["returns", "refunds", "receipts", "stores", "kettles", "fryers", "gift", "cards"]
    body = ". ".join(" ".join(rng.choice(words, 9)) for _ in range(60)) + "."
    docs = write_files(tmp_path / "docs", {"long.txt": body})
    # one small vocabulary makes every window alike: only exact duplicates may go here
    loaded = make_config(tmp_path, retail={"kb": {**KB, "near_duplicate": 1.0}})
    report = ingest(loaded, "retail", "kb", [docs])
    assert report.duplicates_dropped == 0
    chunks = chunks_of(load(loaded))
    assert report.chunks_written == len(chunks) > 3
    assert all(count_tokens(c.text) <= KB["chunk_tokens"] for c in chunks)
    assert [c.position for c in chunks] == list(range(len(chunks)))


# --------------------------------------------------------------------------------------------
# duplicates, re-ingestion, deletion


def test_exact_and_near_duplicates_are_dropped(tmp_path: Path, loaded: LoadedConfig) -> None:
    docs = write_files(
        tmp_path / "docs",
        {
            "a.txt": "Gift cards never expire and can be used in any store or online.",
            "b.txt": "GIFT CARDS never   expire and can be used in any store or online.",
            "c.txt": "Gift cards never expire, and can be used in any of our stores or online!",
            "d.txt": "Our stores open at 9 am and close at 9 pm.",
        },
    )
    report = ingest(loaded, "retail", "kb", [docs])
    assert report.duplicates_dropped == 2 and report.chunks_written == 2
    assert sorted(c.source for c in chunks_of(load(loaded))) == ["docs/a.txt", "docs/d.txt"]

    more = write_files(tmp_path / "more", {"e.txt": "Our stores open at 9am and close at 9pm."})
    report = ingest(loaded, "retail", "kb", [more])  # near a chunk already in the collection
    assert (report.duplicates_dropped, report.chunks_written) == (1, 0)
    assert report.added_sources == ["more/e.txt"]


def test_reingest_replaces_skips_unchanged_and_deletes(
    tmp_path: Path, loaded: LoadedConfig
) -> None:
    docs = write_files(
        tmp_path / "docs",
        {
            "a.txt": "Returns are accepted within thirty days of purchase.",
            "b.txt": "Express shipping arrives the next business day.",
        },
    )
    assert ingest(loaded, "retail", "kb", [docs]).version == "v0001"

    again = ingest(loaded, "retail", "kb", [docs])
    assert again.unchanged_sources == ["docs/a.txt", "docs/b.txt"]
    assert (again.version, again.added_sources, again.chunks_written) == ("v0001", [], 0)

    (docs / "a.txt").write_text("Returns are accepted within sixty days for gold members.")
    changed = ingest(loaded, "retail", "kb", [docs])
    assert changed.replaced_sources == ["docs/a.txt"]
    assert changed.unchanged_sources == ["docs/b.txt"]
    assert (changed.version, changed.total_chunks) == ("v0002", 2)
    texts = [c.text for c in chunks_of(load(loaded))]
    assert "Returns are accepted within sixty days for gold members." in texts
    assert not any("thirty" in t for t in texts)

    tagged = ingest(loaded, "retail", "kb", [docs], tags=["policy"])  # tags are part of a source
    assert tagged.replaced_sources == ["docs/a.txt", "docs/b.txt"]
    assert all(c.tags == ("policy",) for c in chunks_of(load(loaded)))

    deleted = ingest(loaded, "retail", "kb", [], delete=["docs/b.txt", "docs/nope.txt"])
    assert deleted.deleted_sources == ["docs/b.txt"]
    assert "nothing to delete" in deleted.skipped_files["docs/nope.txt"]
    collection = load(loaded)
    assert (collection.version, [c.source for c in chunks_of(collection)]) == (
        "v0004",
        ["docs/a.txt"],
    )


def test_bad_files_are_reported_and_the_rest_ingested(tmp_path: Path, loaded: LoadedConfig) -> None:
    docs = write_files(
        tmp_path / "docs",
        {
            "good.md": "# Good\n\nThis file is fine.",
            "bad.txt": b"caf\xe9 au lait",
            "broken.jsonl": '{"text": "fine"}\n{"text": oops}\n',
            "manual.pdf": b"%PDF-1.7",
            "rows.csv": "title,body\nx,y\n",
            "empty.txt": " \n\n ",
        },
    )
    report = ingest(loaded, "retail", "kb", [docs, tmp_path / "missing"])
    assert report.added_sources == ["docs/good.md"] and report.version == "v0001"
    reasons = report.skipped_files
    assert set(reasons) == {
        "docs/bad.txt",
        "docs/broken.jsonl",
        "docs/manual.pdf",
        "docs/rows.csv",
        "docs/empty.txt",
        str(tmp_path / "missing"),
    }
    assert "UTF-8" in reasons["docs/bad.txt"] and "0xe9" in reasons["docs/bad.txt"]
    assert reasons["docs/broken.jsonl"].startswith("line 2: invalid JSON")
    assert "unsupported file type '.pdf'" in reasons["docs/manual.pdf"]
    assert "no 'text' column" in reasons["docs/rows.csv"]
    assert [c.title for c in chunks_of(load(loaded))] == ["Good"]
    documents, skipped = read_documents([docs / "broken.jsonl"])
    assert documents == [] and list(skipped) == ["broken.jsonl"]


class FailingEncoder:
    """Test double: the real encoder's shape and name, but encoding fails (a real encoder
    cannot be made to fail on demand)."""

    def __init__(self) -> None:
        real = bulk_encoder()
        self.dim = real.dim
        self.name = real.name

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        raise RuntimeError("encoder crashed")


def test_a_failed_ingestion_leaves_the_previous_version_live(
    tmp_path: Path, loaded: LoadedConfig
) -> None:
    docs = write_files(tmp_path / "docs", {"a.txt": "Layaway is not offered in any store."})
    ingest(loaded, "retail", "kb", [docs])
    (docs / "a.txt").write_text("Layaway is now offered in every store.")
    with pytest.raises(RuntimeError, match="encoder crashed"):
        ingest(loaded, "retail", "kb", [docs], encoder=FailingEncoder())
    directory = collection_dir(loaded.data_dir, "retail", "kb", None)
    assert (directory / CURRENT_FILE).read_text().strip() == "v0001"
    assert not [p for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert [c.text for c in chunks_of(load(loaded))] == ["Layaway is not offered in any store."]
    recovered = ingest(loaded, "retail", "kb", [docs])  # and the lock was released
    assert (recovered.version, recovered.replaced_sources) == ("v0002", ["docs/a.txt"])


def test_unknown_tenant_or_collection_is_not_found(tmp_path: Path, loaded: LoadedConfig) -> None:
    for tenant, collection in [("retail", "pricing"), ("nobody", "kb"), ("retail", "../kb")]:
        with pytest.raises(NotFound):
            ingest(loaded, tenant, collection, [tmp_path])
    assert not (loaded.data_dir / "nobody").exists()


# --------------------------------------------------------------------------------------------
# the command


def _run(argv: list[str]) -> int:
    return cli.main(argv)


def test_ingest_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loaded = make_config(tmp_path, retail={"kb": KB})
    config_file = tmp_path / "plexus.yaml"
    data = loaded.config.model_dump(mode="json", exclude_none=True)
    config_file.write_text(yaml.safe_dump(data))
    docs = write_files(
        tmp_path / "docs",
        {"a.md": "# Hours\n\nOpen nine to nine.", "b.pdf": b"%PDF", "c.txt": b"\xff"},
    )
    base = ["ingest", str(config_file), "--tenant", "retail", "--collection", "kb"]
    assert _run([*base, str(docs), "--tag", "hours"]) == 0
    out = capsys.readouterr().out
    assert "v0001" in out and "flat" in out and "docs/a.md" in out
    assert "docs/b.pdf" in out and "docs/c.txt" in out and "chunks written: 1" in out
    assert _run([*base, str(docs / "b.pdf")]) == 1  # nothing but skipped files
    assert _run([*base, "--delete", "docs/a.md"]) == 0
    assert "deleted 1" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        _run(["ingest", "--help"])
    assert exited.value.code == 0 and "--collection" in capsys.readouterr().out
