"""What metrics and tracing cost: Route and Orchestrate throughput with them on against off.

Five variants on the same trained workspace (audit off, local backends): neither metrics nor
tracing (the baseline), twice (the second, ``off again``, shows the noise of the method);
metrics; metrics and traces of 10% of the requests (the default
``server.tracing.sample_ratio``); metrics and traces of every request.

Over gRPC: one ``plexus`` server process with metrics on ``server.metrics_address`` (not
scraped during the run) and spans exported over OTLP/gRPC to a collector in the benchmark
process that counts them, whose pipeline calls the variant's recorders only (the benchmark
switches them between rounds: variants in separate processes differ by a few percent for
reasons that have nothing to do with them, as an ``off again`` process showed); driven by the
shared client processes, alternating ABBA, the rounds split over several fresh server
processes in turn (``--server-sets``); reported per RPC and variant: calls per second, p50 /
p99, server CPU time per call, and what each loses against the baseline (goal: at most 5%).
The metrics' HTTP server and the span batcher's thread exist in every variant; unscraped and
with nothing to send, they cost nothing.

In process: one ``Plexus`` whose recorders are swapped between rounds (so every variant runs on
the same objects in the same memory), its spans written by a span batcher as a server's are,
to an exporter that counts them instead of sending them; Route at concurrency 16 and
Orchestrate at 8 (tasks on one event loop, each calling one after another), the variants
alternating over rounds. What a variant loses is the median, over rounds, of its loss against
the baseline's round beside it (a burst of other work on the machine falls on one round).

The recorders are also timed where they run, among the calls, every request traced: the
metrics' and the tracing recorder's ``record``; from their means, what they add to one call.
They are the figures to go by: the same code timed alone on one finished request in a loop
(which the report shows too) keeps what it touches in the CPU's caches, where among the calls
the rest of each request has pushed it out. The report also shows the tracing recorder's
parts (span plans and their OTLP messages; for comparison, the same spans as SDK spans through
the library's OTLP encoder), the request-log line's fields, and one ``/metrics`` exposition
after the run.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench import api, common, harness
from bench.harness.adapters import orchestrate_payload, route_payload
from bench.report import document, machine_facts, num, percentiles_us, publish, say, table

HELP = "Route/Orchestrate throughput with metrics and tracing on vs off; recorder costs"
ROUNDS = 12
VARIANTS = ("off", "off again", "metrics", "metrics+traces 10%", "metrics+traces all")
"""``off again`` is a second baseline, the same as ``off``: what it "loses" against ``off`` is
the method's own noise, measured in the same run."""
RATIOS = {"metrics+traces 10%": 0.1, "metrics+traces all": 1.0}
"""The sample ratio of the variants that trace (10% is the default of ``server.tracing``)."""
TEXT = "you charged my card twice for one order and I want my money back"
ROUTE_TEXT = (
    "hi, is the 65 inch samsung qled tv still in stock at store 1432 or should I order online"
)
CONCURRENCY = {"Route": 16, "Orchestrate": 8}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=common.DEMO_CONFIG)
    parser.add_argument(
        "--requests", type=common.positive, default=6000, help="Route calls per variant"
    )
    parser.add_argument(
        "--orchestrate", type=common.positive, default=600, help="Orchestrate calls per variant"
    )
    parser.add_argument(
        "--calls", type=common.positive, default=5000, help="direct recorder calls timed"
    )
    parser.add_argument(
        "--grpc-requests",
        type=common.positive,
        default=24000,
        help="Route calls per variant over gRPC",
    )
    parser.add_argument(
        "--grpc-orchestrate",
        type=common.positive,
        default=2400,
        help="Orchestrate calls per variant over gRPC",
    )
    parser.add_argument("--processes", type=common.positive, default=2, help="client processes")
    parser.add_argument(
        "--rounds", type=common.positive, default=ROUNDS, help="alternating rounds per variant"
    )
    parser.add_argument(
        "--server-sets",
        type=common.positive,
        default=3,
        help="fresh server processes over gRPC, one after another, the rounds split between them",
    )
    parser.add_argument("--skip-grpc", action="store_true", help="only the in-process rows")
    common.add_out(parser)


