"""Assembly, context packets, SQL mirrors and micro-batching, each on its own."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from router.config import SqlMirrorConfig, parse_config
from router.context.assembly import Assembler, drop_near_duplicates
from router.context.batching import BatchingEncoder
from router.context.packets import ContextPacket, ContextPiece, PacketSigner
from router.context.sql import SqlMirror, bind_parameters, render_rows
from router.errors import InvalidArgument, PermissionDenied
from router.routing.encoder import plain_tokenizer


def piece(
    text: str,
    kind: str = "collection",
    score: float = 0.5,
    source: str = "docs:a.md",
    position: int = 0,
) -> ContextPiece:
    return ContextPiece(text=text, kind=kind, source=source, position=position, score=score)


@pytest.fixture(scope="module")
def assembler() -> Assembler:
    return Assembler(plain_tokenizer())


LONG = " ".join(f"Sentence {i} explains the return policy for item {i}." for i in range(80))


def test_budget_citations_and_order(assembler: Assembler):
    pieces = [
        piece("Returns are accepted within 30 days with a receipt.", score=0.6),
        piece(
            "Store 1432 opens at 9am and closes at 9pm.", kind="sql", source="sql:stores", score=1.0
        ),
        piece("Gift cards cannot be refunded.", score=0.9, position=3),
        piece("Always be polite.", kind="static", source="policy", score=1.0),
        piece(LONG, score=0.4, source="docs:long.md"),
    ]
    result = assembler.assemble(
        "can I return shoes?",
        pieces,
        template="{context}\n\nQ: {question}",
        budget_tokens=120,
        diversity=0.9,
    )
    assert result.tokens_used <= 120
    assert result.tokens_used == assembler.count(result.prompt)  # counted, not estimated
    kinds = [p.piece.kind for p in result.placed]
    assert kinds[:2] == ["static", "sql"]
    scores = [p.piece.score for p in result.placed if p.piece.kind == "collection"]
    assert scores == sorted(scores, reverse=True)
    for placed in result.placed:
        assert f"[{placed.number}] ({placed.piece.citation})" in result.prompt
    assert "[3] (docs:a.md #3, score 0.90)" in result.prompt
    assert result.prompt.endswith("Q: can I return shoes?")
    assert any(p.truncated for p in result.placed) or result.over_budget_dropped


def test_tiny_budget_keeps_the_question(assembler: Assembler):
    result = assembler.assemble(
        "hello?", [piece(LONG)], template="{context}{question}", budget_tokens=16, diversity=0.9
    )
    assert result.placed == ()
    assert result.over_budget_dropped == 1
    assert result.prompt == "hello?"


def test_near_duplicates_dropped():
    a = piece("Returns are accepted within thirty days of purchase with a receipt.")
    b = piece("returns are accepted within thirty days of purchase with a receipt!", score=0.4)
    c = piece("Gift cards cannot be refunded or exchanged for cash.")
    kept, dropped = drop_near_duplicates([a, b, c], 0.9)
    assert kept == [a, c] and dropped == 1


def make_packet(tenant: str = "retail") -> ContextPacket:
    return ContextPacket(
        tenant=tenant,
        app="storefront",
        route="returns",
        question="q?",
        pieces=(piece("fact"),),
        created_unix=time.time(),
    )


def test_packets_are_signed_and_checked():
    signer = PacketSigner(key=b"k" * 32)
    signed = signer.sign(make_packet())
    assert signer.verify(signed, "retail") == signed
    altered = ContextPacket(**{**signed.__dict__, "question": "other?"})
    with pytest.raises(InvalidArgument, match="signature"):
        signer.verify(altered, "retail")
    with pytest.raises(PermissionDenied, match="another tenant"):
        signer.verify(signed, "wholesale")
    with pytest.raises(InvalidArgument, match="signature"):
        PacketSigner(key=b"x" * 32).verify(signed, "retail")
    old = signer.sign(ContextPacket(**{**make_packet().__dict__, "created_unix": 0.0}))
    with pytest.raises(InvalidArgument, match="expired"):
        signer.verify(old, "retail")
    for created in [time.time() + 3600, float("nan"), float("inf"), float("-inf")]:
        forged = signer.sign(ContextPacket(**{**make_packet().__dict__, "created_unix": created}))
        with pytest.raises(InvalidArgument, match="impossible creation time|expired"):
            signer.verify(forged, "retail")
    skewed = signer.sign(
        ContextPacket(**{**make_packet().__dict__, "created_unix": time.time() + 5})
    )
    assert signer.verify(skewed, "retail") == skewed  # a replica's clock a little ahead


@pytest.fixture()
def stores_db(tmp_path: Path) -> Path:
    path = tmp_path / "stores.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE stores (store_id TEXT, name TEXT, hours TEXT)")
        db.executemany(
            "INSERT INTO stores VALUES (?, ?, ?)",
            [("1432", "Elm Street", "9-21"), ("0077", "Harbor", "8-20")],
        )
    return path


def test_sql_mirror_binds_parameters_only(stores_db: Path, tmp_path: Path):
    mirror = SqlMirror(
        "stores", SqlMirrorConfig(url=f"sqlite:///{stores_db}"), _loaded_at(tmp_path)
    )
    sql = "SELECT name, hours FROM stores WHERE store_id = :store_id"
    columns, rows = mirror.query(sql, {"store_id": "1432"}, 10)
    assert render_rows(columns, rows) == "name | hours\nElm Street | 9-21"
    columns, rows = mirror.query(sql, {"store_id": "1432' OR '1'='1"}, 10)
    assert rows == []
    with pytest.raises(Exception):  # noqa: B017 - the mirror is opened read-only
        mirror.query("DELETE FROM stores", {}, 10)
    assert mirror.query("SELECT count(*) FROM stores", {}, 10)[1] == [(2,)]
    mirror.close()


def _loaded_at(tmp_path: Path):  # type: ignore[no-untyped-def]
    from tests.conftest import demo_config_data

    return parse_config(demo_config_data(tmp_path), tmp_path / "plexus.yaml")


def test_missing_metadata_is_invalid_argument():
    with pytest.raises(InvalidArgument, match="store_id"):
        bind_parameters("store_hours", ["store_id"], {"other": "1"})


class CountingEncoder:
    """A test double for the sentence encoder: records how many calls it gets."""

    dim = 4
    name = "counting"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls.append(len(texts))
        time.sleep(0.005)
        return np.array([[len(t), 1, 2, 3] for t in texts], dtype=np.float32)


async def test_concurrent_requests_share_encoder_calls():
    encoder = CountingEncoder()
    with ThreadPoolExecutor(2) as pool:
        batcher = BatchingEncoder(encoder, pool, max_batch=64)
        texts = [f"text number {i}" + "x" * i for i in range(40)]
        results = await asyncio.gather(*(batcher.encode(t) for t in texts))
    assert [r[0] for r in results] == [len(t) for t in texts]  # each gets its own row
    assert sum(encoder.calls) == 40
    assert len(encoder.calls) < 5
