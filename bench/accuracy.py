"""``plexus bench accuracy --data data_full.json``: CLINC150 accuracy per model family.

For each family the model is trained on ``train`` + ``oos_train``, its abstain threshold is
calibrated on ``val`` + ``oos_val`` (as ``train_model`` does with a given held-out set), and it
is scored on ``test`` + ``oos_test``: in-scope accuracy (an abstention on an in-scope query is an
error), out-of-scope recall and precision, macro-F1, the whole threshold curve, training time,
and single-threaded per-decision latency.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
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

SPLITS = ("train", "val", "test", "oos_train", "oos_val", "oos_test")
FAMILIES = ("fast", "accurate")
OOS = "oos"
# The targets from the issue: (minimum in-scope accuracy, minimum out-of-scope recall).
TARGETS = {"fast": (0.90, 0.50), "accurate": (0.95, 0.60)}
LATENCY_QUERIES = 1000
LATENCY_WARMUP = 50
PUBLISHED_SUFFIXES = {".md", ".csv", ".tsv", ".json"}
PUBLISHED_MAX_CHARS = 1_000_000


class DataError(ValueError):
    """The dataset file is missing or not CLINC150's data_full.json shape."""


def load_clinc(path: Path) -> dict[str, Any]:
    from router.routing.training import Examples

    if not path.exists():
        raise DataError(f"{path}: no such file (give the path to CLINC150's data_full.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read it as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with keys {list(SPLITS)}")
    missing = [key for key in SPLITS if key not in data]
    if missing:
        raise DataError(f"{path}: missing keys {missing} (expected {list(SPLITS)})")
    splits = {}
    for key in SPLITS:
        texts, labels = [], []
        for i, row in enumerate(data[key]):
            if (
                not isinstance(row, list | tuple)
                or len(row) != 2
                or not all(isinstance(x, str) for x in row)
            ):
                raise DataError(f"{path}: {key}[{i}]: expected a [text, intent] pair")
            texts.append(row[0])
            labels.append(row[1])
        splits[key] = Examples(texts, labels)
    if not len(splits["test"]) or not len(splits["train"]):
        raise DataError(f"{path}: 'train' and 'test' must not be empty")
    return splits


def published_files(data_path: Path) -> list[dict[str, Any]]:
    """README*, *.md, *.csv, *.tsv and *.json (other than data*.json) beside the data file."""
    found = []
    folder = data_path.resolve().parent
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.resolve() == data_path.resolve():
            continue
        name = path.name.lower()
        suffix = path.suffix.lower()
        if suffix == ".json" and name.startswith("data"):
            continue
        if not (name.startswith("readme") or suffix in PUBLISHED_SUFFIXES):
            continue
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            text = f"(cannot read: {exc.strerror})"
        truncated = len(text) > PUBLISHED_MAX_CHARS
        found.append(
            {
                "name": path.name,
                "path": str(path),
                "truncated": truncated,
                "text": text[:PUBLISHED_MAX_CHARS],
            }
        )
    return found


def decision_latency(classifier: Any, texts: list[str]) -> dict[str, Any]:
    """One query at a time on one thread: featurize (+ encode) + classify, in µs."""
    from tqdm import tqdm

    encoder = None
    if classifier.needs_embedding:
        from router.routing.encoder import shared_encoder

        encoder = shared_encoder()

    def once(text: str) -> tuple[int, int, int]:
        t0 = time.perf_counter_ns()
        ids = classifier.featurizer.featurize_batch([text])
        t1 = time.perf_counter_ns()
        emb = encoder.encode([text]) if encoder is not None else None
        t2 = time.perf_counter_ns()
        classifier.predict(ids, emb)
        t3 = time.perf_counter_ns()
        return t1 - t0, t2 - t1, t3 - t2

    for text in texts[:LATENCY_WARMUP]:
        once(text)
    parts = np.array(
        [
            once(text)
            for text in tqdm(texts, desc="decision latency", unit="q", leave=False, file=sys.stderr)
        ]
    )
    total = parts.sum(axis=1)
    stats = percentiles_us(total)
    return {
        "queries": len(texts),
        "p50_us": stats["p50"],
        "p99_us": stats["p99"],
        "mean_us": stats["mean"],
        "featurize_p50_us": percentiles_us(parts[:, 0])["p50"],
        "encode_p50_us": percentiles_us(parts[:, 1])["p50"] if encoder is not None else None,
        "classify_p50_us": percentiles_us(parts[:, 2])["p50"],
        "native_featurizer": bool(classifier.featurizer.native),
    }


def best_meeting(curve: list[dict[str, float]], family: str) -> dict[str, float] | None:
    """The curve point meeting the family's targets with the highest accuracy + recall."""
    min_acc, min_recall = TARGETS[family]
    ok = [
        p
        for p in curve
        if p.get("inscope_accuracy", 0) >= min_acc and p.get("oos_recall", 0) >= min_recall
    ]
    if not ok:
        return None
    return max(ok, key=lambda p: p["inscope_accuracy"] + p["oos_recall"])


