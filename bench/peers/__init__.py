"""Plexus against the LiteLLM proxy, side by side in one run, and a profile of Plexus.

Every system stands in front of the same instant backend (``bench.instant_backend``: an
OpenAI-compatible server streaming a 9-word reply in 5 deltas) and is driven by the same
closed-loop client processes at each concurrency level:

- ``litellm-sse`` / ``litellm-json``: the LiteLLM proxy (``litellm[proxy]``, one worker, no
  database, a config with one model routed to the instant backend), streamed and not;
- ``plexus-http-sse`` / ``plexus-http-json``: Plexus's OpenAI-compatible front door
  (``plexus serve --workers N``), the retail demo with every route's context removed, so a call
  is route + policy + generate + record;
- ``plexus-grpc``: Orchestrate over gRPC on the same server;
- ``plexus-http-sse-sql`` / ``plexus-grpc-sql``: a second server on the stock retail routes,
  questions routed to ``store_hours`` (one row of the SQL mirror as context);
- ``plexus-grpc-retail``: the stock routes with a mix of SQL and embedding + policies search;
- ``plexus-route`` / ``echo-route``: unary Route on the no-context server against the bare
  gRPC echo servicer of ``plexus bench latency``.

Per level every system runs ``--rounds`` rounds in ABBA order (all systems, then all in
reverse; the next level starts reversed) so drift hits all of them alike. Reported: requests
per second, p50 / p99 latency, the server's CPU per call from /proc (with ``--workers``: the
supervisor and every worker summed), the ratios the goals name, the versions of both sides and
the machine. With ``--profile-seconds`` (default 10) py-spy then samples the no-context Plexus
server under load at concurrency 16, over gRPC and over HTTP, in each of ``--profile-modes``
(``native``: every thread with C frames and system calls, pausing the server at each sample;
``gil``: the GIL holder's Python frames, never pausing it), and the report lists the top of each
profile.

The peer is installed only with ``--install-peers``, into a virtual environment of its own
under ``--peers-dir`` (never into Plexus's); without it an existing one is used, or the report
says how to make one and leaves the LiteLLM rows out. py-spy is found on PATH or beside this
Python, or installed next to the peer with ``--install-peers``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench import api, common, harness
from bench.harness.adapters import (
    ADAPTERS,
    ChatStream,
    chat_request,
    orchestrate_payload,
    route_payload,
)
from bench.harness.clients import Job
from bench.orchestrate.measure import APP, QUERIES, STORE_ID
from bench.peers import profile, systems
from bench.peers.render import QUANTILES, goals, plot, ratios, to_markdown
from bench.report import machine_facts, percentiles_ms, publish, say

HELP = "Plexus vs the LiteLLM proxy (HTTP and gRPC, streamed and not) and a py-spy profile"
PROFILE_LEVEL = 16
PROFILE_MODES = {"native": profile.RATE_HZ, "gil": profile.GIL_RATE_HZ}
IDLE_SECONDS = 3.0


@dataclass(frozen=True)
class Target:
    """One system as the client drives it."""

    name: str
    server: str  # "litellm", "bare" (Plexus, no context), "retail" (Plexus, stock routes), "echo"
    adapter: str  # a key of ADAPTERS
    queries: str  # "all" (the 12 retail questions), "sql" (the 8 store_hours ones)
    stream: bool
    what: str


TARGETS = (
    Target("litellm-sse", "litellm", "chat", "all", True, "LiteLLM proxy, streamed"),
    Target("litellm-json", "litellm", "chat", "all", False, "LiteLLM proxy, one JSON body"),
    Target("plexus-http-sse", "bare", "chat", "all", True, "Plexus HTTP, no context, streamed"),
    Target("plexus-http-json", "bare", "chat", "all", False, "Plexus HTTP, no context, JSON"),
    Target("plexus-grpc", "bare", "orchestrate", "all", True, "Plexus gRPC, no context"),
    Target("plexus-http-sse-sql", "retail", "chat", "sql", True, "Plexus HTTP, SQL context"),
    Target("plexus-grpc-sql", "retail", "orchestrate", "sql", True, "Plexus gRPC, SQL context"),
    Target("plexus-grpc-retail", "retail", "orchestrate", "all", True, "Plexus gRPC, stock routes"),
    Target("plexus-route", "bare", "route", "all", False, "Plexus Route (unary gRPC)"),
    Target("echo-route", "echo", "route", "all", False, "bare gRPC echo servicer"),
)
BY_NAME = {t.name: t for t in TARGETS}


def _levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated whole numbers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"at least one level, each 1 or more, got {text!r}")
    return list(dict.fromkeys(levels))


def _targets(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown system {unknown or text!r}; choose from {', '.join(BY_NAME)}"
        )
    return list(dict.fromkeys(names))


def _modes(text: str) -> list[str]:
    modes = [part.strip() for part in text.split(",") if part.strip()]
    if not modes or any(m not in PROFILE_MODES for m in modes):
        raise argparse.ArgumentTypeError(f"profile modes from {', '.join(PROFILE_MODES)}")
    return list(dict.fromkeys(modes))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=common.DEMO_CONFIG)
    parser.add_argument(
        "--levels", type=_levels, default=[1, 16, 64], help="concurrency levels, e.g. 1,16,64"
    )
    parser.add_argument(
        "--requests", type=common.positive, default=1000, help="calls per system per level"
    )
    parser.add_argument("--rounds", type=common.positive, default=2, help="ABBA rounds per level")
    parser.add_argument("--processes", type=common.positive, default=2, help="client processes")
    parser.add_argument(
        "--workers",
        type=common.positive,
        default=1,
        help="plexus serve --workers (above 1 starts a redis-server for the shared state)",
    )
    parser.add_argument(
        "--systems",
        type=_targets,
        default=[t.name for t in TARGETS],
        help="comma-separated subset of: " + ", ".join(BY_NAME),
    )
    parser.add_argument(
        "--install-peers",
        action="store_true",
        help="make the peer's virtual environment under --peers-dir and pip install it there",
    )
    parser.add_argument(
        "--peers-dir",
        type=Path,
        default=systems.default_peers_dir(),
        help="where the peer's virtual environment lives (default: %(default)s)",
    )
    parser.add_argument(
        "--peer-spec", default=systems.PEER_SPEC, help="what --install-peers installs"
    )
    parser.add_argument(
        "--profile-seconds",
        type=common.non_negative_float,
        default=10.0,
        help="py-spy per profiled system at concurrency 16 (0: no profile)",
    )
    parser.add_argument(
        "--profile-modes",
        type=_modes,
        default=list(PROFILE_MODES),
        help="native: every thread with native frames at 50 Hz (pauses the server at each "
        "sample); gil: the GIL holder's Python frames at 100 Hz (never pauses it)",
    )
    common.add_out(parser)


# ----------------------------------------------------------------------------- configs


def bare_config(retail: Path) -> Path:
    """The retail copy with no context on any route, beside it, with its own audit folder."""
    raw = yaml.safe_load(retail.read_text(encoding="utf-8"))
    for tenant in raw["tenants"].values():
        for route in tenant.get("routes") or []:
            route.pop("context", None)
    raw["server"]["audit_dir"] = str(retail.parent / "audit-bare")
    path = retail.with_name("bare.yaml")
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def set_server(config: Path, **settings: Any) -> None:
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    raw["server"].update(settings)
    config.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")


@contextlib.contextmanager
def shared_state(workers: int) -> Iterator[dict[str, Any] | None]:
    """``server.state`` for ``workers`` processes: Redis (a throwaway redis-server) above 1."""
    if workers == 1:
        yield None
        return
    from bench.policy import redis_server

    with redis_server() as url:
        if url is None:
            raise RuntimeError("--workers above 1 needs redis-server (the workers' shared state)")
        yield {"kind": "redis", "url": url}


# ----------------------------------------------------------------------------- payloads


def chat_body(model: str, text: str, stream: bool, metadata: dict[str, str] | None) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}]}
    body["stream"] = stream
    if metadata:
        body["metadata"] = metadata
    return json.dumps(body, separators=(",", ":")).encode()


def payloads_for(target: Target, port: int, key: str, peer_key: str) -> list[bytes]:
    texts = [t for t, route in QUERIES if target.queries == "all" or route == "store_hours"]
    meta = {"store_id": STORE_ID}
    if target.adapter == "chat" and target.server == "litellm":
        return [
            chat_request(port, chat_body(systems.PEER_MODEL, t, target.stream, None), peer_key)
            for t in texts
        ]
    if target.adapter == "chat":
        return [chat_request(port, chat_body(APP, t, target.stream, meta), key) for t in texts]
    if target.adapter == "orchestrate":
        return [orchestrate_payload(APP, t, meta) for t in texts]
    return [route_payload(APP, t, meta) for t in texts]


# ----------------------------------------------------------------------------- calibration


async def _probe(target: Target, port: int, key: str, payloads: list[bytes]) -> dict[str, Any]:
    """Every payload once through the target's adapter: routes, and for HTTP what came back."""
    job = Job(target.adapter, "127.0.0.1", port, key, payloads, 1, len(payloads), 0, 0)
    routes: dict[int, str] = {}
    errors: dict[str, int] = {}
    pieces, events, sizes = [], [], []
    stages: set[str] = set()
    async with ADAPTERS[target.adapter](job, routes) as streams:
        stream = streams()
        try:
            for index in range(len(payloads)):
                _, _, _, error, detail = await stream.run(index)
                if error is not None:
                    errors[f"{error}: {detail[:160]}"] = errors.get(error, 0) + 1
                    continue
                if isinstance(stream, ChatStream):
                    last = stream.last
                    pieces.append(last["pieces"])
                    events.append(last["content_events"])
                    sizes.append(last["body_bytes"])
                    stages |= _stages(last["body"], target.stream)
        finally:
            await stream.close()
    out: dict[str, Any] = {"calls": len(payloads), "errors": errors}
    out["routes"] = sorted(set(routes.values()))
    if pieces:
        out |= {
            "http_body_pieces": sorted(set(pieces)),
            "content_events": sorted(set(events)),
            "body_bytes_mean": round(float(np.mean(sizes)), 1),
        }
    if stages:
        out["plexus_stages"] = sorted(stages)
    return out


