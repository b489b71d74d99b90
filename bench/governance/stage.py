"""Part 3: the guard-in stages (PII, injection, app rules) of in-process Route calls.

The retail demo is copied into a temporary directory and its fast model trained
(``bench.common.workspace``); beside the copy, ``governed.yaml`` is the same configuration
with ``tenants.retail.governance`` set (:func:`governance`) and ``structured.yaml`` the same
with the learned tagger off. ``Plexus`` is built on each and ``await
plexus.pipeline.route(caller, query)`` is called one request at a time over the latency suite's
~20-word retail queries, in alternating blocks (governed, structured, plain, plain, structured,
governed, ...). The stage times are the pipeline's own ``decision.timings_us`` entries
(``pii``, ``injection``, ``app_rules``; whole microseconds, truncated).
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench import api, common
from bench.latency import QUERIES
from bench.report import markdown_table, percentiles_us, say

APP = "storefront"
METADATA = {"store_id": "1432"}
STAGES = ("pii", "injection", "app_rules")
SHOWN = ("prep", *STAGES, "route", "policy")
GOAL_US = 60.0
WARMUP = 200
BLOCKS = 8  # per configuration; the configurations alternate ABBA between blocks


def governance(learned: bool) -> dict[str, Any]:
    """PII redacted (learned kinds too), injections blocked, abstained intents refused."""
    return {
        "pii": {"default_action": "redact", "learned": learned},
        "injection": {"action": "block"},
        "apps": {APP: {"refuse_abstained": True}},
    }


@dataclass
class Prepared:
    plain: Path  # the working copy, no governance
    governed: Path  # the same with tenants.retail.governance
    structured: Path  # the same governance with the learned tagger off
    space: common.Workspace
    rules: dict[str, Any]


def prepare(config: Path, workdir: Path, learned: bool) -> Prepared:
    space = common.workspace(config, workdir)
    raw = yaml.safe_load(space.config.read_text(encoding="utf-8"))
    tenant = raw["tenants"].get(common.TENANT)
    if tenant is None:
        raise RuntimeError(f"{config}: no tenant {common.TENANT!r} to govern")
    paths = {}
    for name, rules in (("governed", governance(learned)), ("structured", governance(False))):
        tenant["governance"] = rules
        paths[name] = space.config.with_name(f"{name}.yaml")
        paths[name].write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        api.load_config(paths[name])  # a bad file fails here, not inside a server child
    return Prepared(
        space.config, paths["governed"], paths["structured"], space, governance(learned)
    )


async def _open(path: Path) -> tuple[Any, Any]:
    plexus = api.Plexus(api.load_config(path))
    await plexus.warm()
    return plexus, plexus.keys.authenticate(common.api_key())


async def _screen(plexi: dict[str, tuple[Any, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Each query once through each config: the ones the governed one accepts, what it did."""
    kept, seen = [], []
    for text in QUERIES:
        entry: dict[str, Any] = {"query": text}
        for name, (plexus, caller) in plexi.items():
            try:
                decision = await plexus.pipeline.route(caller, api.RouteQuery(APP, text, METADATA))
            except api.PlexusError as exc:
                entry[name] = {"refused": f"{type(exc).__name__}: {exc}"}
                continue
            findings = [f"{f.kind}:{f.action}" for f in decision.findings]
            entry[name] = {"route": decision.route, "findings": findings}
        seen.append(entry)
        if "refused" not in entry["governed"]:
            kept.append(text)
    return kept, seen


