"""``plexus bench orchestrate``: what Orchestrate adds over the backend it calls, and a soak run.

One run:

1. starts ``bench.instant_backend`` (an OpenAI-compatible server that answers a fixed short
   reply at once and times its own service per request) in a subprocess on 127.0.0.1:0;
2. writes a copy of the config into a temporary directory (models, data, the SQL mirror built
   from ``stores.sql``, the ``policies`` and ``products`` collections ingested from
   ``knowledge/``) with every backend pointed at the instant backend, trains the fast model,
   and starts ``plexus serve`` on it in a subprocess;
3. sends each query through Orchestrate once, checks its route and keeps the exact chat request
   Plexus sent to the backend for it (the backend's ``GET /last``);
4. at each concurrency level drives, with the same multi-process client, (a) Orchestrate over
   gRPC and (b) the instant backend directly over HTTP with those same chat requests (the
   baseline), alternating ABBA; Plexus overhead = Plexus latency - direct latency at the same
   percentile and level;
5. optionally soaks Orchestrate for ``--soak-seconds``, sampling the server's RSS every 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import os
import select
import sqlite3
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.common import (
    SpawnedClients,
    machine_facts,
    machine_markdown,
    markdown_table,
    percentiles_us,
    pyplot,
    say,
    split_load,
    train_fast_models,
    write_report,
)
from bench.latency import (
    DEMO_KEY,
    REPO_ROOT,
    START_TIMEOUT_S,
    process_cpu_seconds,
    stop_process,
)

METHOD = "/plexus.v1.Router/Orchestrate"
TARGETS = ("direct", "plexus")
ROUNDS = 2  # per level and target, ABBA: direct, plexus, plexus, direct (next level reversed)
CALL_TIMEOUT_S = 30.0
SOAK_SAMPLE_S = 5.0
TARGET_LEVEL = 16
TARGET_P50_MS = 2.0
TARGET_P99_MS = 5.0
FLAT_SLOPE_MIB_PER_MIN = 1.0  # |slope| of RSS over the soak's second half counted as flat
TENANT = "retail"
APP = "storefront"
STORE_ID = "1432"

# OrchestrateEvent's oneof, by the first byte of its encoding (field number << 3 | 2).
TAG_DECISION, TAG_CONTEXT, TAG_DELTA, TAG_FINAL, TAG_ERROR = 0x0A, 0x12, 0x1A, 0x22, 0x2A

# Short retail questions whose routes have small contexts: store_hours reads one row of the SQL
# mirror (no embedding); the others embed the question and search the policies collection.
QUERIES: list[tuple[str, str]] = [
    ("what time does the store close tonight", "store_hours"),
    ("are you open on sunday, and until what time", "store_hours"),
    ("what are your saturday hours", "store_hours"),
    ("store 1432 hours", "store_hours"),
    ("what time does the store open tomorrow", "store_hours"),
    ("is this store open late on weekdays", "store_hours"),
    ("what are the store hours this weekend", "store_hours"),
    ("what time do you close on sunday", "store_hours"),
    ("I was charged twice for the same order and want the duplicate refunded", "customer_dispute"),
    ("your store refused my refund even though I had the receipt", "customer_dispute"),
    ("how many reward points do I have and when do they expire", "loyalty_tier"),
    ("where is my order, the tracking has not updated in three days", "order_status"),
]


# ----------------------------------------------------------------------------- setup


def prepare_config(
    config_path: Path, workdir: Path, backend_url: str
) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """A copy of the config living in ``workdir``: models trained (fast family), SQL mirrors
    built from ``NAME.sql`` next to the config, policies (.md/.html/.txt) and products (.jsonl)
    ingested from ``knowledge/``, every backend an openai backend at ``backend_url``."""
    from router.config import load_config
    from router.context.ingest import ingest

    original = load_config(config_path)
    if TENANT not in original.config.tenants:
        raise RuntimeError(f"{config_path}: the benchmark needs the {TENANT!r} tenant")
    source_dir = original.base_dir
    raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    server = raw.setdefault("server", {})
    server["model_dir"] = str(workdir / "models")
    server["data_dir"] = str(workdir / "data")
    server["address"] = "127.0.0.1:0"
    mirrors: dict[str, Path] = {}
    for tenant in raw["tenants"].values():
        model = tenant["model"]
        model["family"] = "fast"
        model["version"] = "active"
        if model.get("data"):
            model["data"] = str(original.resolve(Path(model["data"])))
        for name, mirror in (tenant.get("sql_mirrors") or {}).items():
            database = workdir / "data" / f"{name}.db"
            mirror["url"] = f"sqlite:///{database}"
            mirrors[name] = database
        for name, backend in (tenant.get("backends") or {}).items():
            kept = {
                k: v
                for k, v in backend.items()
                if k not in ("kind", "url", "model", "api_key_env", "retry", "breaker")
            }
            tenant["backends"][name] = {
                "kind": "openai",
                "url": backend_url,
                "model": "instant",
                **kept,
            }
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    for name, database in mirrors.items():
        script = source_dir / f"{name}.sql"
        if not script.is_file():
            raise RuntimeError(f"no {script} to build the SQL mirror {name!r} from")
        with contextlib.closing(sqlite3.connect(database)) as db, db:
            db.executescript(script.read_text(encoding="utf-8"))
    copy = workdir / "plexus.yaml"
    copy.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    loaded = load_config(copy)

    models = train_fast_models(loaded)
    knowledge = source_dir / "knowledge"
    sets = {
        "policies": sorted(p for p in knowledge.glob("*") if p.suffix in (".md", ".html", ".txt")),
        "products": sorted(knowledge.glob("*.jsonl")),
    }
    collections = {}
    for name, paths in sets.items():
        if name not in loaded.config.tenants[TENANT].collections or not paths:
            continue
        say(f"ingesting {name!r} from {len(paths)} files")
        report = ingest(loaded, TENANT, name, paths)
        collections[name] = {
            "files": [p.name for p in paths],
            "chunks": report.total_chunks,
            "version": report.version,
        }
    return copy, models, collections


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def start_backend(portfile: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.instant_backend", str(portfile)],
        cwd=REPO_ROOT,
        env=_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )


def wait_for_portfile(process: subprocess.Popen[bytes], portfile: Path) -> int:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the instant backend exited with status {process.returncode}")
        if portfile.is_file():
            return int(portfile.read_text(encoding="ascii").strip())
        time.sleep(0.02)
    raise RuntimeError(f"the instant backend did not report its port in {START_TIMEOUT_S:.0f} s")


def start_plexus(config_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "router.cli", "serve", str(config_path), "--address", "127.0.0.1:0"],
        cwd=REPO_ROOT,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )


def wait_for_plexus(process: subprocess.Popen[bytes]) -> str:
    """The HOST:PORT from the server's ``plexus serving on HOST:PORT`` line."""
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"plexus serve exited with status {process.returncode}")
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            line = process.stdout.readline().decode("utf-8", "replace").strip()
            if line.startswith("plexus serving on "):
                return line.rsplit(" ", 1)[1]
    raise RuntimeError(f"plexus serve did not report its address in {START_TIMEOUT_S:.0f} s")


