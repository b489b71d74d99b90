"""``plexus bench latency``: Plexus Route vs a bare grpc.aio echo server, client-observed.

One run:

1. trains the config's routing model(s) (fast family) into a temporary model directory;
2. starts the Plexus server and a bare "echo" server, each in its own subprocess on
   127.0.0.1:0. The echo server is built by the same ``new_server(config.server)`` (same
   options and limits), serves the same method path ``/plexus.v1.Router/Route``, parses the
   ``RouteRequest`` bytes and answers a small fixed ``RouteDecision``: it measures what gRPC
   and Python cost without any routing;
3. drives both with the same multi-process grpc.aio client at each concurrency level,
   alternating the servers (ABBA order) so machine noise falls on both;
4. reports p50 / p99 / p99.9 latency, requests per second and the Plexus/echo ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.common import (
    SpawnedClients,
    machine_facts,
    machine_markdown,
    markdown_table,
    percentiles_us,
    publish,
    pyplot,
    say,
    split_load,
    stop_when_parent_exits,
    train_fast_models,
)

METHOD = "/plexus.v1.Router/Route"
DEMO_KEY = "retail-demo-key"
REPO_ROOT = Path(__file__).resolve().parents[1]
SERVERS = ("echo", "plexus")
START_TIMEOUT_S = 120.0
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


# ----------------------------------------------------------------------------- servers


def _echo_handlers() -> list[Any]:
    import grpc

    from router._generated.plexus.v1 import plexus_pb2 as pb

    reply = pb.RouteDecision(
        route="echo", target="echo", confidence=1.0, model_version="echo", threshold=0.5
    ).SerializeToString()

    async def route(data: bytes, context: Any) -> bytes:
        pb.RouteRequest.FromString(data)  # the same parse Plexus does first
        return reply

    def identity(data: bytes) -> bytes:
        return data

    handler = grpc.unary_unary_rpc_method_handler(route, identity, identity)
    return [grpc.method_handlers_generic_handler("plexus.v1.Router", {"Route": handler})]


async def _serve(kind: str, config_path: Path) -> None:
    """Child process: serve until SIGTERM/SIGINT or until the parent closes our stdin."""
    from router.config import load_config
    from router.server.app import PlexusServer, new_server

    loaded = load_config(config_path)
    plexus: PlexusServer | None = None
    if kind == "plexus":
        plexus = PlexusServer(loaded, address="127.0.0.1:0")
        port = await plexus.start()
    else:
        server = new_server(loaded.config.server)
        server.add_generic_rpc_handlers(_echo_handlers())
        port = server.add_insecure_port("127.0.0.1:0")
        if port == 0:
            raise OSError("cannot listen on 127.0.0.1:0")
        await server.start()
    print(f"PORT {port}", flush=True)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    stop_when_parent_exits(loop, stop)  # EOF on stdin: the parent died or closed the pipe
    await stop.wait()
    if plexus is not None:
        await plexus.stop(grace=0)
    else:
        await server.stop(0)


@dataclass
class ServerProcess:
    kind: str
    process: subprocess.Popen[bytes]
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_server(kind: str, config_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        [sys.executable, "-m", "bench.latency", "serve", kind, str(config_path)],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def wait_for_port(kind: str, process: subprocess.Popen[bytes]) -> int:
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the {kind} server exited with status {process.returncode}")
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            line = process.stdout.readline().decode("utf-8", "replace").strip()
            if line.startswith("PORT "):
                return int(line.split()[1])
    raise RuntimeError(f"the {kind} server did not report its port in {START_TIMEOUT_S:.0f} s")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(OSError):
        process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def process_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process and all its threads (Linux /proc), else None."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# ----------------------------------------------------------------------------- client


@dataclass
class Job:
    address: str
    api_key: str
    payloads: list[bytes]
    concurrency: int
    requests: int
    warmup: int
    offset: int


async def _drive(
    call: Any, job: Job, count: int, latencies: array | None, errors: dict[str, int]
) -> bytes | None:
    metadata = (("x-api-key", job.api_key),)
    payloads = job.payloads
    state = {"next": 0, "sample": None}

    async def one_stream() -> None:
        while state["next"] < count:
            i = state["next"]
            state["next"] = i + 1
            payload = payloads[(job.offset + i) % len(payloads)]
            started = time.perf_counter_ns()
            try:
                reply = await call(payload, metadata=metadata, timeout=30)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                code = getattr(exc, "code", lambda: None)()
                name = code.name if code is not None else type(exc).__name__
                errors[name] = errors.get(name, 0) + 1
                continue
            if latencies is not None:
                latencies.append(time.perf_counter_ns() - started)
            if state["sample"] is None:
                state["sample"] = reply

    await asyncio.gather(*(one_stream() for _ in range(min(job.concurrency, max(count, 1)))))
    return state["sample"]


async def _client_run(job: Job, conn: Any) -> dict[str, Any]:
    import grpc

    from router._generated.plexus.v1 import plexus_pb2 as pb

    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(job.address) as channel:
        call = channel.unary_unary(METHOD)  # bytes in, bytes out: no client-side (de)serializing
        await asyncio.wait_for(channel.channel_ready(), timeout=30)
        warm_errors: dict[str, int] = {}
        sample = await _drive(call, job, job.warmup, None, warm_errors)
        route = pb.RouteDecision.FromString(sample).route if sample is not None else None
        conn.send(("ready", route, warm_errors))
        await loop.run_in_executor(None, conn.recv)  # "go": every worker starts together
        latencies = array("q")
        errors: dict[str, int] = {}
        started = time.perf_counter_ns()
        await _drive(call, job, job.requests, latencies, errors)
        ended = time.perf_counter_ns()
    return {"latencies": latencies.tobytes(), "start": started, "end": ended, "errors": errors}


def client_worker(conn: Any) -> None:
    """A client process: runs one job per message until it receives None."""
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            result = asyncio.run(_client_run(job, conn))
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            conn.send(("error", f"{type(exc).__name__}: {exc}", {}))
            continue
        conn.send(("done", result))


class ClientPool(SpawnedClients):
    def __init__(self, processes: int):
        super().__init__(client_worker, processes)

    def run(
        self,
        address: str,
        api_key: str,
        payloads: list[bytes],
        concurrency: int,
        requests: int,
        server_pid: int | None = None,
    ) -> dict[str, Any]:
        jobs = [
            Job(
                address,
                api_key,
                payloads,
                share,
                count,
                max(4 * share, count // 5, 20),
                offset=i * 7,
            )
            for i, (share, count) in enumerate(split_load(len(self.workers), concurrency, requests))
        ]
        cpu: dict[str, float | None] = {}
        details, warm_errors, results = self.execute(
            jobs, before_go=lambda: cpu.update(before=process_cpu_seconds(server_pid))
        )
        cpu_after = process_cpu_seconds(server_pid)
        routes = {d for d in details if d}
        if warm_errors and not routes:
            raise RuntimeError(f"every warm-up call to {address} failed: {warm_errors}")
        latencies = array("q")
        errors: dict[str, int] = {}
        for result in results:
            latencies.frombytes(result["latencies"])
            for k, v in result["errors"].items():
                errors[k] = errors.get(k, 0) + v
        start = min(r["start"] for r in results)
        end = max(r["end"] for r in results)
        before = cpu.get("before")
        server_cpu = None if before is None or cpu_after is None else cpu_after - before
        return {
            "latencies": latencies,
            "seconds": (end - start) / 1e9,
            "errors": errors,
            "server_cpu_seconds": server_cpu,
            "warmup_errors": warm_errors,
            "routes": sorted(routes),
        }


# ----------------------------------------------------------------------------- the suite


def prepare_config(config_path: Path, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """A copy of the config whose models live in ``workdir``, trained now (fast family)."""
    from router.config import load_config

    original = load_config(config_path)
    raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    raw.setdefault("server", {})
    raw["server"]["model_dir"] = str(workdir / "models")
    raw["server"]["address"] = "127.0.0.1:0"
    for tenant in raw["tenants"].values():
        model = tenant["model"]
        model["family"] = "fast"
        model["version"] = "active"
        if model.get("data"):
            model["data"] = str(original.resolve(Path(model["data"])))
    copy = workdir / "plexus.yaml"
    copy.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return copy, train_fast_models(load_config(copy))


def _payloads(config_path: Path) -> tuple[list[bytes], str]:
    from router._generated.plexus.v1 import plexus_pb2 as pb
    from router.config import load_config

    loaded = load_config(config_path)
    tenant = loaded.config.tenants.get("retail") or next(iter(loaded.config.tenants.values()))
    app = "storefront" if "storefront" in tenant.apps else sorted(tenant.apps)[0]
    payloads = [
        pb.RouteRequest(app=app, text=text, metadata={"store_id": "1432"}).SerializeToString()
        for text in QUERIES
    ]
    return payloads, app


def _check(args: argparse.Namespace) -> None:
    if args.requests < 1:
        raise ValueError("--requests must be at least 1")
    if args.processes < 1:
        raise ValueError("--processes must be at least 1")
    if any(c < 1 for c in args.concurrency):
        raise ValueError("--concurrency levels must be at least 1")


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    _check(args)
    api_key = os.environ.get("PLEXUS_API_KEY", DEMO_KEY)
    levels = list(dict.fromkeys(args.concurrency))
    started = time.monotonic()
    processes: dict[str, subprocess.Popen[bytes]] = {}
    pool: ClientPool | None = None
    with tempfile.TemporaryDirectory(prefix="plexus-bench-") as tmp:
        try:
            config_copy, models = prepare_config(Path(args.config), Path(tmp))
            payloads, app = _payloads(config_copy)
            say("starting the plexus and echo servers and the client processes")
            for kind in SERVERS:
                processes[kind] = start_server(kind, config_copy)
            pool = ClientPool(args.processes)
            servers = {
                kind: ServerProcess(kind, p, wait_for_port(kind, p))
                for kind, p in processes.items()
            }
            rows = _measure(pool, servers, api_key, payloads, levels, args.requests)
        finally:
            if pool is not None:
                pool.close()
            for process in processes.values():
                stop_process(process)
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
            "query_words_mean": round(sum(len(q.split()) for q in QUERIES) / len(QUERIES), 1),
            "order": f"per level, {ROUNDS} rounds per server alternating in ABBA order (echo, "
            "plexus, plexus, echo, ...; the next level starts with plexus), each round "
            f"1/{ROUNDS} of the requests on fresh connections after its own warm-up",
            "client": "grpc.aio, one channel per client process, pre-serialized requests",
        },
        "models": models,
        "results": rows,
        "ratios": _ratios(rows),
        "seconds": round(time.monotonic() - started, 1),
    }


def _measure(
    pool: ClientPool,
    servers: dict[str, ServerProcess],
    api_key: str,
    payloads: list[bytes],
    levels: list[int],
    requests: int,
) -> list[dict[str, Any]]:
    rows = []
    for index, level in enumerate(levels):
        rounds = max(1, min(ROUNDS, requests))
        counts = [requests // rounds + (1 if r < requests % rounds else 0) for r in range(rounds)]
        collected: dict[str, list[dict[str, Any]]] = {kind: [] for kind in SERVERS}
        for round_index, count in enumerate(counts):
            pair = list(SERVERS) if (round_index + index) % 2 == 0 else list(reversed(SERVERS))
            for kind in pair:
                run = pool.run(
                    servers[kind].address,
                    api_key,
                    payloads,
                    level,
                    count,
                    servers[kind].process.pid,
                )
                collected[kind].append(run)
                p = percentiles_us(run["latencies"])
                rate = len(run["latencies"]) / run["seconds"] if run["seconds"] else 0.0
                say(
                    f"c={level:<4d} {kind:6s} round {round_index + 1}/{rounds}: {count} "
                    f"requests, p50 {p['p50']:.0f} us, {rate:.0f} req/s"
                )
        for kind in SERVERS:
            runs = collected[kind]
            latencies = array("q")
            for run in runs:
                latencies.extend(run["latencies"])
            seconds = sum(run["seconds"] for run in runs)
            errors: dict[str, int] = {}
            for run in runs:
                for k, v in run["errors"].items():
                    errors[k] = errors.get(k, 0) + v
            stats = percentiles_us(latencies)
            cpus = [run["server_cpu_seconds"] for run in runs]
            cpu_us = (
                1e6 * sum(cpus) / len(latencies)
                if latencies and all(c is not None for c in cpus)
                else None
            )
            round_p50 = [percentiles_us(run["latencies"])["p50"] for run in runs]
            round_rps = [
                len(run["latencies"]) / run["seconds"] if run["seconds"] else 0.0 for run in runs
            ]
            rows.append(
                {
                    "server": kind,
                    "concurrency": level,
                    "requests": len(latencies),
                    "errors": errors,
                    "p50_us": stats["p50"],
                    "p99_us": stats["p99"],
                    "p99_9_us": stats["p99_9"],
                    "mean_us": stats["mean"],
                    "rps": len(latencies) / seconds if seconds else 0.0,
                    "server_cpu_us_per_request": cpu_us,
                    "round_p50_us": round_p50,
                    "round_rps": round_rps,
                    "routes_seen": sorted({r for run in runs for r in run["routes"]}),
                }
            )
            if errors:
                say(f"warning: {kind} at c={level}: errors {errors}")
    return rows


def _ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_key = {(r["server"], r["concurrency"]): r for r in rows}
    out = []
    for level in sorted({r["concurrency"] for r in rows}):
        plexus, echo = by_key.get(("plexus", level)), by_key.get(("echo", level))
        if not plexus or not echo:
            continue
        out.append(
            {
                "concurrency": level,
                "p50_ratio": plexus["p50_us"] / echo["p50_us"] if echo["p50_us"] else None,
                "p99_ratio": plexus["p99_us"] / echo["p99_us"] if echo["p99_us"] else None,
                "throughput_ratio": plexus["rps"] / echo["rps"] if echo["rps"] else None,
                "p50_added_us": plexus["p50_us"] - echo["p50_us"],
                "server_cpu_ratio": (
                    plexus["server_cpu_us_per_request"] / echo["server_cpu_us_per_request"]
                    if plexus["server_cpu_us_per_request"] and echo["server_cpu_us_per_request"]
                    else None
                ),
                "server_cpu_added_us": (
                    plexus["server_cpu_us_per_request"] - echo["server_cpu_us_per_request"]
                    if plexus["server_cpu_us_per_request"] is not None
                    and echo["server_cpu_us_per_request"] is not None
                    else None
                ),
            }
        )
    return out


def _fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def to_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    models = "; ".join(
        f"{t}: {m['version']} ({m['family']}, {m['labels']} labels, threshold {m['threshold']})"
        for t, m in report["models"].items()
    )

    def spread(values: list[float]) -> str:
        return f"{min(values):,.0f}–{max(values):,.0f}" if values else "n/a"

    results = markdown_table(
        [
            "server",
            "concurrency",
            "requests",
            "errors",
            "p50 µs",
            "p99 µs",
            "p99.9 µs",
            "req/s",
            "server CPU µs/req",
            "p50 per round µs",
            "req/s per round",
        ],
        [
            [
                r["server"],
                r["concurrency"],
                r["requests"],
                sum(r["errors"].values()),
                _fmt(r["p50_us"]),
                _fmt(r["p99_us"]),
                _fmt(r["p99_9_us"]),
                _fmt(r["rps"]),
                _fmt(r["server_cpu_us_per_request"]),
                spread(r["round_p50_us"]),
                spread(r["round_rps"]),
            ]
            for r in sorted(report["results"], key=lambda r: (r["concurrency"], r["server"]))
        ],
    )
    ratios = markdown_table(
        [
            "concurrency",
            "p50 plexus/echo",
            "p99 plexus/echo",
            "throughput plexus/echo",
            "p50 added by Plexus (µs)",
            "server CPU plexus/echo",
            "server CPU added (µs/req)",
        ],
        [
            [
                r["concurrency"],
                _fmt(r["p50_ratio"], 2),
                _fmt(r["p99_ratio"], 2),
                _fmt(r["throughput_ratio"], 2),
                _fmt(r["p50_added_us"]),
                _fmt(r["server_cpu_ratio"], 2),
                _fmt(r["server_cpu_added_us"]),
            ]
            for r in report["ratios"]
        ],
    )
    return f"""# Plexus latency: Route vs a bare gRPC echo server

