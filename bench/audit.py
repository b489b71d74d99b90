"""The audit trail's cost: records per second through the writer, and the latency it adds.

Writer: one ``AuditLog`` in a temporary folder (on the file system the run starts in, or
``--dir``), fed a realistic request record (the one a Route call of the retail demo makes) from
C concurrent coroutines; reported per C: records per second, group commits (one ``write`` and
one ``fdatasync`` each) per second and records per group. Unsigned, and signed with a fresh
Ed25519 key (checkpoints every 1,000 records, the default).

Added latency, in process: the retail demo's fast model is trained into a temporary folder and
two ``Plexus`` instances are built on it, one auditing (the default) and one with
``audit.enabled: false`` (the same-run baseline). Route runs at concurrency 1 and 64 (C tasks
on one event loop, each calling one after another), the two alternating ABBA over rounds so
machine noise falls on both; reported per level: p50 / p99 latency of each, the difference, and
throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench import api, common
from bench.report import document, machine_facts, num, percentiles_us, publish, say, table

HELP = "audit writer records/s; latency the audit adds to Route at c=1/64"
ROUNDS = 4
CHAIN_FIELDS = ("tenant", "seq", "time", "prev", "hash")
QUERY = "hi, is the 65 inch samsung qled tv still in stock at store 1432 or should I order online"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=common.DEMO_CONFIG)
    parser.add_argument(
        "--records", type=common.positive, default=20000, help="records per writer level"
    )
    parser.add_argument(
        "--writer-concurrency", type=common.positive, nargs="+", default=[1, 8, 64, 512]
    )
    parser.add_argument(
        "--requests", type=common.positive, default=4000, help="Route calls per level and setup"
    )
    parser.add_argument("--concurrency", type=common.positive, nargs="+", default=[1, 64])
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where the trails are written (default: a "
        "temporary folder under the working directory, so on its file system)",
    )
    common.add_out(parser)


# ----------------------------------------------------------------------------- the writer


async def _feed(audit: Any, record: dict[str, Any], count: int, concurrency: int) -> float:
    per_task = [count // concurrency + (i < count % concurrency) for i in range(concurrency)]

    async def task(n: int) -> None:
        for _ in range(n):
            await audit.append(record)

    started = time.perf_counter()
    await asyncio.gather(*(task(n) for n in per_task))
    return time.perf_counter() - started


def writer_rows(root: Path, record: dict[str, Any], args: argparse.Namespace) -> list[dict]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from router.observe.audit import AuditLog

    rows = []
    for signed in (False, True):
        key = Ed25519PrivateKey.generate() if signed else None
        for level in args.writer_concurrency:
            folder = root / f"writer-{'signed' if signed else 'unsigned'}-{level}"
            audit = AuditLog(folder, "bench", signing_key=key)
            asyncio.run(_feed(audit, record, min(200, args.records), level))  # warm up
            groups, records = audit.groups, audit.records
            seconds = asyncio.run(_feed(audit, record, args.records, level))
            groups, records = audit.groups - groups, audit.records - records
            audit.close()
            size = sum(p.stat().st_size for p in folder.glob("segment-*.jsonl"))
            rows.append(
                {
                    "signed": signed,
                    "concurrency": level,
                    "records": args.records,
                    "seconds": seconds,
                    "records_per_second": args.records / seconds,
                    "groups_per_second": groups / seconds,
                    "records_per_group": records / max(groups, 1),
                    "bytes_per_record": size / max(audit.records, 1),
                }
            )
            say(
                f"writer {'signed' if signed else 'unsigned'} c={level}: "
                f"{args.records / seconds:,.0f} records/s, {records / max(groups, 1):.1f} per group"
            )
    return rows


def disk_row(root: Path, record_bytes: int, count: int = 500) -> dict[str, Any]:
    """The file system's own cost of what a group commit does: one appended write of a record's
    size and one ``fdatasync``, one after another (the writer's ceiling at concurrency 1)."""
    path = root / "disk-probe"
    line = b"x" * (record_bytes - 1) + b"\n"
    samples = np.empty(count, dtype=np.int64)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for i in range(count):
            started = time.perf_counter_ns()
            os.write(fd, line)
            os.fdatasync(fd)
            samples[i] = time.perf_counter_ns() - started
    finally:
        os.close(fd)
        path.unlink()
    return {"writes": count, "bytes": record_bytes, **percentiles_us(samples)}


# ----------------------------------------------------------------------------- added latency


async def _route_run(
    plexus: Any, caller: Any, requests: int, level: int
) -> tuple[np.ndarray, float]:
    samples = np.empty(requests, dtype=np.int64)
    counter = iter(range(requests))

    async def task() -> None:
        for i in counter:
            query = api.RouteQuery("storefront", QUERY, request_id=f"bench-{i}")
            started = time.perf_counter_ns()
            await plexus.pipeline.route(caller, query)
            samples[i] = time.perf_counter_ns() - started

    started = time.perf_counter()
    await asyncio.gather(*(task() for _ in range(level)))
    return samples, time.perf_counter() - started


def _variant(space: Any, root: Path, audited: bool) -> Any:
    raw = yaml.safe_load(space.config.read_text(encoding="utf-8"))
    raw["server"]["audit_dir"] = str(root / "route-audit")
    for tenant in raw["tenants"].values():
        tenant["audit"] = {"enabled": audited}
    path = root / f"plexus-{'audited' if audited else 'baseline'}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return api.load_config(path)


def latency_rows(space: Any, root: Path, args: argparse.Namespace) -> tuple[list[dict], dict]:
    from router.observe.audit import read_records

    configs = {"audited": _variant(space, root, True), "baseline": _variant(space, root, False)}
    rows: list[dict] = []

    async def measure() -> None:
        plexi = {name: api.Plexus(loaded) for name, loaded in configs.items()}
        try:
            caller = plexi["audited"].keys.authenticate(common.api_key())
            for plexus in plexi.values():
                await plexus.warm()
                await _route_run(plexus, caller, 200, 8)  # warm up
            for level in args.concurrency:
                samples: dict[str, list[np.ndarray]] = {name: [] for name in plexi}
                seconds = dict.fromkeys(plexi, 0.0)
                for round_number in range(ROUNDS):
                    order = list(plexi) if round_number % 2 == 0 else list(reversed(plexi))
                    for name in order:
                        got, took = await _route_run(
                            plexi[name], caller, args.requests // ROUNDS, level
                        )
                        samples[name].append(got)
                        seconds[name] += took
                stats = {n: percentiles_us(np.concatenate(s)) for n, s in samples.items()}
                requests = (args.requests // ROUNDS) * ROUNDS
                rows.append(
                    {
                        "concurrency": level,
                        "requests": requests,
                        "baseline_p50_us": stats["baseline"]["p50"],
                        "audited_p50_us": stats["audited"]["p50"],
                        "added_p50_us": stats["audited"]["p50"] - stats["baseline"]["p50"],
                        "baseline_p99_us": stats["baseline"]["p99"],
                        "audited_p99_us": stats["audited"]["p99"],
                        "added_p99_us": stats["audited"]["p99"] - stats["baseline"]["p99"],
                        "baseline_rps": requests / seconds["baseline"],
                        "audited_rps": requests / seconds["audited"],
                    }
                )
                say(
                    f"Route c={level}: p50 {stats['baseline']['p50']:.0f} -> "
                    f"{stats['audited']['p50']:.0f} µs"
                )
        finally:
            for plexus in plexi.values():
                await plexus.aclose()

    asyncio.run(measure())
    last = list(read_records(root / "route-audit" / common.TENANT))[-2]  # before the checkpoint
    assert last["kind"] == "request"
    sample_record = {k: v for k, v in last.items() if k not in CHAIN_FIELDS}
    return rows, sample_record


# ----------------------------------------------------------------------------- the suite


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    base = args.dir or Path.cwd()
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="plexus-bench-audit-", dir=base) as tmp:
        root = Path(tmp)
        say("training the demo's fast model")
        space = common.workspace(args.config, root / "workspace")
        latency, record = latency_rows(space, root, args)
        say("feeding the writer")
        writer = writer_rows(root, record, args)
        record_bytes = len(lines_of_trail(root / f"writer-unsigned-{args.writer_concurrency[0]}"))
        disk = disk_row(root, record_bytes)
        filesystem = _filesystem(root)
    return {
        "suite": "audit",
        "machine": machine_facts(),
        "load_average": list(os.getloadavg()),
        "filesystem": filesystem,
        "disk": disk,
        "record_bytes": len(_canonical(record)),
        "rounds": ROUNDS,
        "writer": writer,
        "latency": latency,
    }


def lines_of_trail(folder: Path) -> bytes:
    """The first complete line of a trail (a sealed record, as written)."""
    first = sorted(folder.glob("segment-*.jsonl"))[0]
    with open(first, "rb") as handle:
        return handle.readline()


def _canonical(record: dict[str, Any]) -> bytes:
    from router.observe.audit import canonical

    return canonical(record)


def _filesystem(path: Path) -> str:
    """The file system type the trails were written on (from /proc/mounts), or "unknown"."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    best, kind = "", "unknown"
    resolved = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3 and resolved.startswith(parts[1]) and len(parts[1]) > len(best):
            best, kind = parts[1], parts[2]
    return kind


def to_markdown(report: dict[str, Any]) -> str:
    writer = table(
        report["writer"],
        [
            ("signed", lambda r: "yes" if r["signed"] else "no"),
            ("concurrency", "concurrency"),
            ("records/s", num("records_per_second")),
            ("groups/s", num("groups_per_second")),
            ("records/group", num("records_per_group", 1)),
            ("bytes/record", num("bytes_per_record")),
        ],
    )
    latency = table(
        report["latency"],
        [
            ("concurrency", "concurrency"),
            ("p50 no audit µs", num("baseline_p50_us")),
            ("p50 audited µs", num("audited_p50_us")),
            ("p50 added µs", num("added_p50_us")),
            ("p99 no audit µs", num("baseline_p99_us")),
            ("p99 audited µs", num("audited_p99_us")),
            ("p99 added µs", num("added_p99_us")),
            ("rps no audit", num("baseline_rps")),
            ("rps audited", num("audited_rps")),
        ],
    )
    disk = report["disk"]
    load = ", ".join(f"{v:.2f}" for v in report["load_average"])
    notes = [
        f"Trails written on {report['filesystem']}; a record of a Route call is "
        f"{report['record_bytes']} bytes of canonical JSON before seq, time, prev and hash.",
        "Each group is one write and one fdatasync; every record of a group is released together.",
        f"The disk alone, same run: one {disk['bytes']}-byte append + fdatasync takes "
        f"p50 {disk['p50']:.0f} µs, p99 {disk['p99']:.0f} µs ({disk['writes']} in a row).",
        f"Load average at the end of the run: {load} (other work on the machine shows here).",
        f"Route in process, audited vs audit.enabled: false on the same model, {report['rounds']} "
        "rounds alternating ABBA.",
        "At c=64 nothing in an unaudited Route suspends, so the baseline's calls run one after "
        "another and each one's latency is its own service time; audited calls wait for their "
        "group's fdatasync together with the other 63, so their latency is the whole group's "
        "cycle: compare throughput there.",
    ]
    return document(
        "Plexus audit trail cost",
        report,
        notes,
        [("Writer throughput", writer), ("Latency added to Route", latency)],
    )


def plot(report: dict[str, Any], plt: Any) -> Any:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for signed in (False, True):
        rows = [r for r in report["writer"] if r["signed"] == signed]
        left.plot(
            [r["concurrency"] for r in rows],
            [r["records_per_second"] for r in rows],
            marker="o",
            label="signed" if signed else "unsigned",
        )
    left.set_xscale("log")
    left.set_xlabel("concurrent writers")
    left.set_ylabel("records / s")
    left.legend()
    levels = [str(r["concurrency"]) for r in report["latency"]]
    x = np.arange(len(levels))
    for offset, name in ((-0.2, "baseline"), (0.2, "audited")):
        right.bar(x + offset, [r[f"{name}_p50_us"] for r in report["latency"]], 0.4, label=name)
    right.set_xticks(x, levels)
    right.set_xlabel("concurrency")
    right.set_ylabel("Route p50 (µs)")
    right.legend()
    return fig


def main(args: argparse.Namespace) -> int:
    report = run_suite(args)
    publish(args.out, "audit", report, to_markdown(report), plot)
    return 0
