"""``plexus ingest`` (add, replace or delete documents of a tenant's collection) and
``plexus mirror load`` (build a SQLite SQL mirror from a SQL script)."""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.config import ConfigError, LoadedConfig, load_config
from router.files import fsync_dir

DESCRIPTION = """\
Read documents (.md, .markdown, .txt, .html, .htm, .jsonl, .csv; folders are walked), clean
them, cut them into overlapping token windows, drop exact and near duplicates, embed them and
publish a new version of the collection. Sources whose text and settings are unchanged are
skipped; changed ones are replaced. A file that cannot be read is reported and skipped, the
rest is ingested. A running server picks the new version up when the collection is reloaded.

A source id is the file's path relative to the configuration file's folder when the file is
inside that folder (knowledge/faq.md), else its absolute path, whatever the working directory
and however the file was named (by itself or through its folder), so re-ingesting the same files
skips the unchanged ones; plus #ID (or the line / row number) for each record of a .jsonl or
.csv file.
JSON Lines records: {"text": ..., "id"?: ..., "title"?: ..., "tags"?: [...]}; CSV files: a
header with a text column and optional id, title and tags (separated by ;) columns.
"""

MAX_LISTED = 20


def add_ingest_parser(
    subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()
) -> argparse.ArgumentParser:
    """Add ``ingest`` to the ``plexus`` sub-commands."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "ingest",
        parents=list(parents),
        help="ingest documents into a tenant's collection (a new version)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", type=Path, help="the plexus YAML configuration")
    parser.add_argument("paths", type=Path, nargs="*", metavar="PATH", help="files or folders")
    parser.add_argument("--tenant", help="the tenant (default: the only one)")
    parser.add_argument(
        "--collection", help="one of the tenant's collections (default: its only one)"
    )
    parser.add_argument(
        "--tag",
        dest="tags",
        action="append",
        default=[],
        metavar="TAG",
        help="tag every ingested chunk (repeatable); sources count tags, so re-tagging "
        "replaces them",
    )
    parser.add_argument(
        "--delete",
        action="append",
        default=[],
        metavar="SOURCE_ID",
        help="remove this source from the collection (repeatable)",
    )
    parser.set_defaults(func=cmd_ingest)
    return parser


def _only(kind: str, names: Sequence[str], where: str, flag: str) -> str:
    if len(names) != 1:
        raise ConfigError(f"{where}: {len(names)} {kind} {sorted(names)}; choose one with {flag}")
    return names[0]


def _target(loaded: LoadedConfig, tenant: str | None, collection: str | None) -> tuple[str, str]:
    if tenant is None:
        tenant = _only("tenants", sorted(loaded.config.tenants), str(loaded.path), "--tenant")
    if collection is None:
        configured = loaded.tenant(tenant).collections
        collection = _only(
            "collections", sorted(configured), f"{loaded.path}: tenant {tenant!r}", "--collection"
        )
    return tenant, collection


def _listed(label: str, names: Sequence[str]) -> None:
    if not names:
        return
    print(f"  {label} ({len(names)}):")
    for name in names[:MAX_LISTED]:
        print(f"    {name}")
    if len(names) > MAX_LISTED:
        print(f"    ... and {len(names) - MAX_LISTED} more")


def cmd_ingest(args: argparse.Namespace) -> int:
    """Run one ingestion and print what it did; 1 if every file was skipped and nothing else
    happened."""
    from router.context.collections import current_meta
    from router.context.ingest import ingest

    loaded = load_config(args.config)
    tenant, collection = _target(loaded, args.tenant, args.collection)

    def say(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    report = ingest(
        loaded,
        tenant,
        collection,
        list(args.paths),
        tags=list(args.tags),
        delete=list(args.delete),
        progress=say,
    )
    configured = loaded.config.tenants[tenant].collections
    meta = current_meta(loaded.data_dir, tenant, collection, configured) or {}
    kind = meta.get("index", "none")
    version = report.version or "none (never ingested)"
    print(f"tenant {tenant}, collection {collection}: version {version}, {kind} index")
    print(
        f"  added {len(report.added_sources)}, replaced {len(report.replaced_sources)}, "
        f"unchanged {len(report.unchanged_sources)}, deleted {len(report.deleted_sources)} "
        f"sources"
    )
    _listed("added", report.added_sources)
    _listed("replaced", report.replaced_sources)
    _listed("deleted", report.deleted_sources)
    print(
        f"  chunks written: {report.chunks_written}, duplicates dropped: "
        f"{report.duplicates_dropped}, chunks in the collection: {report.total_chunks}"
    )
    if report.skipped_files:
        print(f"  skipped ({len(report.skipped_files)}):")
        for name, reason in report.skipped_files.items():
            print(f"    {name}: {reason}")
    did_something = (
        report.added_sources
        or report.replaced_sources
        or report.unchanged_sources
        or report.deleted_sources
    )
    return 1 if report.skipped_files and not did_something else 0


# --------------------------------------------------------------------------------------------
# plexus mirror load

MIRROR_DESCRIPTION = """\
Build the SQLite file of one of a tenant's SQL mirrors (sql_mirrors.NAME.url: sqlite:///PATH,
relative to the configuration file) by running SQL_FILE, a script of CREATE TABLE and INSERT
statements, into a new database. The database is built in a temporary file beside the target
and renamed into place, so readers see the old file or the new one, never a half-built one;
missing folders are created. A running server keeps reading the file it opened: restart it to
serve the new data.
"""


@dataclass
class MirrorReport:
    mirror: str
    path: Path
    tables: dict[str, int]
    """Row count of each table of the new database."""


def mirror_path(loaded: LoadedConfig, tenant: str, mirror: str) -> Path:
    """The SQLite file behind ``tenant``'s mirror ``mirror`` (as the server resolves it)."""
    from router.context.sql import SQLITE_PREFIX

    mirrors = loaded.tenant(tenant).sql_mirrors
    if mirror not in mirrors:
        raise ConfigError(
            f"{loaded.path}: tenant {tenant!r} has no SQL mirror {mirror!r} (have "
            f"{sorted(mirrors)})"
        )
    url = mirrors[mirror].url
    if not url.startswith(SQLITE_PREFIX):
        raise ConfigError(
            f"{loaded.path}: SQL mirror {mirror!r} is {url!r}, not a SQLite file; load that "
            f"database with its own tools"
        )
    return loaded.resolve(Path(url[len(SQLITE_PREFIX) :]))


