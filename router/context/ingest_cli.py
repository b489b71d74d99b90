"""``plexus ingest``: add, replace or delete documents of a tenant's collection."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from router.config import ConfigError, LoadedConfig, load_config

DESCRIPTION = """\
Read documents (.md, .markdown, .txt, .html, .htm, .jsonl, .csv; folders are walked), clean
them, cut them into overlapping token windows, drop exact and near duplicates, embed them and
publish a new version of the collection. Sources whose text and settings are unchanged are
skipped; changed ones are replaced. A file that cannot be read is reported and skipped, the
rest is ingested. A running server picks the new version up when the collection is reloaded.

A source id is the file's path relative to the given PATH's parent (docs/faq.md for PATH
docs/), plus #ID (or the line / row number) for each record of a .jsonl or .csv file.
JSON Lines records: {"text": ..., "id"?: ..., "title"?: ..., "tags"?: [...]}; CSV files: a
header with a text column and optional id, title and tags (separated by ;) columns.
"""

MAX_LISTED = 20


def add_ingest_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``ingest`` to the ``plexus`` sub-commands."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "ingest",
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
