"""Part 4: Route over gRPC with governance on, beside the echo servicer and the plain config.

The latency suite's harness: three server children (``bench.harness.serve``): the echo
servicer, the Plexus server on ``governed.yaml`` and the Plexus server on the plain copy,
driven by the same client processes in ABBA-ordered rounds (echo, governed, plain, then
plain, governed, echo, ...), each round after its own warm-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import common, harness
from bench.harness.adapters import route_payload
from bench.latency import ROUNDS, _row
from bench.report import markdown_table, say

TARGETS = ("echo", "governed", "plain")
GOAL_RATIO = 1.3


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def run(
    plain: Path,
    governed: Path,
    queries: list[str],
    *,
    app: str,
    metadata: dict[str, str],
    requests: int,
    levels: list[int],
    processes: int,
) -> dict[str, Any]:
    payloads = [route_payload(app, text, metadata) for text in queries]
    key = common.api_key()
    configs = {"echo": plain, "governed": governed, "plain": plain}
    kinds = {"echo": "echo", "governed": "plexus", "plain": "plexus"}
    children: list[harness.Child] = []
    pool: harness.ClientPool | None = None
    rows: list[dict[str, Any]] = []
    try:
        say("[route] starting the echo, governed and plain servers and the client processes")
        servers = {
            name: harness.Child(name, "bench.harness.serve", kinds[name], str(configs[name]))
            for name in TARGETS
        }
        children = list(servers.values())
        pool = harness.ClientPool(processes)
        for child in children:
            child.ready()

        def one(name: str, level: int, calls: int) -> harness.Run:
            child = servers[name]
            return pool.run(  # type: ignore[union-attr]
                name,
                "route",
                ("127.0.0.1", child.port),
                key,
                payloads,
                level,
                calls,
                watch={"server": child.pid},
            )

        for level, runs in harness.abba(TARGETS, levels, requests, ROUNDS, one):
            for name in TARGETS:
                rows.append(_row(name, level, runs[name]))
                if rows[-1]["errors"]:
                    say(f"warning: {name} at c={level}: errors {rows[-1]['errors']}")
    finally:
        if pool is not None:
            pool.close()
        harness.stop_all(children)
    by_key = {(r["server"], r["concurrency"]): r for r in rows}
    ratios, goals = [], []
    for level in levels:
        echo, gov, plain_row = (by_key[(t, level)] for t in TARGETS)
        cpu = {t: by_key[(t, level)]["server_cpu_us_per_request"] for t in TARGETS}
        ratio = _ratio(gov["p50_us"], echo["p50_us"])
        ratios.append(
            {
                "concurrency": level,
                "governed_echo_p50": ratio,
                "governed_echo_p99": _ratio(gov["p99_us"], echo["p99_us"]),
                "plain_echo_p50": _ratio(plain_row["p50_us"], echo["p50_us"]),
                "governed_plain_p50": _ratio(gov["p50_us"], plain_row["p50_us"]),
                "p50_added_by_governance_us": round(gov["p50_us"] - plain_row["p50_us"], 1),
                "cpu_added_by_governance_us": None
                if cpu["governed"] is None or cpu["plain"] is None
                else round(cpu["governed"] - cpu["plain"], 1),
            }
        )
        goals.append(
            {
                "goal": f"Route p50 with governance ≤ {GOAL_RATIO}× echo's (c={level})",
                "measured": "n/a" if ratio is None else f"{ratio:.2f}×",
                "met": ratio is not None and ratio <= GOAL_RATIO,
            }
        )
    return {
        "run": True,
        "settings": {
            "app": app,
            "queries": len(queries),
            "requests_per_level": requests,
            "concurrency": levels,
            "client_processes": processes,
            "rounds": ROUNDS,
        },
        "results": rows,
        "ratios": ratios,
        "goals": goals,
    }


def markdown(part: dict[str, Any]) -> str:
    if not part.get("run"):
        return f"Not run: {part['reason']}."
    s = part["settings"]
    plural = "es" if s["client_processes"] != 1 else ""
    header = [
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
    ]
    rows = [
        [
            r["server"],
            str(r["concurrency"]),
            f"{r['requests']:,}",
            str(sum(r["errors"].values())),
            f"{r['p50_us']:,.0f}",
            f"{r['p99_us']:,.0f}",
            f"{r['p99_9_us']:,.0f}",
            f"{r['rps']:,.0f}",
            "n/a"
            if r["server_cpu_us_per_request"] is None
            else f"{r['server_cpu_us_per_request']:,.0f}",
            "–".join(f"{v:,.0f}" for v in (min(r["round_p50_us"]), max(r["round_p50_us"]))),
        ]
        for r in part["results"]
    ]
    rel_header = [
        "concurrency",
        "p50 governed/echo",
        "p99 governed/echo",
        "p50 plain/echo",
        "p50 governed/plain",
        "p50 added by governance µs",
        "server CPU added by governance µs/req",
    ]
    rel = [
        [
            str(r["concurrency"]),
            *(
                ("n/a" if r[k] is None else f"{r[k]:.2f}")
                for k in (
                    "governed_echo_p50",
                    "governed_echo_p99",
                    "plain_echo_p50",
                    "governed_plain_p50",
                )
            ),
            f"{r['p50_added_by_governance_us']:,.0f}",
            "n/a"
            if r["cpu_added_by_governance_us"] is None
            else f"{r['cpu_added_by_governance_us']:,.0f}",
        ]
        for r in part["ratios"]
    ]
    return "\n".join(
        [
            f"The latency suite's harness: {s['requests_per_level']:,} Route calls per server and "
            f"level ({s['rounds']} ABBA rounds, each after its own warm-up), "
            f"{s['client_processes']} client process{plural} with grpc.aio, app `{s['app']}`, the "
            f"{s['queries']} queries the governed config accepts. Client-observed latency; "
            "server CPU from /proc over the timed phase.",
            "",
            markdown_table(header, rows),
            "",
            markdown_table(rel_header, rel),
        ]
    )


def plot(part: dict[str, Any], ax: Any) -> None:
    if not part.get("run"):
        ax.text(0.5, 0.5, "Route vs echo: not run", ha="center", va="center")
        ax.set_axis_off()
        return
    colors = {"echo": "tab:gray", "governed": "tab:blue", "plain": "tab:cyan"}
    levels = sorted({r["concurrency"] for r in part["results"]})
    width = 0.8 / len(TARGETS)
    for i, name in enumerate(TARGETS):
        rows = {r["concurrency"]: r for r in part["results"] if r["server"] == name}
        xs = [j + (i - 1) * width for j in range(len(levels))]
        ax.bar(
            xs, [rows[c]["p50_us"] for c in levels], width, color=colors[name], label=f"{name} p50"
        )
        ax.scatter(
            xs,
            [rows[c]["p99_us"] for c in levels],
            color=colors[name],
            marker="v",
            label=f"{name} p99",
        )
    ax.set_xticks(range(len(levels)), [f"c={c}" for c in levels])
    top = max(r["p99_us"] for r in part["results"])
    ax.set(ylim=(0, top * 1.35), ylabel="client-observed latency (µs)", title="Route over gRPC")
    ax.legend(fontsize=7, ncol=3, loc="upper left")
