"""What Orchestrate adds over the backend it calls, and an optional soak run.

One run starts ``bench.instant_backend`` (an OpenAI-compatible server that answers a fixed short
reply at once and times its own service per request), writes a copy of the config with every
backend pointed at it (models trained, the SQL mirror built, ``policies`` and ``products``
ingested from ``knowledge/``) and starts the Plexus server on it. Each query goes through
Orchestrate once to check its route and keep the exact chat request Plexus sent for it. Then,
per concurrency level, the same multi-process client drives (a) Orchestrate over gRPC and (b)
the backend directly over HTTP with those chat requests (the same-run baseline), alternating
ABBA; Plexus overhead = Plexus latency - direct latency at the same percentile and level. With
``--soak-seconds`` Orchestrate then runs that long while the server's RSS is sampled.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import api, common, harness
from bench.harness.adapters import chat_post, orchestrate_payload
from bench.orchestrate import soak
from bench.orchestrate.measure import (
    APP,
    QUERIES,
    ROUNDS,
    STORE_ID,
    TARGET_LEVEL,
    TARGET_P50_MS,
    TARGET_P99_MS,
    TARGETS,
    Servers,
    calibrate,
    overheads,
    summary,
    targets,
    timed_run,
)
from bench.report import document, fmt, machine_facts, machine_title, num, publish, say, table

HELP = "Orchestrate overhead over an instant backend; optional soak run"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_client(parser, requests=2000)
    parser.add_argument(
        "--soak-seconds", type=common.non_negative_float, default=0.0, help="0: no soak run"
    )
    parser.add_argument("--soak-concurrency", type=common.positive, default=16)
    common.add_out(parser)


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    if common.TENANT not in api.load_config(args.config).config.tenants:
        raise RuntimeError(f"{args.config}: the benchmark needs the {common.TENANT!r} tenant")
    key = common.api_key()
    levels = list(dict.fromkeys(args.concurrency))
    started = time.monotonic()
    children: list[harness.Child] = []
    pool: harness.ClientPool | None = None
    rows: list[dict[str, Any]] = []
    soak_result = None
    with tempfile.TemporaryDirectory(prefix="plexus-bench-orch-") as tmp:
        workdir = Path(tmp)
        try:
            say("starting the instant backend")
            backend = harness.Child("instant backend", "bench.instant_backend", f"{tmp}/port")
            children.append(backend)
            url = f"http://127.0.0.1:{backend.ready()}/v1"
            space = common.workspace(
                Path(args.config), workdir, backend_url=url, data=True, audit=args.audit
            )
            say("starting the plexus server and the client processes")
            plexus = harness.Child("plexus", "bench.harness.serve", "plexus", str(space.config))
            children.append(plexus)
            pool = harness.ClientPool(args.processes)
            plexus.ready()
            servers = Servers(plexus, backend)
            calibration = calibrate(servers, key)
            routes = {i: c["route"] for i, c in enumerate(calibration)}
            payloads = {
                "plexus": [orchestrate_payload(APP, t, {"store_id": STORE_ID}) for t, _ in QUERIES],
                "direct": [chat_post(backend.port, c["chat_request"]) for c in calibration],
            }
            avoid = {"product_question", "inventory_check"} & set(routes.values())
            if avoid:
                say(f"note: some queries route to {sorted(avoid)} (products collection)")

            def one(target: str, level: int, calls: int) -> harness.Run:
                assert pool is not None
                return timed_run(pool, servers, target, key, payloads, level, calls)

            rss_start = rss = plexus.rss_mib()
            for level, runs in harness.abba(TARGETS, levels, args.requests, ROUNDS, one):
                rss_after = plexus.rss_mib()
                for target in TARGETS:
                    rows.append(summary(target, level, runs[target], routes))
                    if target == "plexus":
                        rows[-1].update(rss_before_mib=rss, rss_after_mib=rss_after)
                rss = rss_after
            if args.soak_seconds > 0:
                say(
                    f"soak: Orchestrate at c={args.soak_concurrency} for {args.soak_seconds:g} s, "
                    f"RSS every {soak.SAMPLE_S:g} s"
                )
                level, seconds = args.soak_concurrency, args.soak_seconds
                soak_run = timed_run(
                    pool, servers, "plexus", key, payloads, level, 1, seconds, soak.SAMPLE_S
                )
                soak_result = soak.summarise(soak_run)
            rss_end = plexus.rss_mib()
        finally:
            if pool is not None:
                pool.close()
            harness.stop_all(children)
    added = overheads(rows)
    return {
        "suite": "orchestrate",
        "machine": machine_facts(),
        "settings": {
            "config": str(args.config),
            "app": APP,
            "tenant": common.TENANT,
            "requests_per_level": args.requests,
            "audit": args.audit,
            "concurrency": levels,
            "client_processes": args.processes,
            "rounds": ROUNDS,
            "soak_seconds": args.soak_seconds,
            "soak_concurrency": args.soak_concurrency,
            "order": f"per level, {ROUNDS} rounds per target in ABBA order (direct, plexus, "
            "plexus, direct; the next level starts with plexus), each round "
            f"1/{ROUNDS} of the requests on fresh connections after its own warm-up",
            "client": "grpc.aio unary-stream calls on one channel per client process "
            "(pre-serialized requests, events told apart by their first byte); direct: one "
            "asyncio keep-alive HTTP/1.1 connection per in-flight stream, same chat request "
            "bodies as Plexus sent",
            "backend": "bench.instant_backend: asyncio.Protocol HTTP/1.1, SSE over chunked "
            "encoding, 9-word reply in 5 deltas + finish + usage + [DONE]; every backend of "
            "the tenant is kind openai at it, model 'instant', default retries, breaker, "
            "timeout and max_concurrency",
        },
        "models": space.models,
        "collections": space.collections,
        "queries": [{k: v for k, v in c.items() if k != "chat_request"} for c in calibration],
        "results": rows,
        "overhead": added,
        "targets": {
            "concurrency": TARGET_LEVEL,
            "p50_added_ms_max": TARGET_P50_MS,
            "p99_added_ms_max": TARGET_P99_MS,
            "rows": targets(added),
        },
        "plexus_rss_mib": {"start": rss_start, "end": rss_end},
        "soak": soak_result,
        "seconds": round(time.monotonic() - started, 1),
    }


# ----------------------------------------------------------------------------- report


def _met(flag: bool) -> str:
    return "met" if flag else "**not met**"


def _route(q: dict[str, Any]) -> str:
    return q["route"] + ("" if q["route"] == q["expected_route"] else " (unexpected)")


def _plexus_cpu(r: dict[str, Any]) -> str:
    return fmt(r["plexus_cpu_us_per_request"]) if r["target"] == "plexus" else ""


def _backend_own(r: dict[str, Any]) -> str:
    return f"{fmt(r['backend_own']['p50_us'], 1)} / {fmt(r['backend_own']['p99_us'], 1)}"


def _rss(r: dict[str, Any]) -> str:
    if r["target"] != "plexus":
        return ""
    return f"{fmt(r['rss_before_mib'], 1)} → {fmt(r['rss_after_mib'], 1)}"


def to_markdown(report: dict[str, Any]) -> str:
    s, t = report["settings"], report["targets"]
    models = "; ".join(
        f"{name}: {m['version']} ({m['family']}, {m['labels']} labels, threshold {m['threshold']})"
        for name, m in report["models"].items()
    )
    collections = "; ".join(
        f"{name}: {c['chunks']} chunks from {', '.join(c['files'])}"
        for name, c in report["collections"].items()
    )
    mix: dict[str, int] = {}
    for q in report["queries"]:
        mix[q["route"]] = mix.get(q["route"], 0) + 1
    queries = table(
        report["queries"],
        [
            ("query", "text"),
            ("route", _route),
            ("context pieces", "context_pieces"),
            ("context tokens", "context_tokens"),
            ("deltas", "deltas"),
            ("chat request bytes", "chat_request_bytes"),
        ],
    )
    results = table(
        sorted(report["results"], key=lambda r: (r["concurrency"], r["target"])),
        [
            ("target", "target"),
            ("concurrency", "concurrency"),
            ("requests", "requests"),
            ("failures", "failures"),
            ("p50 ms", num("p50_ms", 2)),
            ("p99 ms", num("p99_ms", 2)),
            ("p50 TTFT ms", num("ttft_p50_ms", 2)),
            ("req/s", num("rps")),
            ("Plexus CPU µs/req", _plexus_cpu),
            ("backend own p50 / p99 µs", _backend_own),
            ("Plexus RSS MiB before → after", _rss),
        ],
    )
    added = table(
        report["overhead"],
        [
            ("concurrency", "concurrency"),
            ("requests (route)", lambda r: f"{r['scope']} ({r['requests']})"),
            ("p50 added ms", num("p50_added_ms", 2)),
            ("p99 added ms", num("p99_added_ms", 2)),
            ("p50 TTFT added ms", num("ttft_p50_added_ms", 2)),
        ],
    )
    goals = (
        table(
            t["rows"],
            [
                ("requests", "scope"),
                ("p50 added ms", num("p50_added_ms", 2)),
                (f"p50 ≤ {t['p50_added_ms_max']:g} ms", lambda r: _met(r["p50_met"])),
                ("p99 added ms", num("p99_added_ms", 2)),
                (f"p99 ≤ {t['p99_added_ms_max']:g} ms", lambda r: _met(r["p99_met"])),
            ],
        )
        if t["rows"]
        else f"Not measured: concurrency {t['concurrency']} was not among the levels."
    )
    failures = "\n".join(
        f"- {r['target']} c={r['concurrency']}: {r['errors']} e.g. {r['error_examples']}"
        for r in report["results"]
        if r["failures"]
    )
    rss = report["plexus_rss_mib"]
    notes = [
        f"Settings: config `{s['config']}` (tenant `{s['tenant']}`, app `{s['app']}`), "
        f"{s['requests_per_level']} calls per concurrency level per target, "
        f"{s['client_processes']} client processes. Client: {s['client']}.",
        common.audit_note(s),
        f"Order: {s['order']}.",
        f"Backend: {s['backend']}.",
        f"Model: {models}. Collections: {collections}.",
        f"Query mix ({len(report['queries'])} queries, sent in turn): "
        + ", ".join(f"{n} × {r}" for r, n in sorted(mix.items(), key=lambda x: -x[1]))
        + f". Every call carries metadata store_id={STORE_ID}.",
        '"plexus" is Orchestrate over gRPC (route, stitch the context, call the backend over '
        "HTTP, stream the events); latency runs from sending the request to receiving the final "
        'event, TTFT to the first delta event, and each stream is read to its end. "direct" is '
        "the same client sending Plexus's own chat request for the same query straight to the "
        "backend; latency runs to the end of the streamed body, TTFT to the first content chunk. "
        "Plexus overhead = plexus − direct at the same percentile and level. A call fails on a "
        'non-OK status, an error event or a stream without a final event. "Backend own" is the '
        "instant backend's service time per request (request in its buffer → reply handed to "
        'the socket), from its `/stats`. "Plexus CPU µs/req" is the server\'s user + system CPU '
        "time (all threads, /proc) over the timed phase per call. Client processes, Plexus, the "
        "backend and the OS share this machine's cores.",
    ]
    sections = [
        ("Queries", queries),
        ("Latency and throughput per level", results),
        ("Plexus overhead (plexus − direct)", added),
        (
            f"Targets at concurrency {t['concurrency']}: added p50 ≤ {t['p50_added_ms_max']:g} "
            f"ms, added p99 ≤ {t['p99_added_ms_max']:g} ms",
            f"{goals}\n\nPlexus server RSS: {fmt(rss['start'], 1)} MiB after start-up and the "
            f"calibration calls, {fmt(rss['end'], 1)} MiB at the end of the run.",
        ),
        ("Failures", failures or "No call failed."),
        ("Soak", soak.markdown(report["soak"])),
    ]
    return document(
        "Plexus Orchestrate overhead over an instant backend",
        report,
        notes,
        sections,
        f"Run time {report['seconds']} s. Plot: `orchestrate.png`.",
    )


def plot(report: dict[str, Any], plt: Any) -> Any:
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    levels = sorted({r["concurrency"] for r in report["results"]})
    by_key = {(r["target"], r["concurrency"]): r for r in report["results"]}
    xs = np.arange(len(levels))
    bars = [("direct", "p50_ms", "tab:gray"), ("direct", "p99_ms", "silver")]
    bars += [("plexus", "p50_ms", "tab:blue"), ("plexus", "p99_ms", "lightsteelblue")]
    for i, (target, key, color) in enumerate(bars):
        heights = [by_key[(target, c)][key] for c in levels]
        left.bar(xs + (i - 1.5) * 0.2, heights, 0.2, color=color, label=f"{target} {key[:-3]}")
    for x, level in zip(xs, levels, strict=True):
        added = [a for a in report["overhead"] if a["concurrency"] == level and a["scope"] == "all"]
        if added:
            top = max(by_key[(t, level)]["p99_ms"] for t in TARGETS)
            label = f"+{added[0]['p50_added_ms']:.2f} / +{added[0]['p99_added_ms']:.2f}"
            left.annotate(label, (x, top * 1.15), ha="center", va="bottom", fontsize=8)
    left.set_yscale("log")
    left.set_ylim(top=left.get_ylim()[1] * 3)
    left.set_xticks(xs, [str(c) for c in levels])
    left.set(xlabel="concurrent in-flight calls", ylabel="client-observed latency (ms)")
    left.set_title("Orchestrate vs direct backend (labels: added p50 / p99 ms)")
    left.legend(fontsize=8)
    if not soak.plot(report.get("soak"), right):
        after = [by_key[("plexus", c)]["rss_after_mib"] for c in levels]
        right.plot([str(c) for c in levels], after, marker="o", color="tab:blue", label="after")
        right.set(xlabel="concurrency level (no soak run)", title="Plexus server RSS")
        right.legend(fontsize=8)
    right.set_ylabel("VmRSS (MiB)")
    fig.suptitle(machine_title(report, "Plexus Orchestrate"))
    return fig


def main(args: argparse.Namespace) -> int:
    report = run_suite(args)
    publish(Path(args.out), "orchestrate", report, to_markdown(report), plot)
    return 0
