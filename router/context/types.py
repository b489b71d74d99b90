"""Plain data shared by ingestion, collections and assembly."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChunkRecord:
    """A piece of a source document, ready to embed and store."""

    source: str  # the document's id: its path relative to the ingest root, or a given id
    position: int  # the chunk's index within its source, from 0
    text: str
    tags: tuple[str, ...] = ()
    title: str = ""


@dataclass(frozen=True)
class StoredChunk:
    """A chunk as a collection stores it: ``chunk_id`` is its id in the vector index."""

    chunk_id: int
    source: str
    position: int
    text: str
    tags: tuple[str, ...] = ()
    title: str = ""


@dataclass(frozen=True)
class SearchHit:
    chunk: StoredChunk
    score: float  # cosine similarity (inner product of unit vectors)


@dataclass
class IngestReport:
    """What one ingestion did, per source."""

    collection: str
    version: str = ""
    added_sources: list[str] = field(default_factory=list)
    replaced_sources: list[str] = field(default_factory=list)
    unchanged_sources: list[str] = field(default_factory=list)
    deleted_sources: list[str] = field(default_factory=list)
    skipped_files: dict[str, str] = field(default_factory=dict)  # path -> reason
    chunks_written: int = 0
    duplicates_dropped: int = 0
    total_chunks: int = 0