{machine_markdown(report["machine"])}

- Settings: config `{s["config"]}`, app `{s["app"]}`, {s["requests_per_level"]} requests per \
concurrency level per server, {s["client_processes"]} client processes ({s["client"]}), \
{s["queries"]} retail queries of ~{s["query_words_mean"]} words.
- Order: {s["order"]}.
- Model: {models}.
- Latency is client-observed (send to reply, µs); req/s is the requests over the timed \
wall-clock span. The client processes, both servers and the OS share this machine's cores, so \
the echo server's numbers are the floor this client and gRPC's Python stack reach here. \
"Server CPU µs/req" is the server process's user + system CPU time (all threads, from \
/proc) over the timed phase divided by the requests: it is less sensitive to core contention \
than wall-clock numbers. The per-round columns show the spread between the alternating rounds.

## Latency and throughput

{results}

## Plexus relative to echo

{ratios}

Run time {report["seconds"]} s. Plot: `latency.png`.
"""


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    levels = sorted({r["concurrency"] for r in report["results"]})
    colors = {"plexus": "tab:blue", "echo": "tab:gray"}
    styles = {"p50_us": "-", "p99_us": "--", "p99_9_us": ":"}
    for kind in SERVERS:
        rows = {r["concurrency"]: r for r in report["results"] if r["server"] == kind}
        for key, style in styles.items():
            left.plot(
                levels,
                [rows[c][key] for c in levels],
                style,
                marker="o",
                color=colors[kind],
                label=f"{kind} {key[:-3].replace('_', '.')}",
            )
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xticks(levels, [str(c) for c in levels])
    left.set_xlabel("concurrent in-flight requests")
    left.set_ylabel("client-observed latency (µs)")
    left.set_title("Latency percentiles")
    left.legend(fontsize=8)
    width = 0.38
    xs = range(len(levels))
    for offset, kind in ((-width / 2, "echo"), (width / 2, "plexus")):
        rows = {r["concurrency"]: r for r in report["results"] if r["server"] == kind}
        right.bar(
            [x + offset for x in xs],
            [rows[c]["rps"] for c in levels],
            width,
            color=colors[kind],
            label=kind,
        )
    right.set_xticks(list(xs), [str(c) for c in levels])
    right.set_xlabel("concurrent in-flight requests")
    right.set_ylabel("requests per second")
    right.set_title("Throughput")
    right.legend()
    fig.suptitle(
        f"Plexus vs echo, {report['machine']['cpu_model']}, {report['machine']['cpu_cores']} cores"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    report = run_suite(args)
    publish(Path(args.out), "latency", report, to_markdown(report), plot)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve" and sys.argv[2] in SERVERS:
        asyncio.run(_serve(sys.argv[2], Path(sys.argv[3])))
    else:
        raise SystemExit(
            "usage: python -m bench.latency serve {echo,plexus} CONFIG "
            "(use `plexus bench latency` to run the benchmark)"
        )