def recorder_sets(
    pipeline: Any, metrics: Any, tracings: dict[str, Any]
) -> dict[str, tuple[Any, ...]]:
    """The pipeline's recorders for each variant: those of every variant (audit, drift, the
    request log...), with the metrics recorder and the variant's tracing recorder
    (``tracings``: per traced variant) where the variant has them."""
    for tracing in tracings.values():
        tracing.follow(pipeline)
    others = tuple(r for r in pipeline.recorders if r is not metrics and r not in tracings.values())
    return {
        "off": others,
        "off again": others,
        "metrics": (*others, metrics),
        **{name: (*others, metrics, tracing) for name, tracing in tracings.items()},
    }


def variant_switch(plexus: Any, loaded: Any) -> Any:
    """In a ``plexus-variants`` benchmark server: ``use VARIANT`` -> ``USING VARIANT``, with the
    pipeline's recorders those of the variant from then on. The server's config has metrics
    and traces of 10% exported over OTLP; the variant tracing every request gets a recorder
    of its own that exports to the same collector."""
    from router.observe.otlp import CompactSpanExporter, SpanBatcher
    from router.observe.tracing import Tracing

    endpoint = loaded.config.server.tracing.endpoint or None
    every = Tracing(
        SpanBatcher(CompactSpanExporter(endpoint=endpoint)),
        sample_ratio=RATIOS["metrics+traces all"],
    )
    atexit.register(every.shutdown)  # its last spans sent, as the server's own tracer's are
    tracings = {"metrics+traces 10%": plexus.tracing, "metrics+traces all": every}
    sets = recorder_sets(plexus.pipeline, plexus.metrics, tracings)

    def on_line(line: str) -> str:
        command, _, name = line.partition(" ")
        if command != "use" or name not in sets:
            return f"ERROR unknown command {line!r}"
        plexus.pipeline.recorders = sets[name]
        return f"USING {name}"

    return on_line


