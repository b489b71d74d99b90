"""The peers suite's ratios, goals, Markdown and plot, from its report dict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bench.report import document, fmt, machine_title, num, table

QUANTILES = np.concatenate([np.linspace(0, 99, 100), [99.5, 99.9, 100.0]])
"""The percentiles of each row's latency kept in the report (what the plot draws)."""
# (Plexus system, the LiteLLM system it is compared with)
PAIRS = (
    ("plexus-http-sse", "litellm-sse"),
    ("plexus-http-json", "litellm-json"),
    ("plexus-grpc", "litellm-sse"),
    ("plexus-http-sse-sql", "litellm-sse"),
    ("plexus-grpc-sql", "litellm-sse"),
    ("plexus-grpc-retail", "litellm-sse"),
)
GOAL_LEVEL = 16
THROUGHPUT_X = 20.0  # Plexus throughput / LiteLLM's, at least
P99_SHARE = 1 / 50  # Plexus p99 / LiteLLM's, at most
CPU_US = {  # server CPU per call, at most
    "plexus-grpc": 700.0,
    "plexus-http-sse": 500.0,
    "plexus-http-json": 500.0,
    "plexus-grpc-sql": 1000.0,
    "plexus-http-sse-sql": 1000.0,
}
ROUTE_P50_X = 1.1  # Route p50 / echo's at concurrency 1, at most
ROUTE_RPS_X = 0.9  # Route throughput / echo's at concurrency 64, at least


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _rows(report: Mapping[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(r["system"], r["concurrency"]): r for r in report["results"]}


def ratios(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each Plexus system against its LiteLLM counterpart, and Route against echo, per level."""
    rows = _rows(report)
    out = []
    levels = sorted({c for _, c in rows})
    pairs = [*PAIRS, ("plexus-route", "echo-route")]
    for level in levels:
        for system, baseline in pairs:
            a, b = rows.get((system, level)), rows.get((baseline, level))
            if a is None or b is None:
                continue
            out.append(
                {
                    "system": system,
                    "baseline": baseline,
                    "concurrency": level,
                    "throughput_x": _ratio(a["rps"], b["rps"]),
                    "p50_ratio": _ratio(a["p50_ms"], b["p50_ms"]),
                    "p99_ratio": _ratio(a["p99_ms"], b["p99_ms"]),
                    "cpu_ratio": _ratio(a["server_cpu_us_per_call"], b["server_cpu_us_per_call"]),
                }
            )
    return out


def _goal(
    goal: str, system: str, level: int, value: float | None, bound: float, at_least: bool
) -> dict[str, Any]:
    met = None if value is None else (value >= bound if at_least else value <= bound)
    return {
        "goal": goal,
        "system": system,
        "concurrency": level,
        "value": value,
        "bound": bound,
        "at_least": at_least,
        "met": met,
    }


def goals(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals, each met, missed or not measured (``met`` None)."""
    found = {(r["system"], r["concurrency"]): r for r in report["ratios"]}
    rows = _rows(report)
    out = []
    for system in ("plexus-http-sse", "plexus-http-json", "plexus-grpc"):
        r = found.get((system, GOAL_LEVEL), {})
        base = r.get("baseline", dict(PAIRS)[system])
        out.append(
            _goal(f"throughput ≥ {THROUGHPUT_X:g}× {base}", system, GOAL_LEVEL,
                  r.get("throughput_x"), THROUGHPUT_X, True)
        )  # fmt: skip
        out.append(
            _goal(f"p99 ≤ 1/{1 / P99_SHARE:g} of {base}'s", system, GOAL_LEVEL,
                  r.get("p99_ratio"), P99_SHARE, False)
        )  # fmt: skip
    for system, bound in CPU_US.items():
        value = rows.get((system, GOAL_LEVEL), {}).get("server_cpu_us_per_call")
        out.append(
            _goal(f"server CPU ≤ {bound:g} µs/call", system, GOAL_LEVEL, value, bound, False)
        )
    p50 = found.get(("plexus-route", 1), {}).get("p50_ratio")
    out.append(_goal(f"p50 ≤ {ROUTE_P50_X:g}× echo", "plexus-route", 1, p50, ROUTE_P50_X, False))
    rps = found.get(("plexus-route", 64), {}).get("throughput_x")
    out.append(
        _goal(f"throughput ≥ {ROUTE_RPS_X:g}× echo", "plexus-route", 64, rps, ROUTE_RPS_X, True)
    )
    return out


# ----------------------------------------------------------------------------- Markdown


def _met(flag: bool | None) -> str:
    return "not measured" if flag is None else "met" if flag else "**missed**"


def _value(goal: Mapping[str, Any]) -> str:
    value = goal["value"]
    if value is None:
        return "n/a"
    if "CPU" in goal["goal"]:
        return fmt(value)
    if goal["bound"] < 0.1:
        return f"{value:.4f} (1/{1 / value:,.0f})" if value else "0"
    return f"{value:,.2f}"


def _spread(values: list[float], digits: int = 0) -> str:
    if not values:
        return "n/a"
    return f"{fmt(min(values), digits)}–{fmt(max(values), digits)}"


def _calibration(report: Mapping[str, Any]) -> str:
    rows = []
    for system in report["settings"]["systems"]:
        c = report["calibration"].get(system["name"], {})
        grpc = c.get("orchestrate") or {}
        rows.append(
            {
                "system": system["name"],
                "what": system["what"],
                "routes": ", ".join(c.get("routes") or []) or "n/a",
                "pieces": ", ".join(map(str, c.get("http_body_pieces") or [])) or "",
                "content": ", ".join(map(str, c.get("content_events") or [])) or "",
                "grpc": f"{grpc['messages']} ({grpc['deltas']} deltas)" if grpc else "",
                "context": f"{grpc['context_pieces']} ({grpc['context_tokens']} tokens)"
                if grpc
                else "",
                "stages": ", ".join(c.get("plexus_stages") or []),
            }
        )
    return table(
        rows,
        [
            ("system", "system"),
            ("what", "what"),
            ("routes seen", "routes"),
            ("HTTP body pieces", "pieces"),
            ("content events", "content"),
            ("gRPC messages", "grpc"),
            ("context pieces", "context"),
            ("Plexus stage timings", "stages"),
        ],
    )


def _under(row: Mapping[str, Any]) -> str:
    frame = row.get("plexus_frame")
    if not frame:
        return "none"
    return f"`{frame}` ({100 * row['plexus_frame_share']:.0f}%)"


def _profile(p: Mapping[str, Any]) -> str:
    if "skipped" in p:
        return p["skipped"]
    if p["native"]:
        what = (
            f"{p['samples']:,} samples of every thread, {p['busy_samples']:,} of them busy (the "
            "rest wait in epoll, a lock, a condition or fdatasync)"
        )
    else:
        what = f"{p['samples']:,} samples of the thread holding the GIL"
    head = (
        f"**{p['system']}, {p['mode']}**: `{p['command']}` while the client drove "
        f"`{p['system']}` at concurrency 16: {what}; {fmt(p['rps_while_sampled'])} calls/s "
        f"while sampled ({p['failures']} failed); collapsed stacks in "
        f"`{p['collapsed_file']}`. Shares are of the busy samples."
    )
    areas = table(
        [{"area": a, "share": v} for a, v in p["areas"].items()],
        [
            ("innermost frame in", "area"),
            ("% of busy samples", lambda r: f"{100 * r['share']:.1f}"),
        ],
    )
    own = table(
        p["top_own"],
        [
            ("function (most own samples)", "function"),
            ("% own", lambda r: f"{100 * r['own']:.1f}"),
            ("% total", lambda r: f"{100 * r['total']:.1f}"),
            ("under Plexus frame (share of its own samples)", _under),
        ],
    )
    total = table(
        p["top_plexus"],
        [
            ("Plexus function (most total samples)", "function"),
            ("% own", lambda r: f"{100 * r['own']:.1f}"),
            ("% total", lambda r: f"{100 * r['total']:.1f}"),
        ],
    )
    return f"{head}\n\n{areas}\n\n{own}\n\n{total}"


def to_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    versions = report["versions"]
    peer = versions.get("peer")
    peer_text = (
        "LiteLLM " + ", ".join(f"{k} {v}" for k, v in peer.items())
        if peer
        else f"LiteLLM not run: {report.get('peer_note')}"
    )
    loads = ", ".join(f"c={k}: {v}" for k, v in report["load_average_per_level"].items())
    goal_table = table(
        report["goals"],
        [
            ("goal", "goal"),
            ("system", "system"),
            ("concurrency", "concurrency"),
            ("measured", _value),
            ("", lambda g: _met(g["met"])),
        ],
    )
    results = table(
        sorted(report["results"], key=lambda r: (r["concurrency"], r["system"])),
        [
            ("system", "system"),
            ("concurrency", "concurrency"),
            ("calls", "requests"),
            ("failed", "failures"),
            ("calls/s", num("rps")),
            ("p50 ms", num("p50_ms", 2)),
            ("p99 ms", num("p99_ms", 2)),
            ("p99.9 ms", num("p99_9_ms", 2)),
            ("TTFT p50 ms", num("ttft_p50_ms", 2)),
            ("server CPU µs/call", num("server_cpu_us_per_call")),
            ("backend CPU µs/call", num("backend_cpu_us_per_call")),
            ("calls/s per round", lambda r: _spread(r["round_rps"])),
        ],
    )
    relative = table(
        report["ratios"],
        [
            ("system", "system"),
            ("against", "baseline"),
            ("concurrency", "concurrency"),
            ("throughput ×", num("throughput_x", 2)),
            ("p50 ratio", num("p50_ratio", 4)),
            ("p99 ratio", num("p99_ratio", 4)),
            ("server CPU ratio", num("cpu_ratio", 4)),
        ],
    )
    failures = "\n".join(
        f"- {r['system']} c={r['concurrency']}: {r['errors']} e.g. {r['error_examples']}"
        for r in report["results"]
        if r["failures"]
    )
    models = "; ".join(
        f"{name}: {m['version']} ({m['family']}, {m['labels']} labels)"
        for name, m in report["models"].items()
    )
    notes = [
        f"Versions: plexus-router {versions['plexus']} (checkout "
        f"{versions.get('plexus_commit') or 'unknown'}) on Python {versions['python']}; "
        f"{peer_text}.",
        f"Load average (1, 5, 15 min) at the start {report['machine'].get('load_average_start')}, "
        f"after each level {loads}, at the end {report['load_average_end']}.",
        f"Settings: {s['requests_per_level']} calls per system per level at concurrency "
        f"{', '.join(map(str, s['levels']))}; {s['client_processes']} client processes; "
        f"`plexus serve --workers {s['plexus_workers']}`; config `{s['config']}` "
        f"(app `{s['app']}`); model {models}.",
        f"Order: {s['order']}.",
        "CPU time per second of each server while nothing called it (over 3 s before the "
        "timed runs; every run also carries the idle servers' share): "
        + ", ".join(f"{k} {fmt(v, 1)} ms/s" for k, v in report["idle_cpu_ms_per_s"].items())
        + ".",
        "Every system answers through the same instant backend (`bench.instant_backend`: "
        "asyncio.Protocol HTTP/1.1, a 9-word reply in 5 SSE deltas + finish + usage + "
        "[DONE], or one JSON body). LiteLLM: `litellm --config C --num_workers 1`, one model "
        "`openai/instant` at the backend, no database, a master key. Plexus: `plexus serve` "
        "with gRPC and the HTTP front door; `bare` is the retail demo with every route's "
        "context removed (route + policy + generate + audit record), `retail` the stock routes "
        "(`-sql`: questions routed to store_hours, one SQL row of context; `-retail`: the 12 "
        "questions, 4 of which embed and search the policies collection).",
        "Client: closed loop; HTTP systems: one keep-alive HTTP/1.1 connection per in-flight "
        "call, the same request bytes every round, each reply read to its end (a stream must "
        "hold a content event and end in `data: [DONE]`); gRPC: grpc.aio, one channel per "
        "client process. Latency runs from sending the request to the end of the reply (the "
        "final event for Orchestrate); TTFT to the first content event.",
        '"server CPU µs/call" is the user + system CPU time of the server\'s processes (all '
        "threads, from /proc; with --workers the supervisor and every worker) over the timed "
        "phase, divided by the calls. The client processes, the servers and the backend share "
        "this machine's cores, so calls/s and latency move with the load; the CPU column is "
        "the steadier one.",
    ]
    sections = [
        (f"Goals (concurrency {GOAL_LEVEL} unless named)", goal_table),
        ("Systems (one calibration call per question)", _calibration(report)),
        ("Throughput, latency and server CPU", results),
        ("Relative to LiteLLM (and Route to echo)", relative),
        ("Profiles", "\n\n".join(_profile(p) for p in report["profiles"]) or "Not run."),
        ("Failures", failures or "No call failed."),
    ]
    return document(
        "Plexus against the LiteLLM proxy",
        report,
        notes,
        sections,
        f"Run time {report['seconds']} s. Plot: `peers.png`.",
    )


# ----------------------------------------------------------------------------- plot

COLORS = {
    "litellm-sse": "tab:red",
    "litellm-json": "salmon",
    "plexus-http-sse": "tab:blue",
    "plexus-http-json": "lightsteelblue",
    "plexus-grpc": "tab:green",
    "plexus-http-sse-sql": "tab:purple",
    "plexus-grpc-sql": "tab:olive",
    "plexus-grpc-retail": "tab:cyan",
    "plexus-route": "tab:orange",
    "echo-route": "tab:gray",
}


def plot(report: dict[str, Any], plt: Any) -> Any:
    """Per level, the latency distribution (ECDF) of every system; then calls/s per level."""
    levels = sorted({r["concurrency"] for r in report["results"]})
    fig, axes = plt.subplots(1, len(levels) + 1, figsize=(5 * (len(levels) + 1), 4.6))
    rows = _rows(report)
    systems = [s["name"] for s in report["settings"]["systems"]]
    for ax, level in zip(axes, levels, strict=False):
        for system in systems:
            row = rows.get((system, level))
            if row is None or not row["latency_quantiles_ms"]:
                continue
            values = np.asarray(row["latency_quantiles_ms"])
            ax.plot(values, QUANTILES / 100, color=COLORS.get(system), label=system)
        ax.set_xscale("log")
        ax.set(
            xlabel="latency (ms, log)", ylabel="share of calls ≤ x", title=f"concurrency {level}"
        )
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    bars = axes[-1]
    width = 0.8 / max(1, len(systems))
    for i, system in enumerate(systems):
        heights = [rows[(system, c)]["rps"] if (system, c) in rows else 0 for c in levels]
        xs = np.arange(len(levels)) + (i - (len(systems) - 1) / 2) * width
        bars.bar(xs, heights, width, color=COLORS.get(system), label=system)
    bars.set_yscale("log")
    bars.set_xticks(np.arange(len(levels)), [str(c) for c in levels])
    bars.set(xlabel="concurrency", ylabel="calls/s (log)", title="throughput")
    fig.suptitle(machine_title(report, "Plexus vs the LiteLLM proxy"))
    return fig