def meets(metrics: dict[str, float], family: str) -> bool:
    min_acc, min_recall = TARGETS[family]
    return (
        metrics.get("inscope_accuracy", 0) >= min_acc and metrics.get("oos_recall", 0) >= min_recall
    )


def run_family(family: str, splits: dict[str, Any], seed: int) -> dict[str, Any]:
    from router.routing.model import Classifier
    from router.routing.training import evaluate, predict_texts, threshold_curve, train_model

    train = splits["train"] + splits["oos_train"]
    heldout = splits["val"] + splits["oos_val"]
    test = splits["test"] + splits["oos_test"]
    say(f"[{family}] training on {len(train)} examples, calibrating on {len(heldout)}")
    wall = time.perf_counter()
    trained = train_model(
        train, family=family, heldout=heldout, seed=seed, progress=lambda m: say(f"[{family}] {m}")
    )
    wall = time.perf_counter() - wall
    classifier = Classifier(trained.model_bytes, f"clinc-{family}")
    labels = classifier.labels
    threshold = trained.card.threshold
    say(f"[{family}] scoring {len(test)} test examples (threshold {threshold})")
    probs = predict_texts(classifier, test.texts)
    metrics = evaluate(probs, test.labels, labels, OOS, threshold)
    curve = threshold_curve(probs, test.labels, labels, OOS)
    rng = np.random.default_rng(seed)
    count = min(LATENCY_QUERIES, len(test))
    sample = [test.texts[i] for i in rng.permutation(len(test))[:count]]
    say(f"[{family}] timing {count} single decisions")
    latency = decision_latency(classifier, sample)
    best = best_meeting(curve, family)
    return {
        "family": family,
        "labels": len(labels),
        "train_examples": len(train),
        "heldout_examples": len(heldout),
        "test_examples": len(test),
        "train_seconds": round(trained.seconds, 2),
        "train_wall_seconds": round(wall, 2),
        "model_bytes": len(trained.model_bytes),
        "threshold": threshold,
        "heldout_metrics": trained.card.metrics,
        "test_metrics": metrics,
        "targets": {"inscope_accuracy": TARGETS[family][0], "oos_recall": TARGETS[family][1]},
        "calibrated_meets_targets": meets(metrics, family),
        "best_point_meeting_targets": best,
        "latency": latency,
        "curve": curve,
    }


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _fence(text: str) -> str:
    longest, run = 0, 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text.rstrip()}\n{fence}"


