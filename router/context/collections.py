"""One tenant's vector collections: versioned FAISS indexes beside SQLite chunk stores.

Layout: ``DATA_DIR/<tenant>/collections/<name>/`` holds versions ``v0001/``, ``v0002/``, ... and
``CURRENT``, which names the live one. A version directory holds ``chunks.sqlite`` (the chunks,
their embeddings, the digest of each source and the lexical index of
:mod:`router.context.lexical`), ``index.faiss`` and ``meta.json``.

A search is hybrid when the collection's ``hybrid.bm25_weight`` is above 0 and the question's
text is given: the vector index's nearest chunks and the lexical index's best BM25 chunks are
pooled and ranked by :func:`~router.context.lexical.fuse`; a version written before the lexical
index existed is searched by its vectors alone (a warning at load says to re-ingest it).

A new version is built by a :class:`CollectionWriter` in a temporary directory inside the
collection directory, renamed into place when complete, and only then named by ``CURRENT``
(itself replaced atomically): nothing half-written is ever visible. The previous version is
kept; older ones are deleted.

Tenant and collection names are checked against the configuration before any path is built, and
every path must resolve inside ``DATA_DIR/<tenant>/collections``: a request can only ever reach
its own tenant's configured collections.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import faiss
import numpy as np

from router.config import NAME_PATTERN, CollectionConfig, HybridConfig, LoadedConfig
from router.context.lexical import (
    LEXICAL_FORMAT,
    LexicalIndex,
    fuse,
    has_lexical_index,
    query_terms,
    write_lexical_index,
)
from router.context.types import ChunkRecord, SearchHit, StoredChunk
from router.errors import FailedPrecondition, InvalidArgument, NotFound, shown
from router.files import atomic_write, fsync_dir, next_version, sorted_versions, version_number

log = logging.getLogger(__name__)

CURRENT_FILE = "CURRENT"
CHUNKS_FILE = "chunks.sqlite"
INDEX_FILE = "index.faiss"
META_FILE = "meta.json"
LOCK_FILE = ".lock"
TEMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1
IVF_MIN_POINTS_PER_LIST = 39  # FAISS warns below this many training points per list
GPU_MAX_K = 2048  # FAISS GPU indexes answer at most this many neighbours
_SQL_BATCH = 500  # ids per "IN (...)" query, far below SQLite's variable limit

_NAME = re.compile(NAME_PATTERN)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    chunk_id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    position INTEGER NOT NULL,
    text TEXT NOT NULL,
    tags TEXT NOT NULL,
    title TEXT NOT NULL,
    embedding BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_source ON chunks (source, position);
CREATE TABLE IF NOT EXISTS sources (source TEXT PRIMARY KEY, digest TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


# --------------------------------------------------------------------------------------------
# names and paths


def _is_name(value: object) -> bool:
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def _no_collection(tenant: object, name: object) -> NotFound:
    return NotFound(f"tenant {shown(tenant)} has no collection {shown(name)}")


def check_names(tenant: object, name: object, configured: Mapping[str, object] | None) -> None:
    """Raise :class:`NotFound` unless both names are valid and ``name`` is configured."""
    if not _is_name(tenant) or not _is_name(name):
        raise _no_collection(tenant, name)
    if configured is not None and name not in configured:
        raise _no_collection(tenant, name)


def collections_root(data_dir: Path, tenant: str) -> Path:
    """``DATA_DIR/<tenant>/collections`` (the tenant name must already be checked)."""
    if not _is_name(tenant):
        raise NotFound(f"no tenant {shown(tenant)}")
    return Path(data_dir) / tenant / "collections"


def collection_dir(
    data_dir: Path, tenant: str, name: str, configured: Mapping[str, object] | None
) -> Path:
    """The checked directory of a configured collection; :class:`NotFound` otherwise.

    ``configured`` is the tenant's collections (name -> config); names are checked against it
    and :data:`router.config.NAME_PATTERN` before any path is built, and the resolved path must
    be a direct child of ``DATA_DIR/<tenant>/collections`` (with only ``DATA_DIR`` resolved):
    a link in the tenant's folder, its collections folder or a collection's folder that leads
    elsewhere is refused.
    """
    check_names(tenant, name, configured)
    root = collections_root(Path(data_dir).resolve(), tenant)
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path.parent != root:
        raise _no_collection(tenant, name)
    return path


def tenant_collection_config(loaded: LoadedConfig, tenant: str, name: str) -> CollectionConfig:
    """The configuration of ``tenant``'s collection ``name``; :class:`NotFound` otherwise."""
    tenant_config = loaded.config.tenants.get(tenant) if _is_name(tenant) else None
    if tenant_config is None:
        raise _no_collection(tenant, name)
    check_names(tenant, name, tenant_config.collections)
    return tenant_config.collections[name]