def rss_mib(pid: int | None) -> float | None:
    """Resident set size (VmRSS) of a process in MiB, from /proc; None if unreadable."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def backend_get(port: int, path: str) -> bytes:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"instant backend GET {path}: HTTP {response.status}")
        return body
    finally:
        connection.close()


def backend_stats(port: int, reset: bool = True) -> dict[str, Any]:
    query = "?samples=1&reset=1" if reset else "?samples=1"
    return json.loads(backend_get(port, "/stats" + query))


def orchestrate_payload(text: str) -> bytes:
    from router._generated.plexus.v1 import plexus_pb2 as pb

    request = pb.RouteRequest(app=APP, text=text, metadata={"store_id": STORE_ID})
    return pb.OrchestrateRequest(request=request).SerializeToString()


def calibrate(address: str, api_key: str, backend_port: int) -> list[dict[str, Any]]:
    """Each query through Orchestrate once: its route, answer and the chat request sent."""
    import grpc

    from router._generated.plexus.v1 import plexus_pb2 as pb

    out = []
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_stream(METHOD)
        grpc.channel_ready_future(channel).result(timeout=30)
        for text, expected in QUERIES:
            try:
                messages = list(
                    call(
                        orchestrate_payload(text),
                        metadata=(("x-api-key", api_key),),
                        timeout=CALL_TIMEOUT_S,
                    )
                )
            except grpc.RpcError as exc:
                raise RuntimeError(
                    f"Orchestrate failed for {text!r}: {exc.code().name}: {exc.details()}"
                ) from None
            events = [pb.OrchestrateEvent.FromString(m) for m in messages]
            kinds = [e.WhichOneof("event") for e in events]
            if not events or kinds[-1] != "final":
                detail = events[-1].error.message if events and kinds[-1] == "error" else kinds
                raise RuntimeError(f"Orchestrate for {text!r} did not end in final: {detail}")
            decision, context, final = events[0].decision, events[1].context, events[-1].final
            body = backend_get(backend_port, "/last")
            out.append(
                {
                    "text": text,
                    "expected_route": expected,
                    "route": decision.route,
                    "backend": final.backend,
                    "context_pieces": len(context.pieces),
                    "context_tokens": context.tokens_used,
                    "deltas": kinds.count("delta"),
                    "events": len(events),
                    "chat_request_bytes": len(body),
                    "chat_request": body,
                }
            )
    backend_stats(backend_port)  # forget the calibration calls
    return out


def direct_payload(port: int, body: bytes) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\n"
        b"Host: 127.0.0.1:%d\r\n"
        b"Accept: application/json, text/event-stream\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (port, len(body))
    ) + body


# ----------------------------------------------------------------------------- client


@dataclass
class Job:
    target: str  # "plexus" (gRPC Orchestrate) or "direct" (HTTP to the backend)
    host: str
    port: int
    api_key: str
    payloads: list[bytes]
    concurrency: int
    requests: int
    warmup: int
    offset: int
    seconds: float = 0.0  # > 0: run this long instead of ``requests`` calls


@dataclass
class Record:
    latency: array = field(default_factory=lambda: array("q"))  # send -> final (ns)
    ttft: array = field(default_factory=lambda: array("q"))  # send -> first delta (ns)
    query: array = field(default_factory=lambda: array("h"))  # query index of each success
    ends: array = field(default_factory=lambda: array("q"))  # completion times (ns, absolute)


class PlexusSession:
    """Orchestrate calls on a shared grpc.aio channel, bytes in and bytes out."""

    def __init__(self, call: Any, job: Job, routes: dict[int, str]):
        self.call = call
        self.payloads = job.payloads
        self.metadata = (("x-api-key", job.api_key),)
        self.routes = routes

    async def close(self) -> None:
        return None

    async def run(self, index: int) -> tuple[int, int, int, str | None, str]:
        import grpc

        from router._generated.plexus.v1 import plexus_pb2 as pb

        first = final = 0
        error: str | None = None
        detail = ""
        started = time.perf_counter_ns()
        try:
            stream = self.call(self.payloads[index], metadata=self.metadata, timeout=CALL_TIMEOUT_S)
            async for message in stream:
                tag = message[0] if message else 0
                if tag == TAG_DELTA:
                    if not first:
                        first = time.perf_counter_ns()
                elif tag == TAG_FINAL:
                    final = time.perf_counter_ns()
                elif tag == TAG_DECISION:
                    if index not in self.routes:
                        event = pb.OrchestrateEvent.FromString(message)
                        self.routes[index] = event.decision.route
                elif tag == TAG_ERROR:
                    event = pb.OrchestrateEvent.FromString(message)
                    error = f"error event {event.error.code}"
                    detail = event.error.message
        except grpc.aio.AioRpcError as exc:
            error, detail = exc.code().name, exc.details() or ""
        except Exception as exc:  # noqa: BLE001 - counted and reported
            error, detail = type(exc).__name__, str(exc)
        if error is None and not final:
            error = "no final event"
        return started, first, final, error, detail


class DirectSession:
    """Streaming chat completions straight to the backend on one keep-alive connection."""

    def __init__(self, job: Job):
        self.job = job
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def run(self, index: int) -> tuple[int, int, int, str | None, str]:
        first = final = 0
        started = time.perf_counter_ns()
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                if self.writer is None:
                    self.reader, self.writer = await asyncio.open_connection(
                        self.job.host, self.job.port
                    )
                    started = time.perf_counter_ns()  # the connection is not the baseline's
                reader, writer = self.reader, self.writer
                assert reader is not None
                writer.write(self.job.payloads[index])
                head = await reader.readuntil(b"\r\n\r\n")
                status = head[9:12]
                if status != b"200" or b"chunked" not in head.lower():
                    await self.close()
                    return started, 0, 0, f"HTTP {status.decode('latin-1')}", head[:200].decode()
                done = False
                while True:
                    line = await reader.readuntil(b"\r\n")
                    size = int(line.split(b";", 1)[0], 16)
                    if size == 0:
                        await reader.readuntil(b"\r\n")  # no trailers: the final CRLF
                        break
                    data = await reader.readexactly(size + 2)
                    if not first and b'"content"' in data:
                        first = time.perf_counter_ns()
                    if b"[DONE]" in data:
                        done = True
                final = time.perf_counter_ns()
        except (OSError, EOFError, ValueError, TimeoutError, asyncio.IncompleteReadError) as exc:
            await self.close()
            return started, 0, 0, type(exc).__name__, str(exc)
        if not done:
            return started, first, final, "no [DONE]", ""
        return started, first, final, None, ""


async def _drive(
    open_session: Callable[[], Any],
    job: Job,
    count: int | None,
    deadline_ns: int | None,
    record: Record | None,
    errors: dict[str, int],
    examples: list[str],
) -> None:
    state = {"next": 0}
    payloads = len(job.payloads)

    async def one_stream() -> None:
        session = open_session()
        try:
            while True:
                i = state["next"]
                if count is not None and i >= count:
                    return
                if deadline_ns is not None and time.perf_counter_ns() >= deadline_ns:
                    return
                state["next"] = i + 1
                index = (job.offset + i) % payloads
                started, first, final, error, detail = await session.run(index)
                if error is not None:
                    errors[error] = errors.get(error, 0) + 1
                    if len(examples) < 3:
                        examples.append(f"{error}: {detail[:200]}")
                    continue
                if record is not None:
                    record.latency.append(final - started)
                    record.ttft.append(first - started if first else -1)
                    record.query.append(index)
                    record.ends.append(final)
        finally:
            await session.close()

    streams = job.concurrency if count is None else min(job.concurrency, max(count, 1))
    await asyncio.gather(*(one_stream() for _ in range(streams)))


async def _client_run(job: Job, conn: Any) -> dict[str, Any]:
    import grpc

    loop = asyncio.get_running_loop()
    routes: dict[int, str] = {}
    channel = None
    if job.target == "plexus":
        channel = grpc.aio.insecure_channel(f"{job.host}:{job.port}")
        call = channel.unary_stream(METHOD)  # bytes in, bytes out: no client-side parsing

        def open_session() -> Any:
            return PlexusSession(call, job, routes)

        await asyncio.wait_for(channel.channel_ready(), timeout=30)
    else:

        def open_session() -> Any:
            return DirectSession(job)

    try:
        warm_errors: dict[str, int] = {}
        await _drive(open_session, job, job.warmup, None, None, warm_errors, [])
        conn.send(("ready", routes, warm_errors))
        await loop.run_in_executor(None, conn.recv)  # "go": every worker starts together
        record = Record()
        errors: dict[str, int] = {}
        examples: list[str] = []
        started = time.perf_counter_ns()
        if job.seconds > 0:
            deadline = started + int(job.seconds * 1e9)
            await _drive(open_session, job, None, deadline, record, errors, examples)
        else:
            await _drive(open_session, job, job.requests, None, record, errors, examples)
        ended = time.perf_counter_ns()
    finally:
        if channel is not None:
            await channel.close()
    return {
        "latency": record.latency.tobytes(),
        "ttft": record.ttft.tobytes(),
        "query": record.query.tobytes(),
        "ends": record.ends.tobytes(),
        "start": started,
        "end": ended,
        "errors": errors,
        "examples": examples,
        "routes": routes,
    }


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


@dataclass
class Run:
    target: str
    concurrency: int
    latency: np.ndarray  # ns, successes only
    ttft: np.ndarray  # ns, -1 where no delta came
    query: np.ndarray
    ends: np.ndarray
    start: int
    seconds: float
    errors: dict[str, int]
    examples: list[str]
    routes: dict[int, str]
    plexus_cpu_s: float | None = None
    backend_cpu_s: float | None = None
    backend: dict[str, Any] = field(default_factory=dict)
    rss_samples: list[tuple[float, float]] = field(default_factory=list)


class ClientPool(SpawnedClients):
    """``processes`` spawned client processes; the concurrency level is split between them."""

    def __init__(self, processes: int):
        super().__init__(client_worker, processes)

    def run(
        self,
        target: str,
        host: str,
        port: int,
        api_key: str,
        payloads: list[bytes],
        concurrency: int,
        requests: int,
        *,
        seconds: float = 0.0,
        before_go: Callable[[], None] | None = None,
        tick: Callable[[], None] | None = None,
    ) -> Run:
        jobs = [
            Job(
                target,
                host,
                port,
                api_key,
                payloads,
                share,
                count,
                20 if seconds > 0 else max(4 * share, count // 5, 20),
                i * 5,
                seconds,
            )
            for i, (share, count) in enumerate(split_load(len(self.workers), concurrency, requests))
        ]
        details, warm_errors, results = self.execute(jobs, before_go=before_go, tick=tick)
        routes: dict[int, str] = {}
        for detail in details:
            routes.update(detail)
        errors: dict[str, int] = {}
        examples: list[str] = []
        for result in results:
            for k, v in result["errors"].items():
                errors[k] = errors.get(k, 0) + v
            examples += result["examples"]
            routes.update(result["routes"])
        if warm_errors:
            say(f"warning: {target} warm-up errors {warm_errors}")

        def joined(key: str, code: str) -> np.ndarray:
            values = array(code)
            for result in results:
                values.frombytes(result[key])
            return np.asarray(values, dtype=np.int64)

        start = min(r["start"] for r in results)
        end = max(r["end"] for r in results)
        return Run(
            target=target,
            concurrency=concurrency,
            latency=joined("latency", "q"),
            ttft=joined("ttft", "q"),
            query=joined("query", "h"),
            ends=joined("ends", "q"),
            start=start,
            seconds=(end - start) / 1e9,
            errors=errors,
            examples=examples[:3],
            routes=routes,
        )


# ----------------------------------------------------------------------------- measuring


@dataclass
class Servers:
    plexus: subprocess.Popen[bytes]
    plexus_host: str
    plexus_port: int
    backend: subprocess.Popen[bytes]
    backend_port: int


def _timed_run(
    pool: ClientPool,
    servers: Servers,
    target: str,
    api_key: str,
    payloads: dict[str, list[bytes]],
    concurrency: int,
    requests: int,
    seconds: float = 0.0,
    rss_every: float | None = None,
) -> Run:
    """One client run with the servers' CPU time, the backend's own times and (optionally) the
    Plexus server's RSS sampled every ``rss_every`` seconds."""
    cpu: dict[str, float | None] = {}
    samples: list[tuple[float, float]] = []
    clock = {"start": 0.0, "next": 0.0}

    def sample() -> None:
        value = rss_mib(servers.plexus.pid)
        if value is not None:
            samples.append((time.monotonic() - clock["start"], value))

    def before_go() -> None:
        backend_stats(servers.backend_port)  # forget the warm-up calls
        cpu["plexus"] = process_cpu_seconds(servers.plexus.pid)
        cpu["backend"] = process_cpu_seconds(servers.backend.pid)
        clock["start"] = time.monotonic()
        clock["next"] = clock["start"] + (rss_every or 0)
        if rss_every:
            sample()

    def tick() -> None:
        if rss_every and time.monotonic() >= clock["next"]:
            clock["next"] += rss_every
            sample()

    if target == "plexus":
        host, port = servers.plexus_host, servers.plexus_port
    else:
        host, port = "127.0.0.1", servers.backend_port
    run = pool.run(
        target,
        host,
        port,
        api_key,
        payloads[target],
        concurrency,
        requests,
        seconds=seconds,
        before_go=before_go,
        tick=tick,
    )
    if rss_every and (not samples or time.monotonic() - clock["start"] - samples[-1][0] > 1.0):
        sample()  # the end of the run, unless a tick just sampled it
    plexus_cpu = process_cpu_seconds(servers.plexus.pid)
    backend_cpu = process_cpu_seconds(servers.backend.pid)
    if cpu.get("plexus") is not None and plexus_cpu is not None:
        run.plexus_cpu_s = plexus_cpu - cpu["plexus"]  # type: ignore[operator]
    if cpu.get("backend") is not None and backend_cpu is not None:
        run.backend_cpu_s = backend_cpu - cpu["backend"]  # type: ignore[operator]
    run.backend = backend_stats(servers.backend_port)
    run.rss_samples = samples
    return run


