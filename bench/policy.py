"""The policy stage's cost, and Route / Orchestrate with limits and budgets on against off.

In process, on the retail demo (trained into a temporary workspace):

- the policy stage alone, one request at a time: no rules (the baseline), 50 rules, and 50
  rules plus per-user and per-key rate limits on the in-process store and on a real Redis
  (started on a free loopback port when ``redis-server`` is installed); the Redis rows also
  count the Redis commands each call sent (one command is one round trip);
- a budget's reserve + settle on each store;
- Route and Orchestrate (local backends) through the whole pipeline at concurrency 16, with
  limits and budgets off, on the in-process store and on Redis, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench import common
from bench.report import document, machine_facts, num, percentiles_us, publish, say, table

HELP = "policy stage cost (50 rules, limits on memory and Redis); throughput with limits on/off"
TEXT = "you charged my card twice for one order and I want my money back"
RULES = 50
CONCURRENCY = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=common.DEMO_CONFIG)
    parser.add_argument("--count", type=common.positive, default=5000, help="stage calls timed")
    parser.add_argument(
        "--requests", type=common.positive, default=1500, help="pipeline calls per throughput row"
    )
    common.add_out(parser)


@contextlib.contextmanager
def redis_server() -> Iterator[str | None]:
    """A throwaway redis-server on a free loopback port (None when it is not installed)."""
    executable = shutil.which("redis-server")
    if executable is None:
        yield None
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="plexus-bench-redis-")
    process = subprocess.Popen(
        [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", folder],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(folder, ignore_errors=True)


def fifty_rules(routes: list[str], backends: list[str]) -> list[dict[str, Any]]:
    """Rules of every condition kind, most of which do not match the request timed."""
    rules = []
    for i in range(RULES - 1):
        when: dict[str, Any] = {"routes": [routes[i % len(routes)]]}
        if i % 3 == 0:
            when["metadata"] = {"tier": [f"tier-{i}"]}
        if i % 3 == 1:
            when["apps"] = ["store_ops"]
        if i % 3 == 2:
            when["min_confidence"] = 0.999
        rules.append({"name": f"rule-{i}", "when": when, "then": {"chain": [backends[0]]}})
    rules.append({"name": "everyone", "then": {"max_tokens": 300}})  # the one that applies
    return rules


def policy_section(rules: bool, limits: bool, budgets: bool) -> dict[str, Any]:
    section: dict[str, Any] = {"rules": [], "rate_limits": [], "budgets": []}
    if limits:
        section["rate_limits"] = [
            {"name": "per-user", "per": "user", "requests": {"rate": 10**9, "burst": 10**6}},
            {"name": "per-key", "per": "key", "requests": {"rate": 10**9, "burst": 10**6}},
        ]
    if budgets:
        section["budgets"] = [
            {"name": "daily", "per": "tenant", "period": "day", "tokens": 10**12, "cost": 10.0**9}
        ]
    if limits or budgets:
        section["on_state_error"] = "fail_closed"
    return section


def variant(base: Path, name: str, state: dict[str, Any], policy: dict[str, Any]) -> Path:
    data = yaml.safe_load(base.read_text())
    data["server"]["state"] = state
    data["tenants"]["retail"]["policy"] = policy
    for tenant in data["tenants"].values():
        tenant["audit"] = {"enabled": False}  # the audit trail's cost is its own suite's
    path = base.with_name(f"{name}.yaml")
    path.write_text(yaml.safe_dump(data))
    return path


async def _stage_samples(plexus: Any, count: int, user_count: int = 1000) -> np.ndarray:
    from router.calls import Caller, RouteQuery

    caller = Caller("retail", "demo", admin=False, apps=None)
    states = []
    for i in range(min(count, user_count)):
        query = RouteQuery("storefront", TEXT, {"user": f"user-{i}"}, "platinum")
        states.append(await plexus.pipeline.prepare(caller, query))
    for state in states[:50]:  # warm
        await plexus.policy.run(state)
    samples = np.empty(count, dtype=np.int64)
    clock = time.perf_counter_ns
    for i in range(count):
        state = states[i % len(states)]
        started = clock()
        await plexus.policy.run(state)
        samples[i] = clock() - started
    return samples


# What a client can send on its own; everything else Redis counts ran inside the scripts.
TOP_LEVEL = ("evalsha", "evalsha_ro", "eval", "eval_ro", "script", "ping", "hello", "client")


async def _redis_round_trips(url: str) -> int:
    """Commands clients sent Redis so far (not the ones the Lua scripts ran)."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    try:
        stats = await client.info("commandstats")
        return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in TOP_LEVEL)
    finally:
        await client.aclose()


async def _budget_samples(plexus: Any, count: int) -> np.ndarray:
    from router.calls import Caller, RouteQuery

    caller = Caller("retail", "demo", admin=False, apps=None)
    state = await plexus.pipeline.prepare(caller, RouteQuery("storefront", TEXT))
    state.generates = True
    await plexus.policy.run(state)
    samples = np.empty(count, dtype=np.int64)
    for i in range(count):
        started = time.perf_counter_ns()
        await plexus.limits.reserve(state, 200)
        state.output = ["one two three"]
        await plexus.limits.settle(state)
        samples[i] = time.perf_counter_ns() - started
    return samples


async def _throughput(plexus: Any, rpc: str, requests: int) -> dict[str, float]:
    from router.calls import Caller, RouteQuery

    caller = Caller("retail", "demo", admin=False, apps=None)
    queue = iter(range(requests))
    latencies: list[int] = []

    async def one(i: int) -> None:
        query = RouteQuery("storefront", TEXT, {"user": f"user-{i % 500}"}, request_id=str(i))
        started = time.perf_counter_ns()
        if rpc == "Route":
            await plexus.pipeline.route(caller, query)
        else:
            async for _ in plexus.pipeline.orchestrate(caller, query, max_tokens=32):
                pass
        latencies.append(time.perf_counter_ns() - started)

    async def worker() -> None:
        for i in queue:
            await one(i)

    for i in range(50):  # warm
        await one(-1 - i)
    latencies.clear()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    seconds = time.perf_counter() - started
    return {"calls_per_s": requests / seconds, **percentiles_us(np.array(latencies), 1e6)}