def _versions(directory: Path) -> list[str]:
    """Published version directories, oldest first."""
    if not directory.is_dir():
        return []
    return sorted_versions(p.name for p in directory.iterdir() if p.is_dir())


def confined(directory: Path, *parts: str) -> Path:
    """``directory/parts...``, refused (NotFound) when a link would lead it out of ``directory``.

    ``directory`` is already resolved; every file Plexus opens inside a collection (its
    ``CURRENT`` pointer, a version folder, the index, the chunk store, the metadata) goes
    through here, so a version folder or file linked to another tenant's data is never served.
    """
    path = directory.joinpath(*parts)
    resolved = path.resolve()
    if resolved != path or not resolved.is_relative_to(directory):
        log.warning("refusing %s: it leads outside %s", path, directory)
        raise NotFound(f"{shown('/'.join(parts))} is not part of this collection")
    return path


def _current_version(directory: Path) -> str | None:
    """The version ``CURRENT`` names, if it names a published version directory."""
    pointer = confined(directory, CURRENT_FILE)
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if version_number(name) is None or not confined(directory, name, META_FILE).is_file():
        log.warning("%s names %r, which is not a complete version", pointer, name)
        return None
    return name


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def read_meta(directory: Path, version: str) -> dict[str, Any]:
    meta = confined(directory, version, META_FILE)
    return dict(json.loads(meta.read_text(encoding="utf-8")))


def current_meta(
    data_dir: Path, tenant: str, name: str, configured: Mapping[str, object] | None
) -> dict[str, Any] | None:
    """The live version's ``meta.json`` (with ``version``), or None if never ingested."""
    directory = collection_dir(data_dir, tenant, name, configured)
    version = _current_version(directory)
    if version is None:
        return None
    meta = read_meta(directory, version)
    meta["version"] = version
    return meta


# --------------------------------------------------------------------------------------------
# indexes


def _normalized(vectors: np.ndarray, dim: int) -> np.ndarray:
    array = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if array.ndim != 2 or array.shape[1] != dim:
        raise InvalidArgument(f"expected embeddings of shape [n, {dim}], got {array.shape}")
    if not np.isfinite(array).all():
        raise InvalidArgument("embeddings contain NaN or infinite values")
    if len(array):
        faiss.normalize_L2(array)
    return array


def choose_index_kind(config: CollectionConfig, count: int) -> str:
    """``flat``, ``hnsw`` or ``ivf`` for ``count`` vectors under ``config.index``."""
    if config.index == "auto":
        return "flat" if count <= config.exact_max_vectors else "hnsw"
    return config.index


