"""Retrieval quality, index trade-offs and Stitch latency, in one report.

Three parts, each skippable:

1. StackFAQ quality (``--data DIR``, a BEIR-layout folder; :mod:`bench.retrieval.quality`);
2. index trade-off on synthetic embeddings at each ``--sizes`` (:mod:`bench.retrieval.index`);
3. Stitch end to end with ``--stitch-chunks`` product chunks (:mod:`bench.retrieval.stitch`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bench import common
from bench.report import document, machine_facts, publish, say
from bench.retrieval import index, quality, stitch

HELP = "StackFAQ quality, index trade-offs, Stitch latency"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, help="the StackFAQ folder (e.g. ../shared/data/stackfaq)"
    )
    parser.add_argument(
        "--sizes", type=common.positive, nargs="+", default=[10_000, 100_000], help="index sizes"
    )
    parser.add_argument("--queries", type=common.positive, default=200, help="index queries")
    parser.add_argument("--stitch-chunks", type=common.non_negative, default=100_000)
    common.add_out(parser)
    parser.add_argument("--seed", type=int, default=0)
    for part in ("stackfaq", "index", "stitch"):
        parser.add_argument(
            f"--skip-{part}", action="store_true", help=f"do not run the {part} part"
        )
    parser.add_argument(
        "--skip-served",
        action="store_true",
        help="StackFAQ by exact search only (not through an ingested collection and Stitch)",
    )
    parser.add_argument(
        "--skip-dev-split",
        action="store_true",
        help="do not measure the hybrid fusion grid on the dev split made from the corpus",
    )


def _error(exc: Exception) -> int:
    print(f"plexus bench retrieval: error: {exc}", file=sys.stderr)
    return 2


def _skipped(flag: str) -> dict[str, Any]:
    return {"run": False, "reason": f"skipped (--skip-{flag})"}


def main(args: argparse.Namespace) -> int:
    import faiss

    threads = faiss.omp_get_max_threads()
    started = time.monotonic()
    data = Path(args.data) if args.data is not None else None
    stackfaq: dict[str, Any] = {}
    files: dict[str, Path] | None = None
    if args.skip_stackfaq:
        stackfaq = _skipped("stackfaq")
    elif data is None:
        stackfaq = {"run": False, "reason": "no dataset folder was given (--data DIR)"}
    elif not data.exists():
        stackfaq = {"run": False, "reason": f"the dataset folder `{data}` does not exist"}
        say(f"warning: {data} does not exist; the StackFAQ part is not run")
    else:
        try:
            if not data.is_dir():
                raise quality.DataError(f"{data} is a file; --data takes the dataset folder")
            files = quality.find_beir(data)
        except quality.DataError as exc:
            return _error(exc)
    try:
        if files is not None and data is not None:
            try:
                stackfaq = quality.run(
                    data, files, served=not args.skip_served, dev=not args.skip_dev_split
                )
            except quality.DataError as exc:
                return _error(exc)
        sizes = list(dict.fromkeys(args.sizes))
        parts = {
            "index": _skipped("index")
            if args.skip_index
            else index.run(sizes, args.queries, args.seed),
            "stitch": _skipped("stitch")
            if args.skip_stitch
            else stitch.run(args.stitch_chunks, args.seed),
        }
    finally:
        faiss.omp_set_num_threads(threads)
    report = {
        "suite": "retrieval",
        "machine": machine_facts(),
        "settings": {
            "data": None if data is None else str(data),
            "sizes": list(args.sizes),
            "queries": args.queries,
            "stitch_chunks": args.stitch_chunks,
            "seed": args.seed,
        },
        "stackfaq": stackfaq,
        **parts,
        "seconds": round(time.monotonic() - started, 1),
    }
    publish(Path(args.out), "retrieval", report, to_markdown(report), plot)
    return 0


def to_markdown(report: dict[str, Any]) -> str:
    sections = [
        (
            "1. StackFAQ retrieval quality (exact search and the served path)",
            quality.markdown(report["stackfaq"]),
        ),
        (
            "2. Index trade-off: recall@10 vs single-thread latency",
            index.markdown(report["index"]),
        ),
        (
            "3. Stitch end-to-end latency (in process, single client)",
            stitch.markdown(report["stitch"]),
        ),
    ]
    return document(
        "Plexus retrieval: quality, index trade-offs and Stitch latency",
        report,
        [],
        sections,
        f"Run time {report['seconds']} s. Plot: `retrieval.png`.",
    )


def plot(report: dict[str, Any], plt: Any) -> Any:
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    index.plot(report["index"], left)
    stitch.plot(report["stitch"], right)
    return fig