def _ms(values_ns: np.ndarray) -> dict[str, float]:
    stats = percentiles_us(values_ns)
    return {k: v / 1000.0 for k, v in stats.items()}


def _summary(
    target: str, level: int, runs: list[Run], query_routes: dict[int, str]
) -> dict[str, Any]:
    latency = np.concatenate([r.latency for r in runs])
    ttft = np.concatenate([r.ttft for r in runs])
    query = np.concatenate([r.query for r in runs])
    seconds = sum(r.seconds for r in runs)
    errors: dict[str, int] = {}
    for run in runs:
        for k, v in run.errors.items():
            errors[k] = errors.get(k, 0) + v
    backend_ns = np.concatenate(
        [np.asarray(r.backend.get("samples_ns", []), dtype=np.int64) for r in runs]
    )
    requests = int(latency.size)
    calls = requests + sum(errors.values())
    lat = _ms(latency)
    first = _ms(ttft[ttft >= 0])
    own = percentiles_us(backend_ns)

    def per_request(values: list[float | None]) -> float | None:
        if not calls or any(v is None for v in values):
            return None
        return 1e6 * sum(values) / calls  # type: ignore[arg-type]

    by_route = {}
    for route in sorted(set(query_routes.values())):
        mask = np.isin(query, [q for q, r in query_routes.items() if r == route])
        if mask.any():
            stats = _ms(latency[mask])
            by_route[route] = {"requests": int(mask.sum()), "p50_ms": stats["p50"]}
            by_route[route]["p99_ms"] = stats["p99"]
    return {
        "target": target,
        "concurrency": level,
        "requests": requests,
        "failures": sum(errors.values()),
        "errors": errors,
        "error_examples": [e for r in runs for e in r.examples][:3],
        "p50_ms": lat["p50"],
        "p99_ms": lat["p99"],
        "p99_9_ms": lat["p99_9"],
        "mean_ms": lat["mean"],
        "ttft_p50_ms": first["p50"],
        "rps": requests / seconds if seconds else 0.0,
        "round_p50_ms": [_ms(r.latency)["p50"] for r in runs],
        "plexus_cpu_us_per_request": per_request([r.plexus_cpu_s for r in runs]),
        "backend_cpu_us_per_request": per_request([r.backend_cpu_s for r in runs]),
        "backend_own": {
            "count": int(backend_ns.size),
            "p50_us": own["p50"],
            "p99_us": own["p99"],
            "mean_us": own["mean"],
        },
        "by_route": by_route,
    }


