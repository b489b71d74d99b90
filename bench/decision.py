"""Single-threaded decision latency per model family, in process.

Trains each family on the retail demo (routes + out-of-scope data), then times featurize
(+ encode) + classify one query at a time, after a warm-up. The baseline in the same run is
the same fast model file executed by onnxruntime instead of the native head.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import api, common
from bench.report import document, machine_facts, num, percentiles_us, publish, say, table

HELP = "single-threaded decision latency per family"
QUERY = (
    "hi, is the 65 inch samsung qled tv still in stock at store 1432 or should I just order online"
)
WARMUP = 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=common.DEMO_CONFIG)
    parser.add_argument(
        "--count",
        type=common.positive,
        default=10000,
        help="decisions to time (fast family; the accurate family times a tenth, at least 100)",
    )
    common.add_out(parser)


def _time(classifier: Any, encode: Any, count: int) -> np.ndarray:
    def once() -> None:
        ids = classifier.featurizer.featurize(QUERY).reshape(1, -1)
        classifier.predict(ids, encode([QUERY]) if encode else None)

    for _ in range(WARMUP):
        once()
    samples = np.empty(count, dtype=np.int64)
    for i in range(count):
        started = time.perf_counter_ns()
        once()
        samples[i] = time.perf_counter_ns() - started
    return samples


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    loaded = api.load_config(args.config)
    examples = api.tenant_examples(loaded, common.TENANT)
    model = loaded.tenant(common.TENANT).model
    params = api.FeaturizerParams(buckets_log2=model.buckets_log2, seed=model.seed)
    rows, samples = [], {}
    for family in ("fast", "accurate"):
        say(f"training the {family} family on the retail demo")
        trained = api.train_model(
            examples, family=family, featurizer_params=params, seed=model.seed
        )
        variants = [(family, api.Classifier(trained.model_bytes, family))]
        if family == "fast":
            baseline = api.Classifier(trained.model_bytes, "ort", native_head=False)
            variants.append(("fast (onnxruntime)", baseline))
        for name, classifier in variants:
            encode = api.shared_encoder().encode if classifier.uses_encoder else None
            count = args.count if family == "fast" else max(args.count // 10, 100)
            say(f"timing {name}: {count} decisions")
            samples[name] = _time(classifier, encode, count)
            rows.append({"family": name, "decisions": count, **percentiles_us(samples[name])})
    return {
        "suite": "decision",
        "machine": machine_facts(),
        "query_words": len(QUERY.split()),
        "warmup": WARMUP,
        "rows": rows,
        "samples_us": {k: (v / 1000).tolist() for k, v in samples.items()},
    }


def to_markdown(report: dict[str, Any]) -> str:
    results = table(
        report["rows"],
        [
            ("family", "family"),
            ("decisions", "decisions"),
            *[(f"{k.replace('_', '.')} µs", num(k, 1)) for k in ("p50", "p99", "p99_9", "mean")],
        ],
    )
    notes = [
        f"One {report['query_words']}-word query, featurize (+ encode) + classify, one at a time "
        f"after {report['warmup']} warm-up calls."
    ]
    title = "Plexus decision latency (single thread, in process)"
    return document(title, report, notes, [("Decision latency", results)])


def plot(report: dict[str, Any], plt: Any) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(report["samples_us"])
    ax.boxplot([report["samples_us"][n] for n in names], showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.set_yscale("log")
    ax.set_ylabel("decision latency (µs)")
    return fig


def main(args: argparse.Namespace) -> int:
    report = run_suite(args)
    publish(args.out, "decision", report, to_markdown(report), plot)
    return 0