def to_markdown(report: dict[str, Any]) -> str:
    d = report["dataset"]
    families = report["families"]
    main_table = markdown_table(
        [
            "family",
            "threshold",
            "in-scope acc",
            "oos recall",
            "oos precision",
            "macro-F1",
            "train s",
            "p50 µs",
            "p99 µs",
            "meets targets",
        ],
        [
            [
                f["family"],
                f"{f['threshold']:.2f}",
                _pct(f["test_metrics"].get("inscope_accuracy")),
                _pct(f["test_metrics"].get("oos_recall")),
                _pct(f["test_metrics"].get("oos_precision")),
                _pct(f["test_metrics"].get("macro_f1")),
                f"{f['train_seconds']:.1f}",
                _us(f["latency"]["p50_us"]),
                _us(f["latency"]["p99_us"]),
                "yes" if f["calibrated_meets_targets"] else "no",
            ]
            for f in families
        ],
    )
    target_rows = []
    for f in families:
        best = f["best_point_meeting_targets"]
        goal = (
            f"in-scope ≥ {_pct(f['targets']['inscope_accuracy'])}, "
            f"oos recall ≥ {_pct(f['targets']['oos_recall'])}"
        )
        if best is None:
            target_rows.append([f["family"], goal, "none on the curve", "", "", ""])
        else:
            target_rows.append(
                [
                    f["family"],
                    goal,
                    f"{best['threshold']:.2f}",
                    _pct(best["inscope_accuracy"]),
                    _pct(best["oos_recall"]),
                    _pct(best.get("oos_precision")),
                ]
            )
    targets = markdown_table(
        ["family", "target", "threshold", "in-scope acc", "oos recall", "oos precision"],
        target_rows,
    )
    latency = markdown_table(
        [
            "family",
            "queries",
            "featurize p50 µs",
            "encode p50 µs",
            "classify p50 µs",
            "total p50 µs",
            "total p99 µs",
            "native featurizer",
        ],
        [
            [
                f["family"],
                f["latency"]["queries"],
                _us(f["latency"]["featurize_p50_us"]),
                _us(f["latency"]["encode_p50_us"]),
                _us(f["latency"]["classify_p50_us"]),
                _us(f["latency"]["p50_us"]),
                _us(f["latency"]["p99_us"]),
                f["latency"]["native_featurizer"],
            ]
            for f in families
        ],
    )
    steps = "featurize + classify"
    if any(f["family"] == "accurate" for f in families):
        steps = "featurize + encode (accurate) + classify"
    queries = max((f["latency"]["queries"] for f in families), default=0)
    marks = [round(t, 2) for t in np.arange(0.0, 1.0, 0.1)]
    curve_rows = []
    for f in families:
        for point in f["curve"]:
            if any(abs(point["threshold"] - m) < 0.005 for m in marks):
                curve_rows.append(
                    [
                        f["family"],
                        f"{point['threshold']:.2f}",
                        _pct(point.get("inscope_accuracy")),
                        _pct(point.get("oos_recall")),
                        _pct(point.get("oos_precision")),
                        _pct(point.get("macro_f1")),
                    ]
                )
    curve = markdown_table(
        ["family", "threshold", "in-scope acc", "oos recall", "oos precision", "macro-F1"],
        curve_rows,
    )
    published = report["published"]
    if published["files"]:
        parts = []
        for item in published["files"]:
            note = " (truncated)" if item["truncated"] else ""
            parts.append(f"### {item['name']}{note}\n\n{_fence(item['text'])}")
        published_md = "\n\n".join(parts)
    else:
        published_md = (
            f"No README, Markdown, CSV, TSV or JSON (other than data*.json) files "
            f"were found in `{published['folder']}`, so no published results are "
            f"shown here; compare by hand with the CLINC150 paper (Larson et al., "
            f"EMNLP 2019)."
        )
    return f"""# Plexus accuracy on CLINC150

{machine_markdown(report["machine"])}

- Data: `{d["path"]}`: {d["intents"]} in-scope intents; train {d["train"]} + oos_train \
{d["oos_train"]}, val {d["val"]} + oos_val {d["oos_val"]}, test {d["test"]} + oos_test \
{d["oos_test"]}; seed {report["seed"]}.
- Each family trains on train + oos_train, calibrates its abstain threshold on val + oos_val, \
and is scored on test + oos_test at that threshold. In-scope accuracy counts an abstention on \
an in-scope query as an error.
- Latency: one query at a time on one thread ({steps}), over {queries} test queries \
(after a warm-up pass over up to {LATENCY_WARMUP} of them).

## Results at the calibrated threshold (test set)

{main_table}

## Best threshold meeting the targets (chosen on the test curve, so optimistic)

{targets}

## Decision latency breakdown

{latency}

## Threshold curve (test set, every 0.1)

{curve}

Plot: `accuracy.png`. Run time {report["seconds"]} s.

## Published results (from the dataset folder)

{published_md}
"""


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5.5))
    colors = {"fast": "tab:blue", "accurate": "tab:orange"}
    for f in report["families"]:
        color = colors.get(f["family"])
        points = [p for p in f["curve"] if "oos_recall" in p and "inscope_accuracy" in p]
        ax.plot(
            [p["oos_recall"] for p in points],
            [p["inscope_accuracy"] for p in points],
            "-",
            color=color,
            label=f"{f['family']} (thresholds 0–0.99)",
        )
        m = f["test_metrics"]
        if "oos_recall" in m and "inscope_accuracy" in m:
            ax.plot(
                [m["oos_recall"]],
                [m["inscope_accuracy"]],
                "*",
                markersize=14,
                color=color,
                label=f"{f['family']} calibrated ({f['threshold']:.2f})",
            )
        min_acc, min_recall = TARGETS[f["family"]]
        ax.axhline(min_acc, color=color, linestyle=":", linewidth=1)
        ax.axvline(min_recall, color=color, linestyle=":", linewidth=1)
        ax.fill_between([min_recall, 1.0], min_acc, 1.0, color=color, alpha=0.07)
    ax.set_xlabel("out-of-scope recall")
    ax.set_ylabel("in-scope accuracy (abstention = error)")
    ax.set_xlim(0, 1.01)
    ax.set_title(
        "CLINC150 test: in-scope accuracy vs out-of-scope recall\n"
        "(dotted lines / shaded: the family's targets)"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    data_path = Path(args.data)
    families = list(dict.fromkeys(args.families))
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        print(
            f"plexus bench accuracy: error: unknown families {unknown} (have {list(FAMILIES)})",
            file=sys.stderr,
        )
        return 2
    try:
        splits = load_clinc(data_path)
    except DataError as exc:
        print(f"plexus bench accuracy: error: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    results = [run_family(family, splits, args.seed) for family in families]
    intents = sorted(set(splits["train"].labels) - {OOS})
    report = {
        "suite": "accuracy",
        "machine": machine_facts(),
        "seed": args.seed,
        "dataset": {
            "path": str(data_path),
            "intents": len(intents),
            **{key: len(splits[key]) for key in SPLITS},
        },
        "families": results,
        "published": {
            "folder": str(data_path.resolve().parent),
            "files": published_files(data_path),
        },
        "seconds": round(time.monotonic() - started, 1),
    }
    publish(Path(args.out), "accuracy", report, to_markdown(report), plot)
    return 0