def measure_levels(
    pool: ClientPool,
    servers: Servers,
    api_key: str,
    payloads: dict[str, list[bytes]],
    levels: list[int],
    requests: int,
    query_routes: dict[int, str],
) -> list[dict[str, Any]]:
    rows = []
    for index, level in enumerate(levels):
        rounds = max(1, min(ROUNDS, requests))
        counts = [requests // rounds + (1 if r < requests % rounds else 0) for r in range(rounds)]
        collected: dict[str, list[Run]] = {t: [] for t in TARGETS}
        rss_before = rss_mib(servers.plexus.pid)
        for round_index, count in enumerate(counts):
            order = TARGETS if (round_index + index) % 2 == 0 else tuple(reversed(TARGETS))
            for target in order:
                run = _timed_run(pool, servers, target, api_key, payloads, level, count)
                collected[target].append(run)
                p = _ms(run.latency)
                rate = run.latency.size / run.seconds if run.seconds else 0.0
                failed = sum(run.errors.values())
                say(
                    f"c={level:<4d} {target:6s} round {round_index + 1}/{rounds}: {count} calls, "
                    f"p50 {p['p50']:.2f} ms, p99 {p['p99']:.2f} ms, {rate:.0f} req/s"
                    + (f", {failed} failed {run.errors}" if failed else "")
                )
        rss_after = rss_mib(servers.plexus.pid)
        for target in TARGETS:
            row = _summary(target, level, collected[target], query_routes)
            if target == "plexus":
                row["rss_before_mib"], row["rss_after_mib"] = rss_before, rss_after
            rows.append(row)
    return rows


def overheads(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plexus minus direct, at the same percentile and level: overall and per route."""
    by_key = {(r["target"], r["concurrency"]): r for r in rows}
    out = []
    for level in sorted({r["concurrency"] for r in rows}):
        plexus, direct = by_key.get(("plexus", level)), by_key.get(("direct", level))
        if not plexus or not direct:
            continue
        out.append(
            {
                "concurrency": level,
                "scope": "all",
                "requests": plexus["requests"],
                "p50_added_ms": plexus["p50_ms"] - direct["p50_ms"],
                "p99_added_ms": plexus["p99_ms"] - direct["p99_ms"],
                "ttft_p50_added_ms": plexus["ttft_p50_ms"] - direct["ttft_p50_ms"],
            }
        )
        for route, stats in plexus["by_route"].items():
            base = direct["by_route"].get(route)
            if not base:
                continue
            out.append(
                {
                    "concurrency": level,
                    "scope": route,
                    "requests": stats["requests"],
                    "p50_added_ms": stats["p50_ms"] - base["p50_ms"],
                    "p99_added_ms": stats["p99_ms"] - base["p99_ms"],
                    "ttft_p50_added_ms": None,
                }
            )
    return out


def targets(added: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = [r for r in added if r["concurrency"] == TARGET_LEVEL]
    return [
        {
            "scope": r["scope"],
            "p50_added_ms": r["p50_added_ms"],
            "p50_met": bool(r["p50_added_ms"] <= TARGET_P50_MS),
            "p99_added_ms": r["p99_added_ms"],
            "p99_met": bool(r["p99_added_ms"] <= TARGET_P99_MS),
        }
        for r in rows
    ]


def soak(
    pool: ClientPool,
    servers: Servers,
    api_key: str,
    payloads: dict[str, list[bytes]],
    concurrency: int,
    seconds: float,
) -> dict[str, Any]:
    say(f"soak: Orchestrate at c={concurrency} for {seconds:g} s, RSS every {SOAK_SAMPLE_S:g} s")
    run = _timed_run(
        pool,
        servers,
        "plexus",
        api_key,
        payloads,
        concurrency,
        1,
        seconds=seconds,
        rss_every=SOAK_SAMPLE_S,
    )
    series = run.rss_samples
    times = np.array([t for t, _ in series])
    values = np.array([v for _, v in series])
    half = times >= (times[-1] / 2 if times.size else 0)
    slope = None
    if half.sum() >= 3 and np.ptp(times[half]) > 0:  # a shorter soak gives no slope
        slope = float(np.polyfit(times[half] / 60.0, values[half], 1)[0])
    failures = sum(run.errors.values())
    lat = _ms(run.latency)
    windows = []
    if run.ends.size:
        offsets = (run.ends - run.start) / 1e9
        for start in np.arange(0.0, max(run.seconds, SOAK_SAMPLE_S), SOAK_SAMPLE_S):
            mask = (offsets >= start) & (offsets < start + SOAK_SAMPLE_S)
            if mask.any():
                stats = _ms(run.latency[mask])
                windows.append(
                    {
                        "t_s": float(start),
                        "requests": int(mask.sum()),
                        "p50_ms": stats["p50"],
                        "p99_ms": stats["p99"],
                    }
                )
    calls = run.latency.size + failures
    cpu = 1e6 * run.plexus_cpu_s / calls if run.plexus_cpu_s is not None and calls else None
    return {
        "concurrency": concurrency,
        "seconds": run.seconds,
        "requests": int(run.latency.size),
        "failures": failures,
        "errors": run.errors,
        "error_examples": run.examples,
        "rps": run.latency.size / run.seconds if run.seconds else 0.0,
        "p50_ms": lat["p50"],
        "p99_ms": lat["p99"],
        "plexus_cpu_us_per_request": cpu,
        "rss_series": [{"t_s": round(t, 2), "rss_mib": round(v, 2)} for t, v in series],
        "rss_first_mib": float(values[0]) if values.size else None,
        "rss_max_mib": float(values.max()) if values.size else None,
        "rss_last_mib": float(values[-1]) if values.size else None,
        "rss_slope_second_half_mib_per_min": slope,
        "flat": None if slope is None else bool(abs(slope) <= FLAT_SLOPE_MIB_PER_MIN),
        "windows": windows,
    }


# ----------------------------------------------------------------------------- the suite


def _check(args: argparse.Namespace) -> None:
    if args.requests < 1:
        raise ValueError("--requests must be at least 1")
    if args.processes < 1:
        raise ValueError("--processes must be at least 1")
    if not args.concurrency or any(c < 1 for c in args.concurrency):
        raise ValueError("--concurrency levels must be at least 1")
    if args.soak_seconds < 0 or (args.soak_seconds > 0 and args.soak_concurrency < 1):
        raise ValueError("--soak-seconds must be >= 0 and --soak-concurrency at least 1")


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    _check(args)
    api_key = os.environ.get("PLEXUS_API_KEY", DEMO_KEY)
    levels = list(dict.fromkeys(args.concurrency))
    started = time.monotonic()
    backend: subprocess.Popen[bytes] | None = None
    plexus: subprocess.Popen[bytes] | None = None
    pool: ClientPool | None = None
    soak_result = None
    with tempfile.TemporaryDirectory(prefix="plexus-bench-orch-") as tmp:
        workdir = Path(tmp)
        try:
            say("starting the instant backend")
            backend = start_backend(workdir / "backend.port")
            backend_port = wait_for_portfile(backend, workdir / "backend.port")
            backend_url = f"http://127.0.0.1:{backend_port}/v1"
            config_copy, models, collections = prepare_config(
                Path(args.config), workdir, backend_url
            )
            say("starting plexus serve and the client processes")
            plexus = start_plexus(config_copy)
            pool = ClientPool(args.processes)
            address = wait_for_plexus(plexus)
            host, _, port = address.rpartition(":")
            servers = Servers(plexus, host, int(port), backend, backend_port)
            calibration = calibrate(address, api_key, backend_port)
            query_routes = {i: c["route"] for i, c in enumerate(calibration)}
            payloads = {
                "plexus": [orchestrate_payload(text) for text, _ in QUERIES],
                "direct": [direct_payload(backend_port, c["chat_request"]) for c in calibration],
            }
            avoid = {"product_question", "inventory_check"} & set(query_routes.values())
            if avoid:
                say(f"note: some queries route to {sorted(avoid)} (products collection)")
            rss_start = rss_mib(plexus.pid)
            rows = measure_levels(
                pool, servers, api_key, payloads, levels, args.requests, query_routes
            )
            if args.soak_seconds > 0:
                soak_result = soak(
                    pool, servers, api_key, payloads, args.soak_concurrency, args.soak_seconds
                )
            rss_end = rss_mib(plexus.pid)
        finally:
            if pool is not None:
                pool.close()
            for process in (plexus, backend):
                if process is not None:
                    stop_process(process)
    added = overheads(rows)
    return {
        "suite": "orchestrate",
        "machine": machine_facts(),
        "settings": {
            "config": str(args.config),
            "app": APP,
            "tenant": TENANT,
            "requests_per_level": args.requests,
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
        "models": models,
        "collections": collections,
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


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _met(flag: bool) -> str:
    return "met" if flag else "**not met**"


def to_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    models = "; ".join(
        f"{t}: {m['version']} ({m['family']}, {m['labels']} labels, threshold {m['threshold']})"
        for t, m in report["models"].items()
    )
    collections = "; ".join(
        f"{name}: {c['chunks']} chunks from {', '.join(c['files'])}"
        for name, c in report["collections"].items()
    )
    routes: dict[str, int] = {}
    for q in report["queries"]:
        routes[q["route"]] = routes.get(q["route"], 0) + 1
    mix = ", ".join(f"{n} × {r}" for r, n in sorted(routes.items(), key=lambda x: -x[1]))
    queries = markdown_table(
        ["query", "route", "context pieces", "context tokens", "deltas", "chat request bytes"],
        [
            [
                q["text"],
                q["route"] + ("" if q["route"] == q["expected_route"] else " (unexpected)"),
                q["context_pieces"],
                q["context_tokens"],
                q["deltas"],
                q["chat_request_bytes"],
            ]
            for q in report["queries"]
        ],
    )

    def rss(row: dict[str, Any]) -> str:
        if row["target"] != "plexus":
            return ""
        return f"{_fmt(row['rss_before_mib'], 1)} → {_fmt(row['rss_after_mib'], 1)}"

    results = markdown_table(
        [
            "target",
            "concurrency",
            "requests",
            "failures",
            "p50 ms",
            "p99 ms",
            "p50 TTFT ms",
            "req/s",
            "Plexus CPU µs/req",
            "backend own p50 / p99 µs",
            "Plexus RSS MiB before → after",
        ],
        [
            [
                r["target"],
                r["concurrency"],
                r["requests"],
                r["failures"],
                _fmt(r["p50_ms"]),
                _fmt(r["p99_ms"]),
                _fmt(r["ttft_p50_ms"]),
                _fmt(r["rps"], 0),
                _fmt(r["plexus_cpu_us_per_request"], 0) if r["target"] == "plexus" else "",
                f"{_fmt(r['backend_own']['p50_us'], 1)} / {_fmt(r['backend_own']['p99_us'], 1)}",
                rss(r),
            ]
            for r in sorted(report["results"], key=lambda r: (r["concurrency"], r["target"]))
        ],
    )
    added = markdown_table(
        [
            "concurrency",
            "requests (route)",
            "p50 added ms",
            "p99 added ms",
            "p50 TTFT added ms",
        ],
        [
            [
                r["concurrency"],
                f"all ({r['requests']})"
                if r["scope"] == "all"
                else f"{r['scope']} ({r['requests']})",
                _fmt(r["p50_added_ms"]),
                _fmt(r["p99_added_ms"]),
                _fmt(r["ttft_p50_added_ms"]),
            ]
            for r in report["overhead"]
        ],
    )
    t = report["targets"]
    if t["rows"]:
        target_table = markdown_table(
            ["requests", "p50 added ms", f"p50 ≤ {t['p50_added_ms_max']:g} ms", "p99 added ms"]
            + [f"p99 ≤ {t['p99_added_ms_max']:g} ms"],
            [
                [
                    r["scope"],
                    _fmt(r["p50_added_ms"]),
                    _met(r["p50_met"]),
                    _fmt(r["p99_added_ms"]),
                    _met(r["p99_met"]),
                ]
                for r in t["rows"]
            ],
        )
    else:
        target_table = f"Not measured: concurrency {t['concurrency']} was not among the levels."
    failures = [
        f"- {r['target']} c={r['concurrency']}: {r['errors']} e.g. {r['error_examples']}"
        for r in report["results"]
        if r["failures"]
    ]
    failure_text = "\n".join(failures) if failures else "No call failed."
    server_rss = report["plexus_rss_mib"]
    return f"""# Plexus Orchestrate overhead over an instant backend

{machine_markdown(report["machine"])}

- Settings: config `{s["config"]}` (tenant `{s["tenant"]}`, app `{s["app"]}`), \
{s["requests_per_level"]} calls per concurrency level per target, {s["client_processes"]} \
client processes. Client: {s["client"]}.
- Order: {s["order"]}.
- Backend: {s["backend"]}.
- Model: {models}. Collections: {collections}.
- Query mix ({len(report["queries"])} queries, sent in turn): {mix}. Every call carries \
metadata store_id={STORE_ID}.
- "plexus" is Orchestrate over gRPC (route, stitch the context, call the backend over HTTP, \
stream the events); latency runs from sending the request to receiving the final event, TTFT \
to the first delta event, and each stream is read to its end. "direct" is the same client \
sending Plexus's own chat request for the same query straight to the backend; latency runs to \
the end of the streamed body, TTFT to the first content chunk. Plexus overhead = plexus − \
direct at the same percentile and level. A call fails on a non-OK status, an error event or a \
stream without a final event. "Backend own" is the instant backend's service time per request \
(request in its buffer → reply handed to the socket), from its `/stats`. "Plexus CPU µs/req" \
is the server's user + system CPU time (all threads, /proc) over the timed phase per call. \
Client processes, Plexus, the backend and the OS share this machine's cores.

## Queries

{queries}

## Latency and throughput per level

{results}

## Plexus overhead (plexus − direct)

{added}

## Targets at concurrency {t["concurrency"]}: added p50 ≤ {t["p50_added_ms_max"]:g} ms, \
added p99 ≤ {t["p99_added_ms_max"]:g} ms

{target_table}

Plexus server RSS: {_fmt(server_rss["start"], 1)} MiB after start-up and the calibration calls, \
{_fmt(server_rss["end"], 1)} MiB at the end of the run.

## Failures

{failure_text}

{soak_markdown(report["soak"])}
Run time {report["seconds"]} s. Plot: `orchestrate.png`.
"""


def soak_markdown(soak_result: dict[str, Any] | None) -> str:
    if not soak_result:
        return "## Soak\n\nNot run (`--soak-seconds 0`).\n"
    r = soak_result
    series = ", ".join(f"{p['t_s']:.0f} s: {p['rss_mib']:.1f}" for p in r["rss_series"])
    slope = r["rss_slope_second_half_mib_per_min"]
    table = markdown_table(
        [
            "concurrency",
            "seconds",
            "requests",
            "failures",
            "req/s",
            "p50 ms",
            "p99 ms",
            "Plexus CPU µs/req",
            "RSS first / max / last MiB",
            "RSS slope, 2nd half (MiB/min)",
        ],
        [
            [
                r["concurrency"],
                _fmt(r["seconds"], 1),
                r["requests"],
                r["failures"],
                _fmt(r["rps"], 0),
                _fmt(r["p50_ms"]),
                _fmt(r["p99_ms"]),
                _fmt(r["plexus_cpu_us_per_request"], 0),
                f"{_fmt(r['rss_first_mib'], 1)} / {_fmt(r['rss_max_mib'], 1)} / "
                f"{_fmt(r['rss_last_mib'], 1)}",
                _fmt(slope, 3),
            ]
        ],
    )
    failures = "0 failures: met" if r["failures"] == 0 else f"**{r['failures']} failures**"
    errors = f" Errors: {r['errors']}, e.g. {r['error_examples']}." if r["errors"] else ""
    if r["flat"] is None:
        flat = "not judged (too few RSS samples in the second half: soak at least 20 s)"
    elif r["flat"]:
        flat = f"flat (|slope| ≤ {FLAT_SLOPE_MIB_PER_MIN:g} MiB/min)"
    else:
        flat = f"**not flat** (|slope| > {FLAT_SLOPE_MIB_PER_MIN:g} MiB/min)"
    return f"""## Soak

Orchestrate at concurrency {r["concurrency"]} without pause; the Plexus server's VmRSS sampled \
every {SOAK_SAMPLE_S:g} s; the slope is a least-squares line over the samples of the second \
half.

{table}

Result: {failures}; memory {flat}.{errors}

RSS (MiB) over time: {series}
"""


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    rows = report["results"]
    levels = sorted({r["concurrency"] for r in rows})
    by_key = {(r["target"], r["concurrency"]): r for r in rows}
    width = 0.2
    bars = [
        ("direct", "p50_ms", "tab:gray", None),
        ("direct", "p99_ms", "silver", None),
        ("plexus", "p50_ms", "tab:blue", None),
        ("plexus", "p99_ms", "lightsteelblue", None),
    ]
    xs = np.arange(len(levels))
    for i, (target, key, color, _) in enumerate(bars):
        left.bar(
            xs + (i - 1.5) * width,
            [by_key[(target, c)][key] for c in levels],
            width,
            color=color,
            label=f"{target} {key[:-3]}",
        )
    for x, level in zip(xs, levels, strict=True):
        added = next(
            (a for a in report["overhead"] if a["concurrency"] == level and a["scope"] == "all"),
            None,
        )
        if added:
            top = max(by_key[(t, level)]["p99_ms"] for t in TARGETS)
            left.annotate(
                f"+{added['p50_added_ms']:.2f} / +{added['p99_added_ms']:.2f}",
                (x, top * 1.15),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    left.set_yscale("log")
    left.set_ylim(top=left.get_ylim()[1] * 3)
    left.set_xticks(xs, [str(c) for c in levels])
    left.set_xlabel("concurrent in-flight calls")
    left.set_ylabel("client-observed latency (ms)")
    left.set_title("Orchestrate vs direct backend (labels: added p50 / p99 ms)")
    left.legend(fontsize=8)
    soak_result = report.get("soak")
    if soak_result and soak_result["rss_series"]:
        ts = [p["t_s"] for p in soak_result["rss_series"]]
        vs = [p["rss_mib"] for p in soak_result["rss_series"]]
        right.plot(ts, vs, marker="o", color="tab:blue", label="Plexus VmRSS")
        slope = soak_result["rss_slope_second_half_mib_per_min"]
        if slope is not None:
            half = [(t, v) for t, v in zip(ts, vs, strict=True) if t >= ts[-1] / 2]
            ht = np.array([t for t, _ in half])
            fit = np.polyfit(ht / 60.0, [v for _, v in half], 1)
            right.plot(
                ht, np.polyval(fit, ht / 60.0), "--", color="tab:red", label=f"{slope:+.3f} MiB/min"
            )
        right.set_xlabel("seconds into the soak")
        right.set_title(
            f"Soak at c={soak_result['concurrency']}: {soak_result['requests']} calls, "
            f"{soak_result['failures']} failed"
        )
        right.legend(fontsize=8)
    else:
        plexus = [by_key[("plexus", c)] for c in levels]
        right.plot(
            [str(c) for c in levels],
            [r["rss_after_mib"] for r in plexus],
            marker="o",
            color="tab:blue",
            label="after the level",
        )
        right.set_xlabel("concurrency level (no soak run)")
        right.set_title("Plexus server RSS")
        right.legend(fontsize=8)
    right.set_ylabel("VmRSS (MiB)")
    fig.suptitle(
        f"Plexus Orchestrate, {report['machine']['cpu_model']}, "
        f"{report['machine']['cpu_cores']} cores"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    report = run_suite(args)
    out = Path(args.out)
    markdown = to_markdown(report)
    written = write_report(out, "orchestrate", report, markdown)
    png = out / "orchestrate.png"
    plot(report, png)
    written.append(png)
    print(markdown)
    say("wrote " + ", ".join(str(p) for p in written))
    return 0