async def _measure(path: Path, count: int, requests: int, redis_url: str | None) -> dict[str, Any]:
    from router.config import load_config
    from router.plexus import Plexus

    plexus = Plexus(load_config(path))
    try:
        await plexus.warm()
        result: dict[str, Any] = {}
        before = await _redis_round_trips(redis_url) if redis_url else None
        result["stage"] = await _stage_samples(plexus, count)
        if redis_url and before is not None:
            sent = await _redis_round_trips(redis_url) - before
            result["round_trips_per_call"] = sent / (count + 50)
        if plexus.limits.tenants["retail"].budgets:
            result["budget"] = await _budget_samples(plexus, max(count // 5, 200))
        result["Route"] = await _throughput(plexus, "Route", requests)
        result["Orchestrate"] = await _throughput(plexus, "Orchestrate", requests // 3)
        return result
    finally:
        await plexus.aclose()


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="plexus-bench-policy-") as tmp:
        work = common.workspace(args.config, Path(tmp), data=True)
        tenant = work.loaded.config.tenants["retail"]
        routes = [r.name for r in tenant.routes]
        rules = fifty_rules(routes, sorted(tenant.backends))
        memory = {"kind": "memory"}
        rows: list[dict[str, Any]] = []
        samples: dict[str, list[float]] = {}
        with redis_server() as redis_url:
            variants = [
                ("no rules, no limits", memory, policy_section(False, False, False)),
                ("50 rules", memory, {**policy_section(False, False, False), "rules": rules}),
                (
                    "50 rules + limits + budget (memory)",
                    memory,
                    {**policy_section(True, True, True), "rules": rules},
                ),
            ]
            if redis_url:
                variants.append(
                    (
                        "50 rules + limits + budget (Redis)",
                        {"kind": "redis", "url": redis_url},
                        {**policy_section(True, True, True), "rules": rules},
                    )
                )
            else:
                say("redis-server is not installed: the Redis rows are left out")
            for i, (name, state, policy) in enumerate(variants):
                say(f"measuring: {name}")
                path = variant(work.config, f"variant-{i}", state, policy)
                url = state.get("url") if state["kind"] == "redis" else None
                measured = asyncio.run(_measure(path, args.count, args.requests, url))
                row: dict[str, Any] = {"variant": name, **percentiles_us(measured["stage"])}
                if "round_trips_per_call" in measured:
                    row["redis_round_trips_per_call"] = round(measured["round_trips_per_call"], 2)
                if "budget" in measured:
                    budget = percentiles_us(measured["budget"])
                    row["budget_p50"], row["budget_p99"] = budget["p50"], budget["p99"]
                for rpc in ("Route", "Orchestrate"):
                    row[f"{rpc}_calls_per_s"] = round(measured[rpc]["calls_per_s"], 1)
                    row[f"{rpc}_p50_ms"] = round(measured[rpc]["p50"], 2)
                rows.append(row)
                samples[name] = (measured["stage"] / 1000).tolist()
    return {
        "suite": "policy",
        "machine": machine_facts(),
        "count": args.count,
        "requests": args.requests,
        "concurrency": CONCURRENCY,
        "rows": rows,
        "samples_us": samples,
    }


def to_markdown(report: dict[str, Any]) -> str:
    stage = table(
        report["rows"],
        [
            ("variant", "variant"),
            ("policy p50 µs", num("p50", 1)),
            ("policy p99 µs", num("p99", 1)),
            ("Redis round trips / call", lambda r: str(r.get("redis_round_trips_per_call", "-"))),
            (
                "reserve+settle p50 µs",
                lambda r: num("budget_p50", 1)(r) if "budget_p50" in r else "-",
            ),
            (
                "reserve+settle p99 µs",
                lambda r: num("budget_p99", 1)(r) if "budget_p99" in r else "-",
            ),
        ],
    )
    throughput = table(
        report["rows"],
        [
            ("variant", "variant"),
            ("Route calls/s", num("Route_calls_per_s", 1)),
            ("Route p50 ms", num("Route_p50_ms", 2)),
            ("Orchestrate calls/s", num("Orchestrate_calls_per_s", 1)),
            ("Orchestrate p50 ms", num("Orchestrate_p50_ms", 2)),
        ],
    )
    notes = [
        f"The policy stage alone, {report['count']} calls one at a time (1,000 users in turn), "
        "after the stages before it ran once per request; goals: p99 ≤ 20 µs with 50 rules, one "
        "Redis round trip and p99 ≤ 1 ms with Redis on loopback.",
        f"Throughput: the whole pipeline in process, {report['requests']} Route and a third as "
        f"many Orchestrate calls (local backends) at concurrency {report['concurrency']}.",
    ]
    return document(
        "Plexus policy: rules, rate limits and budgets",
        report,
        notes,
        [("The policy stage", stage), ("Route and Orchestrate, limits off and on", throughput)],
    )


def plot(report: dict[str, Any], plt: Any) -> Any:
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(report["samples_us"])
    ax.boxplot([report["samples_us"][n] for n in names], showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), [n.replace(" + ", "\n+ ") for n in names], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("policy stage (µs)")
    return fig


def main(args: argparse.Namespace) -> int:
    report = run_suite(args)
    publish(args.out, "policy", report, to_markdown(report), plot)
    return 0
