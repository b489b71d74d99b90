"""``plexus bench decision``: single-threaded decision latency per family, in process.

Trains each family on the retail demo (routes + out-of-scope data), then times
featurize (+ encode) + classify one query at a time, after a warm-up. The baseline in the same
run is the same fast model file executed by onnxruntime instead of the native head.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from bench.common import (
    machine_facts,
    machine_markdown,
    markdown_table,
    percentiles_us,
    publish,
    pyplot,
    say,
)
from router.config import load_config
from router.routing.featurizer import FeaturizerParams
from router.routing.model import Classifier
from router.routing.tenant_training import tenant_examples
from router.routing.training import train_model

QUERY = (
    "hi, is the 65 inch samsung qled tv still in stock at store 1432 or should I just order online"
)
WARMUP = 100


def _time(classifier: Classifier, encode: Any, count: int) -> np.ndarray:
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
    loaded = load_config(args.config)
    examples = tenant_examples(loaded, "retail")
    model = loaded.tenant("retail").model
    params = FeaturizerParams(buckets_log2=model.buckets_log2, seed=model.seed)
    rows = []
    samples_by_name = {}
    for family in ("fast", "accurate"):
        say(f"training the {family} family on the retail demo")
        trained = train_model(examples, family=family, featurizer_params=params, seed=model.seed)
        variants = [(family, Classifier(trained.model_bytes, family))]
        if family == "fast":
            variants.append(
                ("fast (onnxruntime)", Classifier(trained.model_bytes, "ort", native_head=False))
            )
        for name, classifier in variants:
            encode = None
            if classifier.needs_embedding:
                from router.routing.encoder import shared_encoder

                encode = shared_encoder().encode
            count = args.count if family == "fast" else max(args.count // 10, 100)
            say(f"timing {name}: {count} decisions")
            samples = _time(classifier, encode, count)
            samples_by_name[name] = samples
            rows.append({"family": name, "decisions": count, **percentiles_us(samples)})
    return {
        "machine": machine_facts(),
        "query_words": len(QUERY.split()),
        "rows": rows,
        "samples_us": {k: (v / 1000).tolist() for k, v in samples_by_name.items()},
    }


def to_markdown(report: dict[str, Any]) -> str:
    table = markdown_table(
        ["family", "decisions", "p50 µs", "p99 µs", "p99.9 µs", "mean µs"],
        [
            [
                r["family"],
                r["decisions"],
                f"{r['p50']:.1f}",
                f"{r['p99']:.1f}",
                f"{r['p99_9']:.1f}",
                f"{r['mean']:.1f}",
            ]
            for r in report["rows"]
        ],
    )
    return "\n\n".join(
        [
            "# Plexus decision latency (single thread, in process)",
            machine_markdown(report["machine"]),
            f"One {report['query_words']}-word query, featurize (+ encode) + classify, one at a "
            f"time after {WARMUP} warm-up calls.",
            table,
        ]
    )


def plot(report: dict[str, Any], path: Any) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(report["samples_us"])
    ax.boxplot([report["samples_us"][n] for n in names], showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.set_yscale("log")
    ax.set_ylabel("decision latency (µs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    report = run_suite(args)
    publish(args.out, "decision", report, to_markdown(report), plot)
    return 0