def ivf_nlist(config: CollectionConfig, count: int) -> int:
    """Lists for an IVF index: the configured number or about 4 x sqrt(count), bounded so that
    every list gets enough training points (0 means too few vectors for IVF)."""
    wanted = config.ivf.nlist or max(1, round(4 * math.sqrt(count)))
    return min(wanted, count // IVF_MIN_POINTS_PER_LIST)


def build_index(
    vectors: np.ndarray, ids: np.ndarray, config: CollectionConfig
) -> tuple[faiss.Index, str]:
    """An ``IndexIDMap2`` over unit vectors (inner product = cosine) whose ids are ``ids``."""
    count, dim = vectors.shape
    kind = choose_index_kind(config, count)
    if kind == "ivf" and ivf_nlist(config, count) < 1:
        log.warning(
            "%d vectors are too few to train an IVF index (need %d); using a flat index",
            count,
            IVF_MIN_POINTS_PER_LIST,
        )
        kind = "flat"
    inner: faiss.Index
    if kind == "flat":
        inner = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, config.hnsw.m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = config.hnsw.ef_construction
        inner.hnsw.efSearch = config.hnsw.ef_search
    elif kind == "ivf":
        nlist = ivf_nlist(config, count)
        quantizer = faiss.IndexFlatIP(dim)
        inner = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        inner.train(vectors)
        inner.nprobe = min(config.ivf.nprobe, nlist)
    else:  # pragma: no cover - the config schema allows nothing else
        raise ValueError(f"unknown index kind {kind!r}")
    index = faiss.IndexIDMap2(inner)
    if count:
        index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
    return index, kind


def _build_settings(config: CollectionConfig) -> tuple[object, ...]:
    """The settings an index is built with (search-time ones are applied at load)."""
    return (
        config.index,
        config.exact_max_vectors,
        config.hnsw.m,
        config.hnsw.ef_construction,
        config.ivf.nlist,
    )


def _stored_settings(meta: Mapping[str, Any]) -> tuple[object, ...] | None:
    try:
        return _build_settings(CollectionConfig.model_validate(meta.get("config", {})))
    except ValueError:  # written by another release: rebuild
        return None


def _set_search_params(index: faiss.Index, kind: str, config: CollectionConfig) -> None:
    inner = faiss.downcast_index(index.index)
    if kind == "hnsw":
        inner.hnsw.efSearch = config.hnsw.ef_search
    elif kind == "ivf":
        inner.nprobe = max(1, min(config.ivf.nprobe, inner.nlist))


def _gpu_available() -> bool:
    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:  # pragma: no cover - a broken GPU build
        return False


# --------------------------------------------------------------------------------------------
# writing a version


def _embedding_blob(row: np.ndarray) -> bytes:
    return np.ascontiguousarray(row, dtype=np.float32).tobytes()


class CollectionWriter:
    """One ingestion: a new version of a collection, published by :meth:`commit`.

    Starts from a copy of the live version's chunks (if any); :meth:`replace_source` and
    :meth:`delete_source` change that copy; :meth:`commit` builds the index, renames the version
    into place and switches ``CURRENT``. Until then readers see only the previous version, and
    :meth:`abort` (or an exception inside ``with``) leaves nothing behind. One writer per
    collection at a time (an exclusive lock on the collection directory).

    ``config`` is the collection's configuration, None when the tenant does not configure it
    (which raises :class:`NotFound`); ``configured``, if given, is the tenant's collections and
    ``name`` must be one of them.
    """

    def __init__(
        self,
        data_dir: Path,
        tenant: str,
        name: str,
        config: CollectionConfig | None,
        dim: int,
        *,
        encoder: str = "",
        configured: Mapping[str, object] | None = None,
    ) -> None:
        if config is None:
            raise _no_collection(tenant, name)
        self.directory = collection_dir(data_dir, tenant, name, configured)
        self.tenant = tenant
        self.name = name
        self.config = config
        self.dim = int(dim)
        self.encoder = encoder
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_handle = self._acquire_lock()
        self._conn: sqlite3.Connection | None = None
        self._tmp: Path | None = None
        self._dedup: faiss.IndexIDMap2 | None = None
        try:
            self._remove_leftovers()
            self.base_version = _current_version(self.directory)
            base_meta = read_meta(self.directory, self.base_version) if self.base_version else {}
            if base_meta and int(base_meta.get("dim", self.dim)) != self.dim:
                raise FailedPrecondition(
                    f"collection {name!r} of tenant {tenant!r} holds {base_meta['dim']}-dimension "
                    f"embeddings; this encoder makes {self.dim}. Delete the collection directory "
                    f"{self.directory} to rebuild it with the new encoder"
                )
            # changed index settings alone are reason enough for a new version
            self.changed = bool(base_meta) and _stored_settings(base_meta) != _build_settings(
                config
            )
            self._tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self.directory))
            chunks_path = self._tmp / CHUNKS_FILE
            if self.base_version:
                shutil.copyfile(self.directory / self.base_version / CHUNKS_FILE, chunks_path)
            self._conn = sqlite3.connect(chunks_path, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=MEMORY")
            self._conn.execute("PRAGMA synchronous=OFF")  # the file is fsynced at commit
            self._conn.executescript(_SCHEMA)
            if self.base_version and not has_lexical_index(self._conn):
                self.changed = True  # written before the lexical index: this version adds it
            self._conn.execute("BEGIN")
            stored = self._conn.execute(
                "SELECT value FROM settings WHERE key = 'next_chunk_id'"
            ).fetchone()
            top = self._conn.execute("SELECT COALESCE(MAX(chunk_id), -1) + 1 FROM chunks")
            self._next_id = max(int(stored[0]) if stored else 0, int(top.fetchone()[0]))
        except BaseException:
            self.abort()
            raise

    # -- lifecycle

    def _acquire_lock(self) -> Any:
        handle = open(self.directory / LOCK_FILE, "a+b")  # noqa: SIM115 - held until released
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise FailedPrecondition(
                f"another ingestion of collection {self.name!r} of tenant {self.tenant!r} is "
                "running; try again when it has finished"
            ) from None
        return handle

    def _release_lock(self) -> None:
        if self._lock_handle is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_handle.fileno(), fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None

    def _remove_leftovers(self) -> None:
        """Temporary directories and files of ingestions that crashed (we hold the lock)."""
        for path in self.directory.iterdir():
            if path.name.startswith(TEMP_PREFIX) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.name.startswith(f".{CURRENT_FILE}.") and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)

    def __enter__(self) -> CollectionWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()  # after a commit there is nothing left to abort

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise FailedPrecondition("this collection writer is closed (committed or aborted)")
        return self._conn

    def abort(self) -> None:
        """Drop the unpublished version; the live one is untouched. Safe to call twice."""
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self._dedup = None
        self._release_lock()

    # -- reading the working copy

    @property
    def size(self) -> int:
        return int(self._db().execute("SELECT COUNT(*) FROM chunks").fetchone()[0])

    def source_digest(self, source: str) -> str | None:
        row = self._db().execute("SELECT digest FROM sources WHERE source = ?", (source,))
        found = row.fetchone()
        return str(found[0]) if found else None

    def texts(self) -> Iterator[str]:
        """The text of every stored chunk (for exact-duplicate checks)."""
        for (text,) in self._db().execute("SELECT text FROM chunks").fetchall():
            yield str(text)

    def embeddings_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int64 [n], embeddings float32 [n, dim])`` of every stored chunk, by id."""
        rows = self._db().execute("SELECT chunk_id, embedding FROM chunks ORDER BY chunk_id")
        ids: list[int] = []
        blobs: list[bytes] = []
        for chunk_id, blob in rows:
            ids.append(int(chunk_id))
            blobs.append(blob)
        matrix = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(ids), self.dim)
        return np.asarray(ids, dtype=np.int64), matrix.copy()

    def max_similarity(self, embeddings: np.ndarray) -> np.ndarray:
        """For each row, the highest cosine to any stored chunk (-inf when there is none).

        Kept current through :meth:`replace_source` and :meth:`delete_source`, so chunks written
        earlier in this ingestion count too.
        """
        queries = _normalized(embeddings, self.dim)
        if self._dedup is None:
            ids, matrix = self.embeddings_matrix()
            self._dedup = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
            if len(ids):
                self._dedup.add_with_ids(matrix, ids)
        if not len(queries) or self._dedup.ntotal == 0:
            return np.full(len(queries), -np.inf, dtype=np.float32)
        scores, ids = self._dedup.search(queries, 1)
        return np.where(ids[:, 0] >= 0, scores[:, 0], -np.inf).astype(np.float32)

    # -- changing the working copy

    def _drop_chunks(self, source: str) -> int:
        db = self._db()
        ids = [
            row[0] for row in db.execute("SELECT chunk_id FROM chunks WHERE source = ?", (source,))
        ]
        if ids:
            db.execute("DELETE FROM chunks WHERE source = ?", (source,))
            if self._dedup is not None:
                self._dedup.remove_ids(np.asarray(ids, dtype=np.int64))
        return len(ids)

    def replace_source(
        self, source: str, chunks: Sequence[ChunkRecord], embeddings: np.ndarray, digest: str
    ) -> list[int]:
        """Store ``chunks`` as the whole of ``source`` (its old chunks go first); their ids."""
        if not source:
            raise InvalidArgument("a source id must not be empty")
        wrong = [c.source for c in chunks if c.source != source]
        if wrong:
            raise InvalidArgument(f"chunks of source {wrong[0]!r} given for source {source!r}")
        vectors = _normalized(embeddings, self.dim)
        if len(vectors) != len(chunks):
            raise InvalidArgument(f"{len(chunks)} chunks but {len(vectors)} embeddings")
        db = self._db()
        self._drop_chunks(source)
        ids = list(range(self._next_id, self._next_id + len(chunks)))
        self._next_id += len(chunks)
        db.executemany(
            "INSERT INTO chunks (chunk_id, source, position, text, tags, title, embedding) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    chunk_id,
                    source,
                    int(chunk.position),
                    chunk.text,
                    json.dumps(list(chunk.tags), ensure_ascii=False),
                    chunk.title,
                    _embedding_blob(vector),
                )
                for chunk_id, chunk, vector in zip(ids, chunks, vectors, strict=True)
            ],
        )
        db.execute(
            "INSERT INTO sources (source, digest) VALUES (?, ?) "
            "ON CONFLICT (source) DO UPDATE SET digest = excluded.digest",
            (source, digest),
        )
        if self._dedup is not None and ids:
            self._dedup.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
        self.changed = True
        return ids

    def delete_source(self, source: str) -> bool:
        """Remove a source and its chunks; False if the collection did not have it."""
        db = self._db()
        dropped = self._drop_chunks(source)
        known = db.execute("DELETE FROM sources WHERE source = ?", (source,)).rowcount
        if dropped or known:
            self.changed = True
            return True
        return False

    # -- publishing

    def commit(self) -> str:
        """Build the index, publish the version, point ``CURRENT`` at it; its name."""
        db = self._db()
        assert self._tmp is not None
        started = time.perf_counter()
        db.execute(
            "INSERT INTO settings (key, value) VALUES ('next_chunk_id', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(self._next_id),),
        )
        ids, vectors = self.embeddings_matrix()
        index, kind = build_index(vectors, ids, self.config)
        faiss.write_index(index, str(self._tmp / INDEX_FILE))
        lexical_started = time.perf_counter()
        terms = write_lexical_index(
            db, db.execute("SELECT chunk_id, title, text FROM chunks ORDER BY chunk_id")
        )
        lexical_seconds = time.perf_counter() - lexical_started
        db.execute("COMMIT")
        db.close()
        self._conn = None
        self._dedup = None
        _fsync_file(self._tmp / CHUNKS_FILE)
        _fsync_file(self._tmp / INDEX_FILE)
        meta = {
            "format": FORMAT_VERSION,
            "tenant": self.tenant,
            "collection": self.name,
            "index": kind,
            "dim": self.dim,
            "count": len(ids),
            "encoder": self.encoder,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.perf_counter() - started, 3),
            "lexical": {
                "format": LEXICAL_FORMAT,
                "terms": terms,
                "build_seconds": round(lexical_seconds, 3),
            },
            "config": self.config.model_dump(mode="json"),
        }
        (self._tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _fsync_file(self._tmp / META_FILE)
        os.chmod(self._tmp, 0o755)  # mkdtemp makes it private to the writing user
        fsync_dir(self._tmp)
        version = next_version(_versions(self.directory))
        os.rename(self._tmp, self.directory / version)
        self._tmp = None
        fsync_dir(self.directory)
        atomic_write(self.directory / CURRENT_FILE, f"{version}\n".encode())
        keep = {version, self.base_version}
        for old in _versions(self.directory):
            if old not in keep:
                shutil.rmtree(self.directory / old, ignore_errors=True)
        self._release_lock()
        log.info(
            "tenant %s collection %s: published %s (%s index, %d chunks)",
            self.tenant,
            self.name,
            version,
            kind,
            len(ids),
        )
        return version


# --------------------------------------------------------------------------------------------
# serving a version


def _tags(value: str) -> tuple[str, ...]:
    return tuple(json.loads(value)) if value else ()


class Collection:
    """A read-only, loaded version of one collection: a FAISS index, its chunk store and the
    store's lexical index (None for a version written before it existed).

    Thread-safe: FAISS searches run concurrently; chunk and postings reads share one
    read-only SQLite connection under a lock. Nothing on the search path touches other files.
    """

    def __init__(
        self,
        *,
        tenant: str,
        name: str,
        version: str,
        index: faiss.Index,
        index_kind: str,
        dim: int,
        size: int,
        connection: sqlite3.Connection,
        meta: Mapping[str, Any],
        device: str = "cpu",
        gpu_resources: Any = None,
        lexical: LexicalIndex | None = None,
        hybrid: HybridConfig | None = None,
    ) -> None:
        self.tenant = tenant
        self.name = name
        self.version = version
        self.index_kind = index_kind
        self.dim = dim
        self.size = size
        self.meta = dict(meta)
        self.encoder = str(meta.get("encoder", ""))
        self.device = device
        self._index = index
        self._gpu_resources = gpu_resources  # must outlive a GPU index
        self._connection = connection
        self._lock = threading.Lock()
        self.lexical = lexical
        self.hybrid = hybrid or HybridConfig()
        # CPU indexes answer concurrent searches; GPU indexes and their resources do not
        self._search_lock = threading.Lock() if device == "cuda" else None

    @classmethod
    def load(
        cls,
        data_dir: Path,
        tenant: str,
        name: str,
        config: CollectionConfig | None,
        device: str = "cpu",
        *,
        configured: Mapping[str, object] | None = None,
    ) -> Collection:
        """The live version of ``tenant``'s collection ``name``.

        ``config`` is that collection's configuration, None when the tenant does not configure
        it; ``configured`` (optional) is the tenant's collections, ``name`` must be one of them.
        :class:`NotFound` for an unconfigured, invalid or never-ingested collection.
        """
        if config is None:
            raise _no_collection(tenant, name)
        directory = collection_dir(data_dir, tenant, name, configured)
        version = _current_version(directory)
        if version is None:
            raise NotFound(
                f"collection {shown(name)} of tenant {shown(tenant)} has not been ingested "
                f"yet; run `plexus ingest CONFIG --tenant {tenant} --collection {name} PATH`"
            )
        return cls.load_version(directory, tenant, name, version, config, device)

    @classmethod
    def load_version(
        cls,
        directory: Path,
        tenant: str,
        name: str,
        version: str,
        config: CollectionConfig,
        device: str = "cpu",
    ) -> Collection:
        """One published version from a checked collection directory."""
        if version_number(version) is None:
            raise NotFound(f"{shown(version)} is not a collection version (v0001, v0002, ...)")
        confined(directory, version)  # the version folder itself must not be a link
        meta = read_meta(directory, version)
        kind = str(meta["index"])
        index = faiss.read_index(str(confined(directory, version, INDEX_FILE)))
        _set_search_params(index, kind, config)
        uri = f"{confined(directory, version, CHUNKS_FILE).as_uri()}?mode=ro&immutable=1"
        connection = sqlite3.connect(uri, uri=True, check_same_thread=False)
        try:
            count = int(connection.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])
        except BaseException:
            connection.close()
            raise
        if count != index.ntotal:
            connection.close()
            raise FailedPrecondition(
                f"collection {shown(name)} {version}: the index holds {index.ntotal} vectors but "
                f"the store {count} chunks (re-ingest it)"
            )
        lexical = None
        try:
            if has_lexical_index(connection):
                lexical = LexicalIndex(connection)
        except (sqlite3.Error, KeyError, ValueError) as exc:
            log.warning("collection %s %s: unreadable lexical index (%s)", name, version, exc)
        if lexical is not None and lexical.size != count:
            log.warning(
                "collection %s %s: the lexical index holds %d chunks but the store %d",
                name,
                version,
                lexical.size,
                count,
            )
            lexical = None
        if lexical is None and config.hybrid.bm25_weight > 0:
            log.warning(
                "collection %s of tenant %s (%s) has no lexical index: it was ingested before "
                "hybrid search existed, so it is searched by its vectors alone; re-ingest it "
                "(`plexus ingest CONFIG --tenant %s --collection %s PATH`) to add BM25",
                name,
                tenant,
                version,
                tenant,
                name,
            )
        resources = None
        used_device = "cpu"
        if device == "cuda":
            if not _gpu_available():
                log.warning(
                    "device cuda was asked for but FAISS has no GPU support here; "
                    "collection %s of tenant %s stays on the CPU",
                    name,
                    tenant,
                )
            elif kind in ("flat", "ivf"):
                resources = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(resources, 0, index)
                used_device = "cuda"
            else:
                log.info("HNSW indexes search on the CPU; collection %s stays there", name)
        return cls(
            tenant=tenant,
            name=name,
            version=version,
            index=index,
            index_kind=kind,
            dim=int(meta["dim"]),
            size=int(index.ntotal),
            connection=connection,
            meta=meta,
            device=used_device,
            gpu_resources=resources,
            lexical=lexical,
            hybrid=config.hybrid,
        )

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def __repr__(self) -> str:
        return (
            f"Collection({self.tenant}/{self.name} {self.version}: {self.index_kind}, "
            f"{self.size} x {self.dim})"
        )

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS-style ``(scores float32 [n, k], ids int64 [n, k])``, best first; missing
        neighbours have id -1 and score -inf."""
        queries = np.ascontiguousarray(vectors, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries.reshape(1, -1)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InvalidArgument(f"expected query vectors of shape [n, {self.dim}]")
        if k < 1:
            raise InvalidArgument(f"k must be at least 1, got {k}")
        n = len(queries)
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        ids = np.full((n, k), -1, dtype=np.int64)
        fetch = min(k, self.size, GPU_MAX_K if self.device == "cuda" else k)
        if n == 0 or fetch == 0:
            return scores, ids
        if self._search_lock is None:
            found_scores, found_ids = self._index.search(queries, fetch)
        else:
            with self._search_lock:
                found_scores, found_ids = self._index.search(queries, fetch)
        scores[:, :fetch] = np.where(found_ids >= 0, found_scores, -np.inf)
        ids[:, :fetch] = found_ids
        return scores, ids

    def chunks(self, ids: Sequence[int] | np.ndarray) -> list[StoredChunk]:
        """The chunks with these ids, in the given order (-1 and unknown ids skipped)."""
        wanted = [int(i) for i in ids if int(i) >= 0]
        if not wanted:
            return []
        unique = list(dict.fromkeys(wanted))
        found: dict[int, StoredChunk] = {}
        with self._lock:
            for start in range(0, len(unique), _SQL_BATCH):
                batch = unique[start : start + _SQL_BATCH]
                marks = ",".join("?" * len(batch))
                rows = self._connection.execute(
                    "SELECT chunk_id, source, position, text, tags, title FROM chunks "
                    f"WHERE chunk_id IN ({marks})",
                    batch,
                ).fetchall()
                for chunk_id, source, position, text, tags, title in rows:
                    found[int(chunk_id)] = StoredChunk(
                        int(chunk_id), source, int(position), text, _tags(tags), title
                    )
        return [found[i] for i in wanted if i in found]

    def search_hits(
        self,
        vector: np.ndarray,
        k: int,
        min_score: float = -1.0,
        tags: Sequence[str] = (),
        text: str = "",
    ) -> list[SearchHit]:
        """Up to ``k`` chunks whose cosine is at least ``min_score`` and that carry every tag,
        best first.

        Hybrid (when ``text`` has words, the version has a lexical index and
        ``hybrid.bm25_weight`` is above 0): the ``hybrid.candidates`` nearest chunks and the
        ``hybrid.candidates`` best BM25 chunks for ``text`` are pooled and each hit's score is
        the fused relevance in [0, 1]; otherwise the score is the cosine. With tags, it
        over-fetches (x 4, growing up to the collection size) until ``k`` hits pass the filter
        or nothing more can.
        """
        query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        if k < 1 or self.size == 0:
            return []
        words = query_terms(text) if text and self.hybrid_active else []
        if words:
            return self._hybrid_hits(query, words, k, min_score, frozenset(tags))
        return self._dense_hits(query, k, min_score, frozenset(tags))

    @property
    def hybrid_active(self) -> bool:
        """Whether searches given the question's text mix in BM25."""
        return self.lexical is not None and self.hybrid.bm25_weight > 0

    def _dense_hits(
        self, query: np.ndarray, k: int, min_score: float, required: frozenset[str]
    ) -> list[SearchHit]:
        fetch = min(self.size, k * 4 if required else k)
        cache: dict[int, StoredChunk] = {}
        while True:
            scores, ids = self.search(query, fetch)
            candidates = [
                (float(s), int(i)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0
            ]
            passing = [(s, i) for s, i in candidates if s >= min_score]
            self._cache_chunks(cache, [i for _, i in passing])
            hits = [
                SearchHit(cache[i], s)
                for s, i in passing
                if i in cache and required.issubset(cache[i].tags)
            ]
            exhausted = (
                fetch >= self.size or len(passing) < len(candidates) or len(candidates) < fetch
            )
            if len(hits) >= k or exhausted:
                return hits[:k]
            fetch = min(self.size, fetch * 4)

    def _hybrid_hits(
        self,
        query: np.ndarray,
        words: Sequence[str],
        k: int,
        min_score: float,
        required: frozenset[str],
    ) -> list[SearchHit]:
        lexical = self.lexical
        assert lexical is not None
        with self._lock:
            postings = lexical.postings(self._connection, words)
        depth = max(k, self.hybrid.candidates)
        fetch = min(self.size, depth * 4 if required else depth)
        cache: dict[int, StoredChunk] = {}
        cosines: dict[int, float] = {}
        while True:
            scores, ids = self.search(query, fetch)
            dense = [int(i) for i in ids[0] if i >= 0]
            for s, i in zip(scores[0], ids[0], strict=True):
                if i >= 0:
                    cosines[int(i)] = float(s)
            nominated = [int(i) for i in lexical.ids[lexical.nominate(postings, fetch)]]
            cosines.update(self._cosines(query[0], [i for i in nominated if i not in cosines]))
            pooled = list(dict.fromkeys(dense + nominated))
            passing = [i for i in pooled if cosines.get(i, -np.inf) >= min_score]
            fused = fuse(
                np.asarray([cosines[i] for i in passing], dtype=np.float32),
                lexical.score_rows(postings, lexical.rows_of(np.asarray(passing, np.int64))),
                self.hybrid.fusion,
                self.hybrid.bm25_weight,
            )
            order = np.argsort(-fused, kind="stable")
            ranked = [(passing[j], float(fused[j])) for j in order.tolist()]
            self._cache_chunks(cache, [i for i, _ in (ranked if required else ranked[:k])])
            hits = [
                SearchHit(cache[i], score)
                for i, score in ranked
                if i in cache and required.issubset(cache[i].tags)
            ]
            # only a tag filter is a reason to look deeper: without one, the pool is the answer
            dense_exhausted = len(dense) < fetch or any(cosines[i] < min_score for i in dense)
            exhausted = (
                not required or fetch >= self.size or (dense_exhausted and len(nominated) < fetch)
            )
            if len(hits) >= k or exhausted:
                return hits[:k]
            fetch = min(self.size, fetch * 4)

    def _cache_chunks(self, cache: dict[int, StoredChunk], ids: Sequence[int]) -> None:
        missing = [i for i in ids if i not in cache]
        for chunk in self.chunks(missing):
            cache[chunk.chunk_id] = chunk

    def _cosines(self, query: np.ndarray, ids: Sequence[int]) -> dict[int, float]:
        """The inner product of ``query`` with each stored chunk's embedding."""
        if not ids:
            return {}
        found: dict[int, float] = {}
        with self._lock:
            for start in range(0, len(ids), _SQL_BATCH):
                batch = list(ids[start : start + _SQL_BATCH])
                marks = ",".join("?" * len(batch))
                rows = self._connection.execute(
                    f"SELECT chunk_id, embedding FROM chunks WHERE chunk_id IN ({marks})", batch
                ).fetchall()
                if not rows:
                    continue
                matrix = np.frombuffer(b"".join(blob for _, blob in rows), dtype=np.float32)
                values = matrix.reshape(len(rows), self.dim) @ query
                found.update(
                    (int(chunk_id), float(v))
                    for (chunk_id, _), v in zip(rows, values.tolist(), strict=True)
                )
        return found


class TenantCollections:
    """The loaded collections of one tenant, by name; swapped one at a time by :meth:`reload`.

    Configured collections that were never ingested are absent until a reload finds them.
    """

    def __init__(
        self,
        data_dir: Path,
        tenant: str,
        configs: Mapping[str, CollectionConfig],
        *,
        device: str = "cpu",
    ) -> None:
        if not _is_name(tenant):
            raise NotFound(f"no tenant {shown(tenant)}")
        self.data_dir = Path(data_dir)
        self.tenant = tenant
        self.device = device
        self._configs = dict(configs)
        self._reload_lock = threading.Lock()
        loaded: dict[str, Collection] = {}
        for name, config in self._configs.items():
            try:
                loaded[name] = Collection.load(
                    self.data_dir, tenant, name, config, device, configured=self._configs
                )
            except NotFound as exc:
                log.info("%s", exc)
        self._collections: Mapping[str, Collection] = loaded

    @classmethod
    def from_config(cls, loaded: LoadedConfig, tenant: str) -> TenantCollections:
        tenant_config = loaded.config.tenants.get(tenant) if _is_name(tenant) else None
        if tenant_config is None:
            raise NotFound(f"no tenant {shown(tenant)}")
        return cls(
            loaded.data_dir, tenant, tenant_config.collections, device=loaded.config.server.device
        )

    def names(self) -> list[str]:
        """The loaded (ingested) collections."""
        return sorted(self._collections)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._collections

    def get(self, name: str) -> Collection:
        collections = self._collections
        found = collections.get(name) if isinstance(name, str) else None
        if found is not None:
            return found
        if isinstance(name, str) and name in self._configs:
            raise NotFound(
                f"collection {name!r} of tenant {self.tenant!r} has not been ingested yet; run "
                f"`plexus ingest CONFIG --tenant {self.tenant} --collection {name} PATH`"
            )
        raise _no_collection(self.tenant, name)

    def reload(self, name: str) -> str:
        """Load the live version of ``name`` and swap it in; its version.

        Searches in flight finish on the object they started with.
        """
        check_names(self.tenant, name, self._configs)
        fresh = Collection.load(
            self.data_dir,
            self.tenant,
            name,
            self._configs[name],
            self.device,
            configured=self._configs,
        )
        with self._reload_lock:
            self._collections = {**self._collections, name: fresh}
        return fresh.version
