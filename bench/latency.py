"""Route vs a bare gRPC echo servicer, client-observed, at each concurrency level.

One run trains the config's routing models (fast family) into a temporary directory, starts
the Plexus server and the echo servicer (``bench.harness.serve``: same ``new_server`` settings,
same method path, parses the ``RouteRequest`` and answers a fixed ``RouteDecision``) in
subprocesses on 127.0.0.1:0, and drives both with the same multi-process grpc.aio client,
alternating them ABBA so machine noise falls on both. Reported per server and level: p50 / p99
/ p99.9 latency, requests per second, server CPU time per request and the Plexus/echo ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common, harness
from bench.harness.adapters import route_payload
from bench.report import (
    document,
    machine_facts,
    machine_title,
    num,
    percentiles_us,
    publish,
    say,
    table,
)

HELP = "Route vs a bare echo servicer, c=1/16/64"
SERVERS = ("echo", "plexus")
ROUNDS = 4  # per level and server; the servers alternate ABBA-style between rounds

# Realistic retail chat queries, about 20 words each.
QUERIES = [
    "hi there, is the 65 inch samsung qled tv still in stock at store 1432 or should I "
    "order online",
    "I was charged twice for my order last week and the second charge still has not been "
    "refunded to my card",
    "what time does the Elm Street store close on sunday, and is the pharmacy counter open "
    "the same hours",
    "my order 7781204 was supposed to arrive on tuesday but the tracking has not updated since "
    "friday, where is it",
    "how many gold tier reward points do I have right now and when do the points from last "
    "month expire",
    "does the Ninja air fryer AF101 have a dishwasher safe basket, and what is the capacity in "
    "quarts exactly",
    "I have asked the bot three times already, please connect me to a real person who can "
    "actually help me",
    "can you check whether the Dayton store has the kids lego millennium falcon set available "
    "for pickup this afternoon",
    "the cashier at the Riverside location refused my refund even though I had the receipt and "
    "it was within thirty days",
    "are you open on thanksgiving day this year, and what are the black friday hours at the "
    "downtown Portland store",
    "is my curbside pickup order ready yet at store 1109, I got an email saying it was "
    "delayed again today",
    "what is the warranty on the store brand vacuum cleaner and does it cover the battery if "
    "it stops charging",
    "hello, I forgot my rewards member number, can you look it up using my phone number and "
    "email address please",
    "do you have pampers size four in the 120 count box at any store within ten miles of zip "
    "code 60614",
    "is the Keurig K-Mini coffee maker compatible with reusable pods, and does it shut off "
    "automatically after brewing finishes",
    "what is the best recipe for banana bread with walnuts and how long should it bake in a "
    "regular oven",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_client(parser, requests=3000)
    common.add_out(parser)


def _row(server: str, level: int, runs: list[harness.Run]) -> dict[str, Any]:
    run = harness.combine(runs)
    stats = percentiles_us(run.latency)
    return {
        "server": server,
        "concurrency": level,
        "requests": run.requests,
        "errors": run.errors,
        "p50_us": stats["p50"],
        "p99_us": stats["p99"],
        "p99_9_us": stats["p99_9"],
        "mean_us": stats["mean"],
        "rps": run.rps,
        "server_cpu_us_per_request": run.cpu_us_per_call("server"),
        "round_p50_us": [percentiles_us(r.latency)["p50"] for r in runs],
        "round_rps": [r.rps for r in runs],
        "routes_seen": sorted(set(run.routes.values())),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_key = {(r["server"], r["concurrency"]): r for r in rows}
    out = []
    for level in sorted({r["concurrency"] for r in rows}):
        plexus, echo = by_key.get(("plexus", level)), by_key.get(("echo", level))
        if not plexus or not echo:
            continue
        cpu_p, cpu_e = plexus["server_cpu_us_per_request"], echo["server_cpu_us_per_request"]
        out.append(
            {
                "concurrency": level,
                "p50_ratio": _ratio(plexus["p50_us"], echo["p50_us"]),
                "p99_ratio": _ratio(plexus["p99_us"], echo["p99_us"]),
                "throughput_ratio": _ratio(plexus["rps"], echo["rps"]),
                "p50_added_us": plexus["p50_us"] - echo["p50_us"],
                "server_cpu_ratio": _ratio(cpu_p, cpu_e),
                "server_cpu_added_us": None if cpu_p is None or cpu_e is None else cpu_p - cpu_e,
            }
        )
    return out


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    levels = list(dict.fromkeys(args.concurrency))
    key = common.api_key()
    started = time.monotonic()
    children: list[harness.Child] = []
    pool: harness.ClientPool | None = None
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="plexus-bench-") as tmp:
        try:
            space = common.workspace(Path(args.config), Path(tmp), audit=args.audit)
            tenant = space.loaded.config.tenants.get(common.TENANT) or next(
                iter(space.loaded.config.tenants.values())
            )
            app = "storefront" if "storefront" in tenant.apps else sorted(tenant.apps)[0]
            payloads = [route_payload(app, text, {"store_id": "1432"}) for text in QUERIES]
            say("starting the plexus and echo servers and the client processes")
            servers = {
                kind: harness.Child(kind, "bench.harness.serve", kind, str(space.config))
                for kind in SERVERS
            }
            children = list(servers.values())
            pool = harness.ClientPool(args.processes)
            for child in children:
                child.ready()

            def one(kind: str, level: int, calls: int) -> harness.Run:
                child = servers[kind]
                return pool.run(  # type: ignore[union-attr]
                    kind,
                    "route",
                    ("127.0.0.1", child.port),
                    key,
                    payloads,
                    level,
                    calls,
                    watch={"server": child.pid},
                )

            for level, runs in harness.abba(SERVERS, levels, args.requests, ROUNDS, one):
                for kind in SERVERS:
                    rows.append(_row(kind, level, runs[kind]))
                    if rows[-1]["errors"]:
                        say(f"warning: {kind} at c={level}: errors {rows[-1]['errors']}")
        finally:
            if pool is not None:
                pool.close()
            harness.stop_all(children)
    return {
        "suite": "latency",
        "machine": machine_facts(),
        "settings": {
            "config": str(args.config),
            "app": app,
            "requests_per_level": args.requests,
            "concurrency": levels,
            "client_processes": args.processes,
            "queries": len(QUERIES),
            "audit": args.audit,
            "query_words_mean": round(sum(len(q.split()) for q in QUERIES) / len(QUERIES), 1),
            "order": f"per level, {ROUNDS} rounds per server alternating in ABBA order (echo, "
            "plexus, plexus, echo, ...; the next level starts with plexus), each round "
            f"1/{ROUNDS} of the requests on fresh connections after its own warm-up",
            "client": "grpc.aio, one channel per client process, pre-serialized requests",
        },
        "models": space.models,
        "results": rows,
        "ratios": ratios(rows),
        "seconds": round(time.monotonic() - started, 1),
    }


def _spread(values: list[float]) -> str:
    return f"{min(values):,.0f}–{max(values):,.0f}" if values else "n/a"


def to_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    models = "; ".join(
        f"{t}: {m['version']} ({m['family']}, {m['labels']} labels, threshold {m['threshold']})"
        for t, m in report["models"].items()
    )
    results = table(
        sorted(report["results"], key=lambda r: (r["concurrency"], r["server"])),
        [
            ("server", "server"),
            ("concurrency", "concurrency"),
            ("requests", "requests"),
            ("errors", lambda r: sum(r["errors"].values())),
            ("p50 µs", num("p50_us")),
            ("p99 µs", num("p99_us")),
            ("p99.9 µs", num("p99_9_us")),
            ("req/s", num("rps")),
            ("server CPU µs/req", num("server_cpu_us_per_request")),
            ("p50 per round µs", lambda r: _spread(r["round_p50_us"])),
            ("req/s per round", lambda r: _spread(r["round_rps"])),
        ],
    )
    relative = table(
        report["ratios"],
        [
            ("concurrency", "concurrency"),
            ("p50 plexus/echo", num("p50_ratio", 2)),
            ("p99 plexus/echo", num("p99_ratio", 2)),
            ("throughput plexus/echo", num("throughput_ratio", 2)),
            ("p50 added by Plexus (µs)", num("p50_added_us")),
            ("server CPU plexus/echo", num("server_cpu_ratio", 2)),
            ("server CPU added (µs/req)", num("server_cpu_added_us")),
        ],
    )
    notes = [
        f"Settings: config `{s['config']}`, app `{s['app']}`, {s['requests_per_level']} requests "
        f"per concurrency level per server, {s['client_processes']} client processes "
        f"({s['client']}), {s['queries']} retail queries of ~{s['query_words_mean']} words.",
        common.audit_note(s),
        f"Order: {s['order']}.",
        f"Model: {models}.",
        "Latency is client-observed (send to reply, µs); req/s is the requests over the timed "
        "wall-clock span. The client processes, both servers and the OS share this machine's "
        "cores, so the echo server's numbers are the floor this client and gRPC's Python stack "
        'reach here. "Server CPU µs/req" is the server process\'s user + system CPU time (all '
        "threads, from /proc) over the timed phase divided by the calls: it is less sensitive "
        "to core contention than wall-clock numbers. The per-round columns show the spread "
        "between the alternating rounds.",
    ]
    return document(
        "Plexus latency: Route vs a bare gRPC echo server",
        report,
        notes,
        [("Latency and throughput", results), ("Plexus relative to echo", relative)],
        f"Run time {report['seconds']} s. Plot: `latency.png`.",
    )


def plot(report: dict[str, Any], plt: Any) -> Any:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    levels = sorted({r["concurrency"] for r in report["results"]})
    colors = {"plexus": "tab:blue", "echo": "tab:gray"}
    by_kind = {
        kind: {r["concurrency"]: r for r in report["results"] if r["server"] == kind}
        for kind in SERVERS
    }
    for kind, rows in by_kind.items():
        for key, style in (("p50_us", "-"), ("p99_us", "--"), ("p99_9_us", ":")):
            label = f"{kind} {key[:-3].replace('_', '.')}"
            values = [rows[c][key] for c in levels]
            left.plot(levels, values, style, marker="o", color=colors[kind], label=label)
    left.set_xscale("log", base=2)
    left.set(yscale="log", xlabel="concurrent in-flight requests")
    left.set(ylabel="client-observed latency (µs)", title="Latency percentiles")
    left.set_xticks(levels, [str(c) for c in levels])
    left.legend(fontsize=8)
    xs = list(range(len(levels)))
    for offset, kind in ((-0.19, "echo"), (0.19, "plexus")):
        heights = [by_kind[kind][c]["rps"] for c in levels]
        right.bar([x + offset for x in xs], heights, 0.38, color=colors[kind], label=kind)
    right.set_xticks(xs, [str(c) for c in levels])
    right.set(xlabel="concurrent in-flight requests", ylabel="requests per second")
    right.set_title("Throughput")
    right.legend()
    fig.suptitle(machine_title(report, "Plexus vs echo"))
    return fig


def main(args: argparse.Namespace) -> int:
    report = run_suite(args)
    publish(Path(args.out), "latency", report, to_markdown(report), plot)
    return 0