class _Collector:
    """An OTLP/gRPC trace collector that counts the spans it receives."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import grpc
        from opentelemetry.proto.collector.trace.v1 import (
            trace_service_pb2,
            trace_service_pb2_grpc,
        )

        self.spans = 0
        collector = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - the RPC's name
                collector.spans += sum(
                    len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans
                )
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0)


def _server_config(space: Any, root: Path, collector_port: int) -> Path:
    """The benchmark server's config: audit off, metrics, traces of 10% to the collector."""
    raw = yaml.safe_load(space.config.read_text(encoding="utf-8"))
    for tenant in raw["tenants"].values():
        tenant["audit"] = {"enabled": False}
    server = raw["server"]
    server["metrics_address"] = "127.0.0.1:0"
    server["tracing"] = {
        "exporter": "otlp",
        "endpoint": f"http://127.0.0.1:{collector_port}",
        "sample_ratio": RATIOS["metrics+traces 10%"],
    }
    path = root / "plexus-observe-server.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def grpc_rows(space: Any, root: Path, args: argparse.Namespace) -> tuple[list[dict], int]:
    """Route and Orchestrate over gRPC; the rows and the spans the collector received.

    Every variant runs in the same server process, which switches its recorders between
    rounds (``bench.harness.serve plexus-variants``): one process can run a few percent faster
    or slower than another of the same code for its whole life (where its memory and threads
    land), which alternating rounds between processes cannot cancel. The rounds are split over
    ``args.server_sets`` fresh server processes in turn."""
    collector = _Collector()
    children: list[Any] = []
    pool = None
    rows: list[dict[str, Any]] = []
    key = common.api_key()
    plans = (
        ("Route", "route", [route_payload("storefront", ROUTE_TEXT, {})], args.grpc_requests),
        (
            "Orchestrate",
            "orchestrate",
            [orchestrate_payload("storefront", TEXT, {})],
            args.grpc_orchestrate,
        ),
    )
    sets = max(1, min(args.server_sets, args.rounds))
    collected: dict[str, dict[str, list[Any]]] = {
        rpc: {n: [] for n in VARIANTS} for rpc, *_ in plans
    }
    try:
        pool = harness.ClientPool(args.processes)
        for number in range(sets):
            say(f"server set {number + 1} of {sets}")
            server = harness.Child(
                "plexus",
                "bench.harness.serve",
                "plexus-variants",
                str(_server_config(space, root, collector.port)),
            )
            children = [server]
            server.ready()
            rounds = args.rounds // sets + (1 if number < args.rounds % sets else 0)
            for rpc, adapter, payloads, requests in plans:
                level = CONCURRENCY[rpc]

                def one(
                    name: str,
                    level: int,
                    calls: int,
                    adapter=adapter,
                    payloads=payloads,
                    server=server,
                ) -> Any:  # type: ignore[no-untyped-def]
                    reply = server.command(f"use {name}")
                    if reply != f"USING {name}":
                        raise RuntimeError(f"the server answered {reply!r} to 'use {name}'")
                    return pool.run(  # type: ignore[union-attr]
                        name,
                        adapter,
                        ("127.0.0.1", server.port),
                        key,
                        payloads,
                        level,
                        calls,
                        watch={"server": server.pid},
                    )

                for name in VARIANTS:  # warm: the first calls of a fresh process are slower
                    one(name, level, max(requests // args.rounds // 4, level))
                share = requests * rounds // args.rounds
                for _, runs in harness.abba(VARIANTS, [level], share, rounds, one):
                    for name in VARIANTS:
                        collected[rpc][name] += runs[name]
            harness.stop_all(children)
            children = []
        for rpc, *_ in plans:
            runs = collected[rpc]
            level = CONCURRENCY[rpc]
            for name in VARIANTS:
                run = harness.combine(runs[name])
                stats = percentiles_us(run.latency)
                cpu = run.cpu_us_per_call("server")
                # round by round against the baseline's round next to it, then the median
                lost = _median_percent(
                    [1 - r.rps / b.rps for r, b in zip(runs[name], runs["off"], strict=True)]
                )
                cpus = [
                    (r.cpu_us_per_call("server"), b.cpu_us_per_call("server"))
                    for r, b in zip(runs[name], runs["off"], strict=True)
                ]
                added = (
                    _median_percent([c / o - 1 for c, o in cpus if c and o])
                    if all(c and o for c, o in cpus)
                    else None
                )
                rows.append(
                    {
                        "rpc": rpc,
                        "variant": name,
                        "concurrency": level,
                        "calls": run.requests,
                        "errors": run.failures,
                        "calls_per_s": run.rps,
                        "lost_percent": lost,
                        "p50_us": stats["p50"],
                        "p99_us": stats["p99"],
                        "server_cpu_us": cpu,
                        "cpu_added_percent": added,
                    }
                )
    finally:
        if pool is not None:
            pool.close()
        harness.stop_all(children)
        collector.stop()
    return rows, collector.spans


class _Timed:
    """A recorder timed: each ``record`` of the recorder it wraps, in nanoseconds."""

    def __init__(self, recorder: Any) -> None:
        self.recorder = recorder
        self.samples: list[int] = []

    async def record(self, state: Any) -> None:
        started = time.perf_counter_ns()
        await self.recorder.record(state)
        self.samples.append(time.perf_counter_ns() - started)


class _Last:
    """A recorder that keeps the last finished state of each RPC."""

    def __init__(self) -> None:
        self.states: dict[str, Any] = {}

    async def record(self, state: Any) -> None:
        self.states[state.rpc] = state


def _config(space: Any, root: Path) -> Any:
    raw = yaml.safe_load(space.config.read_text(encoding="utf-8"))
    for tenant in raw["tenants"].values():
        tenant["audit"] = {"enabled": False}  # the audit trail's cost is its own suite's
    path = root / "plexus-observe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return api.load_config(path)


async def _run(
    plexus: Any, caller: Any, rpc: str, requests: int, level: int
) -> tuple[np.ndarray, float]:
    samples = np.empty(requests, dtype=np.int64)
    counter = iter(range(requests))

    async def task() -> None:
        for i in counter:
            started = time.perf_counter_ns()
            if rpc == "Route":
                query = api.RouteQuery("storefront", ROUTE_TEXT, request_id=f"bench-{i}")
                await plexus.pipeline.route(caller, query)
            else:
                query = api.RouteQuery("storefront", TEXT, request_id=f"bench-{i}")
                async for _ in plexus.pipeline.orchestrate(caller, query, max_tokens=32):
                    pass
            samples[i] = time.perf_counter_ns() - started

    started = time.perf_counter()
    await asyncio.gather(*(task() for _ in range(level)))
    return samples, time.perf_counter() - started


def _median_percent(shares: Sequence[float]) -> float:
    return float(np.median(shares)) * 100 if shares else float("nan")


def _timed(fn: Any, calls: int) -> dict[str, float]:
    samples = np.empty(calls, dtype=np.int64)
    clock = time.perf_counter_ns
    for i in range(calls):
        started = clock()
        fn()
        samples[i] = clock() - started
    return percentiles_us(samples)


async def _measure(loaded: Any, args: argparse.Namespace) -> dict[str, Any]:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import (
        encode_spans as library_encode,
    )
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.sdk.trace.export import SpanExportResult

    from router.observe.logs import request_fields
    from router.observe.otlp import CompactSpanExporter, SpanBatcher, add_plans
    from router.observe.tracing import Tracing

    class Counting(CompactSpanExporter):
        """Counts what it is handed instead of sending it: in process, a collector's work
        would be this process's too."""

        spans = 0

        def export(self, data: Any) -> Any:
            Counting.spans += self._count_data(data)
            return SpanExportResult.SUCCESS

    def traced(ratio: float) -> Tracing:  # as a server with ``exporter: otlp`` has it
        return Tracing(SpanBatcher(Counting()), sample_ratio=ratio)

    # One Plexus, its recorders swapped between rounds: every variant runs on the same objects
    # in the same memory, so that what differs between them is the recorders alone.
    tracings = {name: traced(ratio) for name, ratio in RATIOS.items()}
    plexus = api.Plexus(loaded, metrics=True, tracing=tracings["metrics+traces 10%"])
    pipeline, metrics = plexus.pipeline, plexus.metrics
    assert metrics is not None
    sets = recorder_sets(pipeline, metrics, tracings)
    others = sets["off"]
    last = _Last()
    sets["metrics+traces all"] += (last,)
    result: dict[str, Any] = {"throughput": []}
    try:
        caller = plexus.keys.authenticate(common.api_key())
        await plexus.warm()
        for recorders in sets.values():
            pipeline.recorders = recorders
            await _run(plexus, caller, "Route", 300, 8)
            await _run(plexus, caller, "Orchestrate", 40, 4)
        for rpc, total in (("Route", args.requests), ("Orchestrate", args.orchestrate)):
            level = CONCURRENCY[rpc]
            per_round = max(total // args.rounds, level)
            samples: dict[str, list[np.ndarray]] = {name: [] for name in sets}
            took: dict[str, list[float]] = {name: [] for name in sets}
            for round_number in range(args.rounds * 2):
                order = list(sets)
                if round_number % 2:
                    order.reverse()
                for name in order:
                    pipeline.recorders = sets[name]
                    got, seconds = await _run(plexus, caller, rpc, per_round // 2, level)
                    samples[name].append(got)
                    took[name].append(seconds)
            calls = (per_round // 2) * args.rounds * 2
            for name in sets:
                stats = percentiles_us(np.concatenate(samples[name]))
                rate = calls / sum(took[name])
                # round by round against the baseline's round next to it, then the median
                lost = _median_percent(
                    [1 - o / t for t, o in zip(took[name], took["off"], strict=True)]
                )
                result["throughput"].append(
                    {
                        "rpc": rpc,
                        "variant": name,
                        "concurrency": level,
                        "calls": calls,
                        "calls_per_s": rate,
                        "lost_percent": lost,
                        "p50_us": stats["p50"],
                        "p99_us": stats["p99"],
                    }
                )
                say(f"{rpc} {name}: {rate:,.0f} calls/s, p50 {stats['p50']:.0f} µs")
            # the recorders timed where they run, among the calls (not one state in a loop)
            timed = {"metrics": _Timed(metrics), "tracing": _Timed(tracings["metrics+traces all"])}
            pipeline.recorders = (*others, *timed.values())
            await _run(plexus, caller, rpc, per_round, level)
            for kind, recorder in timed.items():
                result.setdefault("in_loop", []).append(
                    {"rpc": rpc, "kind": kind, **percentiles_us(np.array(recorder.samples))}
                )
        tracing = tracings["metrics+traces all"]
        direct = []
        for rpc, state in sorted(last.states.items()):
            plans = tracing.plans(state, time.time_ns())
            rendered = tracing.render(state.trace, state.outcome, plans)

            def written(s: Any = state, p: Any = plans) -> None:
                spans = ExportTraceServiceRequest().resource_spans.add().scope_spans.add().spans
                add_plans(spans, s.trace, s.outcome, p)

            parts = [
                ("observe", "metrics observe", lambda s=state: metrics.observe(s, time.time_ns())),
                (
                    "plan",
                    f"tracing: {len(plans)} spans planned",
                    lambda s=state: tracing.plans(s, time.time_ns()),
                ),
                ("encode", f"tracing: the {len(plans)} spans written as OTLP messages", written),
                (
                    "render_library",
                    f"for comparison: the {len(plans)} spans as SDK spans",
                    lambda s=state, p=plans: tracing.render(s.trace, s.outcome, p),
                ),
                (
                    "encode_library",
                    "for comparison: those SDK spans through the library's OTLP encoder",
                    lambda r=rendered: library_encode(r),
                ),
                ("log", "request log fields", lambda s=state: request_fields(s)),
            ]
            for kind, part, fn in parts:
                direct.append({"rpc": rpc, "kind": kind, "part": part, **_timed(fn, args.calls)})
        result["direct"] = direct
        started = time.perf_counter_ns()
        body, _ = await metrics.exposition()
        result["exposition"] = {
            "ms": (time.perf_counter_ns() - started) / 1e6,
            "bytes": len(body),
            "series": sum(len(f.series) for f in metrics.families),
        }
        for tracing in tracings.values():
            tracing.processor.force_flush()
        result["spans_exported"] = Counting.spans
        result["spans_dropped"] = sum(t.processor.dropped for t in tracings.values())
    finally:
        pipeline.recorders = (*others, metrics, *tracings.values())  # each is closed once
        await plexus.aclose()
    return result


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="plexus-bench-observe-") as tmp:
        root = Path(tmp)
        say("training the demo's fast model and ingesting its knowledge")
        space = common.workspace(args.config, root / "workspace", data=True)
        measured = asyncio.run(_measure(_config(space, root), args))
        if not args.skip_grpc:
            say("over gRPC: a server per variant, the client processes, an OTLP collector")
            measured["grpc"], measured["grpc_spans"] = grpc_rows(space, root, args)
    measured["estimate"] = estimate(measured["in_loop"], measured.get("grpc", []))
    return {
        "suite": "observe",
        "machine": machine_facts(),
        "rounds": args.rounds,
        "server_sets": args.server_sets,
        **measured,
    }


def estimate(in_loop: Sequence[dict], grpc: Sequence[dict]) -> list[dict]:
    """What metrics and traces add to one call, from the recorders timed among the calls (the
    mean: a cost per call): the metrics' ``record``, and per traced request the tracing
    recorder's, against the server CPU of a call with neither (over gRPC), when measured."""
    rows = []
    for rpc in sorted({d["rpc"] for d in in_loop}):
        parts = {d["kind"]: d["mean"] for d in in_loop if d["rpc"] == rpc}
        off = next(
            (g["server_cpu_us"] for g in grpc if g["rpc"] == rpc and g["variant"] == "off"), None
        )
        row: dict[str, Any] = {"rpc": rpc, "metrics_us": parts["metrics"]}
        for name, ratio in RATIOS.items():
            row[name] = parts["metrics"] + ratio * parts["tracing"]
            row[f"{name} share"] = row[name] / off if off else None
        row["server_cpu_off_us"] = off
        rows.append(row)
    return rows


def to_markdown(report: dict[str, Any]) -> str:
    throughput = table(
        report["throughput"],
        [
            ("RPC", "rpc"),
            ("variant", "variant"),
            ("concurrency", "concurrency"),
            ("calls", "calls"),
            ("calls/s", num("calls_per_s", 0)),
            ("lost vs off", lambda r: f"{r['lost_percent']:+.1f}%"),
            ("p50 µs", num("p50_us", 0)),
            ("p99 µs", num("p99_us", 0)),
        ],
    )
    grpc_table = table(
        report.get("grpc", []),
        [
            ("RPC", "rpc"),
            ("server", "variant"),
            ("concurrency", "concurrency"),
            ("calls", "calls"),
            ("calls/s", num("calls_per_s", 0)),
            ("lost vs off", lambda r: f"{r['lost_percent']:+.1f}%"),
            ("p50 µs", num("p50_us", 0)),
            ("p99 µs", num("p99_us", 0)),
            ("server CPU µs/call", num("server_cpu_us", 0)),
            (
                "CPU vs off",
                lambda r: (
                    "-" if r["cpu_added_percent"] is None else f"{r['cpu_added_percent']:+.1f}%"
                ),
            ),
        ],
    )
    direct = table(
        report["direct"],
        [("RPC", "rpc"), ("part", "part"), ("p50 µs", num("p50", 1)), ("p99 µs", num("p99", 1))],
    )
    in_loop = table(
        report["in_loop"],
        [
            ("RPC", "rpc"),
            ("recorder", lambda r: "metrics" if r["kind"] == "metrics" else "tracing, traced"),
            ("p50 µs", num("p50", 1)),
            ("p99 µs", num("p99", 1)),
            ("mean µs", num("mean", 1)),
        ],
    )
    columns: list[tuple[str, Any]] = [("RPC", "rpc"), ("metrics µs", num("metrics_us", 1))]
    for name in RATIOS:
        columns.append((f"{name} µs", num(name, 1)))
        columns.append(
            (
                f"{name}, of a call's server CPU",
                lambda r, n=name: "-" if r[f"{n} share"] is None else f"{r[f'{n} share']:.1%}",
            )
        )
    columns.append(("server CPU µs/call, off", num("server_cpu_off_us", 0)))
    estimated = table(report.get("estimate", []), columns)
    exposition = report["exposition"]
    notes = [
        f"{report['rounds']} alternating rounds per RPC and variant; audit off; local backends. "
        "Over gRPC one server process runs every variant (its recorders switched between "
        "rounds), its spans go over OTLP/gRPC to a collector in the benchmark process that "
        f"counts them, and the rounds are split over {report.get('server_sets', 1)} fresh "
        "server processes in turn; in process one Plexus runs every variant and the span "
        "batcher's exporter counts them without sending. `off again` is a second baseline "
        "like `off`: what it loses or adds is the noise of the method in this run.",
        f"One /metrics exposition after the run: {exposition['series']} series, "
        f"{exposition['bytes']:,} bytes, {exposition['ms']:.1f} ms; "
        f"{report['spans_exported']:,} spans exported in process "
        f"({report['spans_dropped']:,} dropped)"
        + (
            f", {report['grpc_spans']:,} received by the OTLP collector."
            if "grpc" in report
            else "."
        ),
    ]
    return document(
        "Plexus observability: metrics and tracing on against off",
        report,
        notes,
        [
            *([("Over gRPC", grpc_table)] if report.get("grpc") else []),
            ("In process", throughput),
            ("The recorders timed among the calls (in process, every request traced)", in_loop),
            ("The parts, one call at a time on one finished request", direct),
            ("What they add to a call, from the recorders timed among the calls (mean)", estimated),
        ],
    )


def plot(report: dict[str, Any], plt: Any) -> Any:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    rows = report["throughput"]
    labels = [f"{r['rpc']}\n{r['variant']}" for r in rows]
    ax.bar(range(len(rows)), [r["calls_per_s"] for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("calls per second")
    return fig


def main(args: argparse.Namespace) -> int:
    report = run_suite(args)
    publish(args.out, "observe", report, to_markdown(report), plot)
    return 0