def load_sql_mirror(loaded: LoadedConfig, tenant: str, mirror: str, script: Path) -> MirrorReport:
    """Run the SQL ``script`` into a fresh copy of the mirror's SQLite file and swap it in."""
    path = mirror_path(loaded, tenant, mirror)
    try:
        sql = script.read_text(encoding="utf-8")
    except OSError as exc:
        raise FileNotFoundError(f"{script}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{script}: not UTF-8 text") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    try:
        connection = sqlite3.connect(temporary)
        try:
            connection.executescript(sql)
            connection.commit()
            names = [
                row[0]
                for row in connection.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
                )
            ]
            tables = {
                name: connection.execute(f'SELECT COUNT(*) FROM "{name}"').fetchone()[0]
                for name in names
            }
        finally:
            connection.close()
        if not tables:
            raise ValueError(f"{script}: the script created no table")
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except sqlite3.Error as exc:
        raise ValueError(f"{script}: {exc}") from None
    finally:
        for leftover in (temporary, temporary.with_name(temporary.name + "-journal")):
            leftover.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return MirrorReport(mirror, path, tables)


def add_mirror_parser(
    subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()
) -> argparse.ArgumentParser:
    """Add ``mirror load`` to the ``plexus`` sub-commands."""
    mirror = subparsers.add_parser(
        "mirror", parents=list(parents), help="build a tenant's SQLite SQL mirror"
    )
    verbs = mirror.add_subparsers(dest="verb", required=True, metavar="{load}")
    parser: argparse.ArgumentParser = verbs.add_parser(
        "load",
        parents=list(parents),
        help="run a SQL script into a mirror's SQLite file (atomically)",
        description=MIRROR_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", type=Path, help="the plexus YAML configuration")
    parser.add_argument("sql_file", type=Path, metavar="SQL_FILE", help="the SQL script")
    parser.add_argument("--tenant", help="the tenant (default: the only one)")
    parser.add_argument("--mirror", help="one of the tenant's sql_mirrors (default: its only one)")
    parser.set_defaults(func=cmd_mirror_load)
    return parser


def cmd_mirror_load(args: argparse.Namespace) -> int:
    loaded = load_config(args.config)
    tenant = args.tenant or _only(
        "tenants", sorted(loaded.config.tenants), str(loaded.path), "--tenant"
    )
    name = args.mirror or _only(
        "SQL mirrors",
        sorted(loaded.tenant(tenant).sql_mirrors),
        f"{loaded.path}: tenant {tenant!r}",
        "--mirror",
    )
    report = load_sql_mirror(loaded, tenant, name, args.sql_file)
    tables = ", ".join(f"{table} ({rows} rows)" for table, rows in report.tables.items())
    print(f"tenant {tenant}, SQL mirror {name}: {report.path}: {tables}")
    return 0