def _stages(body: bytes, stream: bool) -> set[str]:
    """The stage timing names of a Plexus answer (its ``plexus`` extension), if any."""
    try:
        if stream:
            for line in body.split(b"\n"):
                if line.startswith(b"data: {") and b'"plexus"' in line:
                    return set(json.loads(line[6:])["plexus"].get("timings_us", {}))
            return set()
        return set(json.loads(body).get("plexus", {}).get("timings_us", {}))
    except (ValueError, KeyError, TypeError):
        return set()


def orchestrate_events(port: int, key: str, payload: bytes) -> dict[str, Any]:
    """One Orchestrate call's event counts and context size (for the report)."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_stream(harness.adapters.ORCHESTRATE)
        messages = list(call(payload, metadata=(("x-api-key", key),), timeout=30))
    events = [api.pb.OrchestrateEvent.FromString(m) for m in messages]
    kinds = [e.WhichOneof("event") for e in events]
    context = next((e.context for e in events if e.WhichOneof("event") == "context"), None)
    return {
        "messages": len(messages),
        "deltas": kinds.count("delta"),
        "context_pieces": len(context.pieces) if context is not None else 0,
        "context_tokens": context.tokens_used if context is not None else 0,
        "last": kinds[-1] if kinds else None,
    }


# ----------------------------------------------------------------------------- summaries


def server_cpu_s(run: harness.Run, server: str) -> float | None:
    """CPU seconds of every watched process of ``server`` (names ``server#i``)."""
    values = [v for name, v in run.cpu_s.items() if name.partition("#")[0] == server]
    if not values or any(v is None for v in values):
        return None
    return float(sum(values))  # type: ignore[arg-type]


def summary(target: Target, level: int, runs: list[harness.Run]) -> dict[str, Any]:
    run = harness.combine(runs)
    lat = percentiles_ms(run.latency)
    ttft = percentiles_ms(run.ttft[run.ttft >= 0])
    calls = run.requests + run.failures
    cpu, backend = server_cpu_s(run, target.server), server_cpu_s(run, "backend")
    quantiles = (
        np.percentile(run.latency / 1e6, QUANTILES).round(4).tolist() if run.requests else []
    )
    return {
        "system": target.name,
        "concurrency": level,
        "requests": run.requests,
        "failures": run.failures,
        "errors": run.errors,
        "error_examples": run.examples,
        "rps": run.rps,
        "p50_ms": lat["p50"],
        "p99_ms": lat["p99"],
        "p99_9_ms": lat["p99_9"],
        "mean_ms": lat["mean"],
        "ttft_p50_ms": ttft["p50"],
        "server_cpu_us_per_call": 1e6 * cpu / calls if cpu is not None and calls else None,
        "backend_cpu_us_per_call": 1e6 * backend / calls if backend is not None and calls else None,
        "round_rps": [r.rps for r in runs],
        "round_p50_ms": [percentiles_ms(r.latency)["p50"] for r in runs],
        "latency_quantiles_ms": quantiles,
    }


def idle_cpu(servers: dict[str, systems.Server], seconds: float = IDLE_SECONDS) -> dict:
    """Each server's CPU time per second (ms/s) while nothing calls it: the background every
    measurement also carries from the servers that are not being called."""
    before = {name: server.cpu_seconds() for name, server in servers.items()}
    time.sleep(seconds)
    out = {}
    for name, server in servers.items():
        after, start = server.cpu_seconds(), before[name]
        out[name] = None if after is None or start is None else 1e3 * (after - start) / seconds
    return out


def checkout_commit() -> str | None:
    """The checkout's commit, with "+changes" when ``router/`` has uncommitted edits; None
    outside a git checkout."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=common.CHECKOUT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "router"],
            cwd=common.CHECKOUT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ----------------------------------------------------------------------------- the run


@dataclass
class Setup:
    servers: dict[str, systems.Server]
    payloads: dict[str, list[bytes]]
    key: str
    peer_key: str


def _find_or_install_peer(args: argparse.Namespace) -> tuple[systems.Peer | None, str | None]:
    if args.install_peers:
        return systems.install_peer(args.peers_dir, args.peer_spec), None
    peer = systems.find_peer(args.peers_dir)
    if peer is None:
        note = systems.how_to_install(args.peers_dir)
        say(f"note: {note}; the LiteLLM rows are left out")
        return None, note
    return peer, None


def _profile_one(
    args: argparse.Namespace,
    pool: harness.ClientPool,
    setup: Setup,
    name: str,
    mode: str,
    py_spy: Path,
    out_dir: Path,
) -> dict[str, Any]:
    """One py-spy recording of the server behind ``name`` while the client drives it."""
    target = BY_NAME[name]
    server = setup.servers[target.server]
    collapsed = out_dir / f"peers-profile-{name}-{mode}.txt"
    say(f"profiling {server.name} under {name} at c={PROFILE_LEVEL} ({mode}), "
        f"{args.profile_seconds:g} s")  # fmt: skip
    recording = profile.start(
        py_spy,
        server.pid,
        args.profile_seconds,
        collapsed,
        children=args.workers > 1,
        native=mode == "native",
        rate=PROFILE_MODES[mode],
    )
    run = setup_run(pool, setup, name, args.profile_seconds)
    recording.wait(timeout=args.profile_seconds + 60)
    stacks = profile.parse_collapsed(collapsed.read_text(errors="replace").splitlines())
    return {
        "system": name,
        "mode": mode if "--native" in recording.args or mode == "gil" else "gil (native failed)",
        "command": " ".join(recording.args),
        "native": "--native" in recording.args,
        "samples": sum(s.samples for s in stacks),
        "busy_samples": profile.busy_samples(stacks),
        "rps_while_sampled": run.rps,
        "failures": run.failures,
        "collapsed_file": collapsed.name,
        "areas": profile.areas(stacks),
        "top_own": [vars(r) for r in profile.top(stacks, 15, "own")],
        "top_plexus": [vars(r) for r in profile.top(stacks, 15, "plexus")],
    }


def setup_run(pool: harness.ClientPool, setup: Setup, name: str, seconds: float) -> harness.Run:
    """``name`` at the profile's concurrency for ``seconds``."""
    target = BY_NAME[name]
    port = _port(setup.servers[target.server], target)
    return pool.run(
        name,
        target.adapter,
        ("127.0.0.1", port),
        setup.key,
        setup.payloads[name],
        PROFILE_LEVEL,
        1,
        seconds=seconds,
    )


def run_profiles(
    args: argparse.Namespace,
    pool: harness.ClientPool,
    setup: Setup,
    names: list[str],
    out_dir: Path,
) -> list[dict[str, Any]]:
    """py-spy on the no-context Plexus server while the client drives each of ``names``."""
    py_spy = systems.py_spy(args.peers_dir, args.install_peers)
    if py_spy is None:
        say("note: no py-spy (pip install py-spy, or --install-peers); no profile")
        return [{"skipped": "py-spy not found; pip install py-spy, or run with --install-peers"}]
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        for mode in args.profile_modes:
            results.append(_profile_one(args, pool, setup, name, mode, py_spy, out_dir))
    return results


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    if common.TENANT not in api.load_config(args.config).config.tenants:
        raise RuntimeError(f"{args.config}: the benchmark needs the {common.TENANT!r} tenant")
    started = time.monotonic()
    load_start = load_average()
    commit = checkout_commit()  # what the servers run: the tree as it is at their start
    peer, peer_note = (None, None)
    wanted = [BY_NAME[n] for n in args.systems]
    if any(t.server == "litellm" for t in wanted):
        peer, peer_note = _find_or_install_peer(args)
    targets = [t for t in wanted if t.server != "litellm" or peer is not None]
    key = common.api_key()
    peer_key = "sk-bench-" + secrets.token_hex(16)
    rows: list[dict[str, Any]] = []
    calibration: dict[str, Any] = {}
    profiles: list[dict[str, Any]] = []
    idle: dict[str, float | None] = {}
    loads: dict[int, list[float] | None] = {}
    servers: list[systems.Server] = []
    children: list[harness.Child] = []
    pool: harness.ClientPool | None = None
    with tempfile.TemporaryDirectory(prefix="plexus-bench-peers-") as tmp:
        workdir = Path(tmp)
        try:
            with shared_state(args.workers) as state:
                say("starting the instant backend")
                backend = harness.Child("instant backend", "bench.instant_backend", f"{tmp}/port")
                children.append(backend)
                url = f"http://127.0.0.1:{backend.ready()}/v1"
                space = common.workspace(
                    Path(args.config), workdir / "retail", backend_url=url, data=True
                )
                set_server(space.config, audit_dir=str(workdir / "retail" / "audit-retail"))
                bare = bare_config(space.config)
                if state is not None:
                    set_server(space.config, state=state)
                    set_server(bare, state=state)
                by_server: dict[str, systems.Server] = {}
                need = {t.server for t in targets}
                pool = harness.ClientPool(args.processes)
                for name, config in (("bare", bare), ("retail", space.config)):
                    if name in need:
                        say(f"starting plexus serve ({name}, --workers {args.workers})")
                        by_server[name] = systems.start_plexus(name, config, args.workers, workdir)
                        servers.append(by_server[name])
                if "echo" in need:
                    echo = harness.Child("echo", "bench.harness.serve", "echo", str(bare))
                    children.append(echo)
                    echo.ready()
                    by_server["echo"] = systems.Server("echo", echo.process, {"grpc": echo.port})
                if peer is not None:
                    say("starting the LiteLLM proxy")
                    by_server["litellm"] = systems.start_litellm(
                        peer, backend.port, workdir, peer_key
                    )
                    servers.append(by_server["litellm"])
                by_server["backend"] = systems.Server(
                    "backend", backend.process, {"http": backend.port}
                )
                payloads = {
                    t.name: payloads_for(t, _port(by_server[t.server], t), key, peer_key)
                    for t in targets
                }
                setup = Setup(by_server, payloads, key, peer_key)
                for t in targets:
                    port = _port(by_server[t.server], t)
                    probe_key = peer_key if t.server == "litellm" else key
                    calibration[t.name] = asyncio.run(_probe(t, port, probe_key, payloads[t.name]))
                    if t.adapter == "orchestrate":
                        calibration[t.name]["orchestrate"] = orchestrate_events(
                            port, key, payloads[t.name][0]
                        )
                    if calibration[t.name]["errors"]:
                        raise RuntimeError(
                            f"{t.name}: calibration calls failed: {calibration[t.name]['errors']}"
                        )
                watch = {name: server.watch() for name, server in by_server.items()}
                idle = idle_cpu(by_server)

                def one(name: str, level: int, calls: int) -> harness.Run:
                    assert pool is not None
                    target = BY_NAME[name]
                    server = by_server[target.server]
                    return pool.run(
                        name,
                        target.adapter,
                        ("127.0.0.1", _port(server, target)),
                        key,
                        payloads[name],
                        level,
                        calls,
                        watch={**watch[target.server], **watch["backend"]},
                    )

                names = [t.name for t in targets]
                for level, runs in harness.abba(
                    names, args.levels, args.requests, args.rounds, one
                ):
                    loads[level] = load_average()  # the 1-minute figure spans this level
                    for name in names:
                        rows.append(summary(BY_NAME[name], level, runs[name]))
                profiled = [n for n in ("plexus-grpc", "plexus-http-sse") if n in names]
                if args.profile_seconds > 0 and profiled:
                    profiles = run_profiles(args, pool, setup, profiled, Path(args.out))
        finally:
            if pool is not None:
                pool.close()
            systems.stop_servers(servers)
            harness.stop_all(children)
    report = {
        "suite": "peers",
        "machine": machine_facts() | {"load_average_start": load_start},
        "load_average_per_level": {str(k): v for k, v in loads.items()},
        "load_average_end": load_average(),
        "versions": {
            "plexus": machine_facts()["packages"]["plexus-router"],
            "plexus_commit": commit,
            "python": machine_facts()["python"],
            "peer": peer.versions() if peer is not None else None,
        },
        "peer_note": peer_note,
        "settings": {
            "config": str(args.config),
            "app": APP,
            "levels": args.levels,
            "requests_per_level": args.requests,
            "rounds": args.rounds,
            "client_processes": args.processes,
            "plexus_workers": args.workers,
            "peer_spec": args.peer_spec,
            "peers_dir": str(args.peers_dir),
            "systems": [vars(t) for t in targets],
            "order": f"per level, {args.rounds} rounds of every system in ABBA order (all "
            "systems, then all in reverse; the next level starts reversed), each round "
            f"1/{args.rounds} of the calls after its own warm-up",
        },
        "models": space.models,
        "collections": space.collections,
        "calibration": calibration,
        "idle_cpu_ms_per_s": idle,
        "results": rows,
        "profiles": profiles,
        "seconds": round(time.monotonic() - started, 1),
    }
    report["ratios"] = ratios(report)
    report["goals"] = goals(report)
    return report


def _port(server: systems.Server, target: Target) -> int:
    return server.ports["http" if target.adapter == "chat" else "grpc"]


def main(args: argparse.Namespace) -> int:
    report = run_suite(args)
    publish(Path(args.out), "peers", report, to_markdown(report), plot)
    return 0