async def _measure(plexi: dict[str, tuple[Any, Any]], texts: list[str], requests: int) -> Any:
    queries = [api.RouteQuery(APP, t, METADATA) for t in texts]
    keys = (*SHOWN, "guard_in", "call")
    samples: dict[str, dict[str, list[int]]] = {n: {k: [] for k in keys} for n in plexi}
    for plexus, caller in plexi.values():
        for i in range(WARMUP):
            await plexus.pipeline.route(caller, queries[i % len(queries)])
    per_block = max(requests // BLOCKS, 1)
    names = list(plexi)
    for block in range(BLOCKS):
        for name in names if block % 2 == 0 else reversed(names):
            plexus, caller = plexi[name]
            out = samples[name]
            gc.collect()
            for i in range(per_block):
                started = time.perf_counter_ns()
                decision = await plexus.pipeline.route(caller, queries[i % len(queries)])
                out["call"].append(time.perf_counter_ns() - started)
                t = decision.timings_us
                for key in SHOWN:
                    out[key].append(t.get(key, 0))
                out["guard_in"].append(sum(t.get(key, 0) for key in STAGES))
    return samples


def _stats(values: list[int], scale: float) -> dict[str, float]:
    p = percentiles_us(np.asarray(values, dtype=np.float64) * scale)
    return {k: round(v, 2) for k, v in p.items()}


async def _run(prepared: Prepared, requests: int | None) -> dict[str, Any]:
    plexi = {
        "governed": await _open(prepared.governed),
        "structured": await _open(prepared.structured),
        "plain": await _open(prepared.plain),
    }
    try:
        kept, seen = await _screen(plexi)
        if not kept:
            raise RuntimeError("the governed configuration refused every query")
        if requests is None:
            return {"queries": seen, "kept": kept}
        say(f"[stage] timing {requests} Route calls per configuration in process")
        samples = await _measure(plexi, kept, requests)
    finally:
        for plexus, _ in plexi.values():
            await plexus.aclose()
    rows = []
    for name, values in samples.items():
        row: dict[str, Any] = {"config": name, "calls": len(values["call"])}
        for key in (*SHOWN, "guard_in"):
            row[key] = _stats(values[key], 1e3)  # whole µs -> ns for percentiles_us
        row["call"] = _stats(values["call"], 1.0)
        rows.append(row)
    return {"queries": seen, "kept": kept, "rows": rows}


def accepted(prepared: Prepared) -> list[str]:
    """The queries the governed configuration accepts (each sent once through each config)."""
    return list(asyncio.run(_run(prepared, None))["kept"])


def run(prepared: Prepared, requests: int) -> dict[str, Any]:
    result = asyncio.run(_run(prepared, requests))
    by_config = {r["config"]: r for r in result["rows"]}
    p99 = by_config["governed"]["guard_in"]["p99"]
    structured = by_config["structured"]["guard_in"]["p99"]
    result.update(
        run=True,
        governance=prepared.rules,
        words_mean=round(np.mean([len(q["query"].split()) for q in result["queries"]]), 1),
        goals=[
            {
                "goal": f"Guard-in stages (pii + injection + app_rules) p99 ≤ {GOAL_US:.0f} µs "
                "per Route, in process",
                "measured": f"{p99:.0f} µs (learned tagger off: {structured:.0f} µs)",
                "met": p99 <= GOAL_US,
            }
        ],
    )
    return result


def markdown(part: dict[str, Any]) -> str:
    if not part.get("run"):
        return f"Not run: {part['reason']}."
    header = [
        "config",
        "calls",
        *[f"{k} p50/p99 µs" for k in (*SHOWN, "guard_in")],
        "whole call p50/p99 µs",
    ]
    rows = []
    for r in part["rows"]:
        cells = [f"{r[k]['p50']:.0f} / {r[k]['p99']:.0f}" for k in (*SHOWN, "guard_in")]
        call = f"{r['call']['p50']:.0f} / {r['call']['p99']:.0f}"
        rows.append([r["config"], f"{r['calls']:,}", *cells, call])
    refused = [q for q in part["queries"] if "refused" in q["governed"]]
    changed = [
        q
        for q in part["queries"]
        if "route" in q["governed"] and q["governed"]["route"] != q["plain"].get("route")
    ]
    found: dict[str, int] = {}
    for q in part["queries"]:
        for finding in q["governed"].get("findings", []):
            found[finding] = found.get(finding, 0) + 1
    lines = [
        f"Governed: `tenants.retail.governance` = `{json.dumps(part['governance'])}`; "
        "structured: the same with `learned: false` (structured scanner only); plain: the same "
        "copy without governance (its guard-in stages run and return at once). "
        f"App `{APP}`, {len(part['queries'])} retail queries of ~{part['words_mean']} words, "
        "each sent once first: "
        + (
            "; ".join(
                f"refused by the governed config: “{q['query']}” ({q['governed']['refused']})"
                for q in refused
            )
            or "none refused"
        )
        + f". The {len(part['kept'])} accepted queries are timed in rotation, "
        f"{BLOCKS} alternating blocks per configuration after {WARMUP} warm-up calls each.",
        "Findings on those queries (governed): "
        + (", ".join(f"{k} ×{v}" for k, v in sorted(found.items())) or "none")
        + "; routes that differ from the plain config's: "
        + (", ".join(f"“{q['query'][:40]}…”" for q in changed) or "none")
        + ".",
        "",
        markdown_table(header, rows),
        "",
        "Stage entries are the pipeline's `timings_us` (whole µs, truncated); `guard_in` is "
        "pii + injection + app_rules of the same request; the whole call is "
        "`pipeline.route` measured around the await.",
    ]
    return "\n".join(lines)


def plot(part: dict[str, Any], ax: Any) -> None:
    if not part.get("run"):
        ax.text(0.5, 0.5, "guard-in stages: not run", ha="center", va="center")
        ax.set_axis_off()
        return
    keys = [*STAGES, "guard_in", "route"]
    xs = np.arange(len(keys))
    colors = {"governed": "tab:blue", "structured": "tab:cyan", "plain": "tab:gray"}
    width = 0.8 / len(part["rows"])
    for i, row in enumerate(part["rows"]):
        offset = (i - (len(part["rows"]) - 1) / 2) * width
        color = colors.get(row["config"], "tab:green")
        ax.bar(
            xs + offset,
            [row[k]["p50"] for k in keys],
            width,
            color=color,
            label=f"{row['config']} p50",
        )
        ax.scatter(
            xs + offset,
            [row[k]["p99"] for k in keys],
            color=color,
            marker="v",
            label=f"{row['config']} p99",
        )
    ax.axhline(GOAL_US, color="tab:red", linestyle=":", linewidth=1)
    ax.set_xticks(xs, keys)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set(ylabel="µs per Route (in process, symlog)", title="Pipeline stages, timings_us")
    ax.legend(fontsize=7, loc="upper left")
