"""The Orchestrate suite's measuring: the servers, the calibration calls, one timed client run
and the summaries (per target and level, Plexus minus direct, the targets)."""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench import api, harness
from bench.harness.adapters import CALL_TIMEOUT_S, ORCHESTRATE, orchestrate_payload
from bench.report import percentiles_ms, percentiles_us

TARGETS = ("direct", "plexus")
ROUNDS = 2  # per level and target, ABBA: direct, plexus, plexus, direct (next level reversed)
TARGET_LEVEL = 16
TARGET_P50_MS = 2.0
TARGET_P99_MS = 5.0
APP = "storefront"
STORE_ID = "1432"

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


@dataclass
class Servers:
    plexus: harness.Child
    backend: harness.Child

    def get(self, path: str) -> bytes:
        connection = http.client.HTTPConnection("127.0.0.1", self.backend.port, timeout=10)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(f"instant backend GET {path}: HTTP {response.status}")
            return body
        finally:
            connection.close()

    def backend_stats(self) -> dict[str, Any]:
        """The backend's own service times since the last call, which clears them."""
        return json.loads(self.get("/stats?samples=1&reset=1"))


def calibrate(servers: Servers, key: str) -> list[dict[str, Any]]:
    """Each query through Orchestrate once: its route, answer and the chat request sent."""
    import grpc

    out = []
    with grpc.insecure_channel(servers.plexus.address) as channel:
        call = channel.unary_stream(ORCHESTRATE)
        grpc.channel_ready_future(channel).result(timeout=30)
        for text, expected in QUERIES:
            payload = orchestrate_payload(APP, text, {"store_id": STORE_ID})
            try:
                messages = list(
                    call(payload, metadata=(("x-api-key", key),), timeout=CALL_TIMEOUT_S)
                )
            except grpc.RpcError as exc:
                raise RuntimeError(
                    f"Orchestrate failed for {text!r}: {exc.code().name}: {exc.details()}"
                ) from None
            events = [api.pb.OrchestrateEvent.FromString(m) for m in messages]
            kinds = [e.WhichOneof("event") for e in events]
            if not events or kinds[-1] != "final":
                detail = events[-1].error.message if events and kinds[-1] == "error" else kinds
                raise RuntimeError(f"Orchestrate for {text!r} did not end in final: {detail}")
            context = events[1].context
            body = servers.get("/last")
            out.append(
                {
                    "text": text,
                    "expected_route": expected,
                    "route": events[0].decision.route,
                    "backend": events[-1].final.backend,
                    "context_pieces": len(context.pieces),
                    "context_tokens": context.tokens_used,
                    "deltas": kinds.count("delta"),
                    "events": len(events),
                    "chat_request_bytes": len(body),
                    "chat_request": body,
                }
            )
    servers.backend_stats()  # forget the calibration calls
    return out


def timed_run(
    pool: harness.ClientPool,
    servers: Servers,
    target: str,
    key: str,
    payloads: dict[str, list[bytes]],
    concurrency: int,
    requests: int,
    seconds: float = 0.0,
    rss_every: float | None = None,
) -> harness.Run:
    """One client run with both servers' CPU time, the backend's own service times
    (``extra["backend"]``) and optionally the Plexus RSS every ``rss_every`` s
    (``extra["rss"]``: (seconds, MiB) pairs)."""
    samples: list[tuple[float, float]] = []
    clock = {"start": 0.0, "next": 0.0}

    def sample() -> None:
        value = servers.plexus.rss_mib()
        if value is not None:
            samples.append((time.monotonic() - clock["start"], value))

    def before_go() -> None:
        servers.backend_stats()  # forget the warm-up calls
        clock["start"] = time.monotonic()
        clock["next"] = clock["start"] + (rss_every or 0)
        if rss_every:
            sample()

    def tick() -> None:
        if rss_every and time.monotonic() >= clock["next"]:
            clock["next"] += rss_every
            sample()

    plexus = target == "plexus"
    run = pool.run(
        target,
        "orchestrate" if plexus else "direct",
        ("127.0.0.1", servers.plexus.port if plexus else servers.backend.port),
        key,
        payloads[target],
        concurrency,
        requests,
        seconds=seconds,
        watch={"plexus": servers.plexus.pid, "backend": servers.backend.pid},
        before_go=before_go,
        tick=tick,
    )
    if rss_every and (not samples or time.monotonic() - clock["start"] - samples[-1][0] > 1.0):
        sample()  # the end of the run, unless a tick just sampled it
    run.extra["backend"], run.extra["rss"] = servers.backend_stats(), samples
    return run


def summary(target: str, level: int, runs: list[harness.Run], routes: dict[int, str]) -> dict:
    run = harness.combine(runs)
    own_ns = np.concatenate(
        [np.asarray(r.extra["backend"].get("samples_ns", []), dtype=np.int64) for r in runs]
    )
    lat, first, own = (
        percentiles_ms(run.latency),
        percentiles_ms(run.ttft[run.ttft >= 0]),
        percentiles_us(own_ns),
    )
    by_route = {}
    for route in sorted(set(routes.values())):
        mask = np.isin(run.query, [q for q, r in routes.items() if r == route])
        if mask.any():
            stats = percentiles_ms(run.latency[mask])
            by_route[route] = {"requests": int(mask.sum()), "p50_ms": stats["p50"]}
            by_route[route]["p99_ms"] = stats["p99"]
    return {
        "target": target,
        "concurrency": level,
        "requests": run.requests,
        "failures": run.failures,
        "errors": run.errors,
        "error_examples": run.examples,
        "p50_ms": lat["p50"],
        "p99_ms": lat["p99"],
        "p99_9_ms": lat["p99_9"],
        "mean_ms": lat["mean"],
        "ttft_p50_ms": first["p50"],
        "rps": run.rps,
        "round_p50_ms": [percentiles_ms(r.latency)["p50"] for r in runs],
        "plexus_cpu_us_per_request": run.cpu_us_per_call("plexus"),
        "backend_cpu_us_per_request": run.cpu_us_per_call("backend"),
        "backend_own": {
            "count": int(own_ns.size),
            "p50_us": own["p50"],
            "p99_us": own["p99"],
            "mean_us": own["mean"],
        },
        "by_route": by_route,
    }


def overheads(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plexus minus direct, at the same percentile and level: overall and per route."""
    by_key = {(r["target"], r["concurrency"]): r for r in rows}
    out = []
    for level in sorted({r["concurrency"] for r in rows}):
        plexus, direct = by_key.get(("plexus", level)), by_key.get(("direct", level))
        if not plexus or not direct:
            continue
        scopes = [("all", plexus, direct)] + [
            (route, stats, direct["by_route"][route])
            for route, stats in plexus["by_route"].items()
            if route in direct["by_route"]
        ]
        for scope, p, d in scopes:
            out.append(
                {
                    "concurrency": level,
                    "scope": scope,
                    "requests": p["requests"],
                    "p50_added_ms": p["p50_ms"] - d["p50_ms"],
                    "p99_added_ms": p["p99_ms"] - d["p99_ms"],
                    "ttft_p50_added_ms": p["ttft_p50_ms"] - d["ttft_p50_ms"]
                    if scope == "all"
                    else None,
                }
            )
    return out


def targets(added: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "scope": r["scope"],
            "p50_added_ms": r["p50_added_ms"],
            "p50_met": bool(r["p50_added_ms"] <= TARGET_P50_MS),
            "p99_added_ms": r["p99_added_ms"],
            "p99_met": bool(r["p99_added_ms"] <= TARGET_P99_MS),
        }
        for r in added
        if r["concurrency"] == TARGET_LEVEL
    ]
