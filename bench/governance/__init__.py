"""Governance: PII spans, the injection guard, the guard-in stages' cost, Route with governance.

Four parts, each skippable (``--skip-pii``, ``--skip-injection``, ``--skip-stage``,
``--skip-route``); a part whose data is absent is not run and says why:

1. PII spans on the presidio-research synthetic set (``--pii-data``): precision, recall, F1 and
   F2 per entity type and overall, exact and overlap match, beside Presidio's published figures
   (and its pattern recognizers run here when presidio-analyzer is installed; ``--skip-presidio``),
   plus detect + redact cost per 100 tokens (:mod:`bench.governance.pii`);
2. the shipped injection guard on the S-Labs test split (``--injection-data``): precision,
   recall, F1, benign FPR, ROC curve and AUC, and ``guard.score`` cost
   (:mod:`bench.governance.injection`);
3. the guard-in stages of in-process Route calls on the retail demo with governance on and off
   (:mod:`bench.governance.stage`);
4. Route over gRPC with governance on vs the echo servicer and the plain config, the latency
   suite's harness (:mod:`bench.governance.route`).

Each goal is printed as met or missed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common
from bench.governance import injection, pii, route, stage
from bench.report import document, machine_facts, machine_title, markdown_table, publish, say

HELP = "PII spans, injection guard, guard-in cost, Route with governance"
DATA = common.CHECKOUT.parent / "shared" / "data"  # the shared data sets beside the checkout
PII_DATA = DATA / "pii" / "synth_dataset_v2.json"
INJECTION_DATA = DATA / "injection"
PARTS = ("pii", "injection", "stage", "route")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pii-data",
        type=Path,
        default=PII_DATA,
        help="presidio-research's synth_dataset_v2.json (default: %(default)s)",
    )
    parser.add_argument(
        "--injection-data",
        type=Path,
        default=INJECTION_DATA,
        help="the S-Labs folder (its test.csv) or a text,label CSV (default: %(default)s)",
    )
    parser.add_argument("--config", type=Path, default=common.DEMO_CONFIG)
    parser.add_argument(
        "--pii-repeats", type=common.positive, default=3, help="timed passes over the sentences"
    )
    parser.add_argument(
        "--score-calls", type=common.positive, default=10_000, help="timed guard.score calls"
    )
    parser.add_argument(
        "--stage-requests",
        type=common.positive,
        default=10_000,
        help="in-process Route calls per configuration (part 3)",
    )
    parser.add_argument(
        "--requests", type=common.positive, default=1_000, help="Route calls per server (part 4)"
    )
    parser.add_argument("--concurrency", type=common.positive, nargs="+", default=[1])
    parser.add_argument("--processes", type=common.positive, default=1, help="client processes")
    common.add_out(parser)
    for name in PARTS:
        parser.add_argument(f"--skip-{name}", action="store_true", help=f"do not run part {name}")
    parser.add_argument(
        "--skip-presidio", action="store_true", help="do not run presidio-analyzer side by side"
    )


def _skipped(name: str) -> dict[str, Any]:
    return {"run": False, "reason": f"skipped (--skip-{name})"}


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    parts: dict[str, dict[str, Any]] = {name: _skipped(name) for name in PARTS}
    if not args.skip_pii:
        parts["pii"] = pii.run(
            Path(args.pii_data),
            repeats=args.pii_repeats,
            with_presidio=not args.skip_presidio,
        )
    if not args.skip_injection:
        parts["injection"] = injection.run(Path(args.injection_data), timing_calls=args.score_calls)
    if not (args.skip_stage and args.skip_route):
        learned, tagger = pii.tagger_status()
        if not learned:
            say(f"warning: the learned tagger does not load ({tagger}); governed with learned off")
        with tempfile.TemporaryDirectory(prefix="plexus-bench-") as tmp:
            prepared = stage.prepare(Path(args.config), Path(tmp), learned)
            if args.skip_stage:
                queries = stage.accepted(prepared)
            else:
                parts["stage"] = stage.run(prepared, args.stage_requests)
                queries = parts["stage"]["kept"]
            if not args.skip_route:
                parts["route"] = route.run(
                    prepared.plain,
                    prepared.governed,
                    queries,
                    app=stage.APP,
                    metadata=stage.METADATA,
                    requests=args.requests,
                    levels=list(dict.fromkeys(args.concurrency)),
                    processes=args.processes,
                )
            models = prepared.space.models
    else:
        models = {}
    return {
        "suite": "governance",
        "machine": machine_facts(),
        "settings": {
            "pii_data": str(args.pii_data),
            "injection_data": str(args.injection_data),
            "config": str(args.config),
            "pii_repeats": args.pii_repeats,
            "score_calls": args.score_calls,
            "stage_requests": args.stage_requests,
            "requests": args.requests,
            "concurrency": list(args.concurrency),
            "processes": args.processes,
        },
        "models": models,
        **parts,
        "goals": [goal for name in PARTS for goal in parts[name].get("goals", [])],
        "seconds": round(time.monotonic() - started, 1),
    }


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("**met**" if met else "**missed**")


def to_markdown(report: dict[str, Any]) -> str:
    goals = markdown_table(
        ["goal", "measured", "verdict"],
        [[g["goal"], g["measured"], _verdict(g["met"])] for g in report["goals"]],
    )
    not_run = [f"{name}: {report[name]['reason']}" for name in PARTS if not report[name]["run"]]
    notes = [
        "Goals are judged on this run's figures; a part that did not run has no verdict"
        + (f" (not run: {'; '.join(not_run)})." if not_run else "."),
    ]
    if report["models"]:
        notes.append(
            "Routing model (parts 3 and 4): "
            + "; ".join(
                f"{t}: {m['version']} ({m['family']}, {m['labels']} labels)"
                for t, m in report["models"].items()
            )
            + "."
        )
    sections = [
        ("Goals", goals if report["goals"] else "No part ran."),
        ("1. PII spans (presidio-research synth_dataset_v2)", pii.markdown(report["pii"])),
        ("2. Prompt-injection guard (S-Labs test split)", injection.markdown(report["injection"])),
        ("3. Guard-in stages in process (Route)", stage.markdown(report["stage"])),
        ("4. Route over gRPC: governed vs echo vs plain", route.markdown(report["route"])),
    ]
    return document(
        "Plexus governance: PII, injection, guard-in cost",
        report,
        notes,
        sections,
        f"Run time {report['seconds']} s. Plot: `governance.png`.",
    )


def plot(report: dict[str, Any], plt: Any) -> Any:
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    pii.plot(report["pii"], axes[0][0])
    injection.plot(report["injection"], axes[0][1])
    stage.plot(report["stage"], axes[1][0])
    route.plot(report["route"], axes[1][1])
    fig.suptitle(machine_title(report, "Plexus governance"))
    return fig


def main(args: argparse.Namespace) -> int:
    report = run_suite(args)
    publish(Path(args.out), "governance", report, to_markdown(report), plot)
    return 0
