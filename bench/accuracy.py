"""CLINC150 accuracy per model family (``--data`` is CLINC150's ``data_full.json``).

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

from bench import api, common
from bench.report import (
    document,
    fence,
    machine_facts,
    num,
    pct,
    percent,
    percentiles_us,
    publish,
    say,
    table,
)

SPLITS = ("train", "val", "test", "oos_train", "oos_val", "oos_test")
FAMILIES = ("fast", "accurate")
OOS = "oos"
# The targets per family: (minimum in-scope accuracy, minimum out-of-scope recall).
TARGETS = {"fast": (0.90, 0.50), "accurate": (0.95, 0.60)}
LATENCY_QUERIES = 1000
LATENCY_WARMUP = 50
PUBLISHED_SUFFIXES = {".md", ".csv", ".tsv", ".json"}
PUBLISHED_MAX_CHARS = 1_000_000
HELP = "CLINC150 accuracy per model family"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="path to CLINC150 data_full.json")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    common.add_out(parser)
    parser.add_argument("--seed", type=int, default=0)


class DataError(ValueError):
    """The dataset file is missing or not CLINC150's data_full.json shape."""


def load_clinc(path: Path) -> dict[str, Any]:
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
        splits[key] = api.Examples(texts, labels)
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
    if classifier.uses_encoder:
        encoder = api.shared_encoder()

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
    train = splits["train"] + splits["oos_train"]
    heldout = splits["val"] + splits["oos_val"]
    test = splits["test"] + splits["oos_test"]
    say(f"[{family}] training on {len(train)} examples, calibrating on {len(heldout)}")
    wall = time.perf_counter()
    trained = api.train_model(
        train, family=family, heldout=heldout, seed=seed, progress=lambda m: say(f"[{family}] {m}")
    )
    wall = time.perf_counter() - wall
    classifier = api.Classifier(trained.model_bytes, f"clinc-{family}")
    labels = classifier.labels
    threshold = trained.card.threshold
    say(f"[{family}] scoring {len(test)} test examples (threshold {threshold})")
    probs = api.predict_texts(classifier, test.texts)
    metrics = api.evaluate(probs, test.labels, labels, OOS, threshold)
    curve = api.threshold_curve(probs, test.labels, labels, OOS)
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


def _best_row(f: dict[str, Any]) -> dict[str, Any]:
    goal = (
        f"in-scope ≥ {pct(f['targets']['inscope_accuracy'])}, "
        f"oos recall ≥ {pct(f['targets']['oos_recall'])}"
    )
    best = f["best_point_meeting_targets"]
    if best is None:
        return {"family": f["family"], "goal": goal, "threshold": "none on the curve"}
    return {"family": f["family"], "goal": goal, **best, "threshold": f"{best['threshold']:.2f}"}


def _published(published: dict[str, Any]) -> str:
    if not published["files"]:
        return (
            f"No README, Markdown, CSV, TSV or JSON (other than data*.json) files were found in "
            f"`{published['folder']}`, so no published results are shown here; compare by hand "
            "with the CLINC150 paper (Larson et al., EMNLP 2019)."
        )
    return "\n\n".join(
        f"### {item['name']}{' (truncated)' if item['truncated'] else ''}\n\n{fence(item['text'])}"
        for item in published["files"]
    )


def to_markdown(report: dict[str, Any]) -> str:
    d, families = report["dataset"], report["families"]
    quality = [
        ("in-scope acc", percent("inscope_accuracy")),
        ("oos recall", percent("oos_recall")),
        ("oos precision", percent("oos_precision")),
    ]
    results = table(
        [{**f, **f["test_metrics"]} for f in families],
        [
            ("family", "family"),
            ("threshold", num("threshold", 2)),
            *quality,
            ("macro-F1", percent("macro_f1")),
            ("train s", num("train_seconds", 1)),
            ("p50 µs", num("latency.p50_us")),
            ("p99 µs", num("latency.p99_us")),
            ("meets targets", lambda f: "yes" if f["calibrated_meets_targets"] else "no"),
        ],
    )
    best = table(
        [_best_row(f) for f in families],
        [("family", "family"), ("target", "goal"), ("threshold", "threshold"), *quality],
    )
    latency = table(
        families,
        [
            ("family", "family"),
            ("queries", "latency.queries"),
            ("featurize p50 µs", num("latency.featurize_p50_us")),
            ("encode p50 µs", num("latency.encode_p50_us")),
            ("classify p50 µs", num("latency.classify_p50_us")),
            ("total p50 µs", num("latency.p50_us")),
            ("total p99 µs", num("latency.p99_us")),
            ("native featurizer", "latency.native_featurizer"),
        ],
    )
    marks = [round(t, 2) for t in np.arange(0.0, 1.0, 0.1)]
    curve = table(
        [
            {"family": f["family"], **point}
            for f in families
            for point in f["curve"]
            if any(abs(point["threshold"] - m) < 0.005 for m in marks)
        ],
        [("family", "family"), ("threshold", num("threshold", 2)), *quality]
        + [("macro-F1", percent("macro_f1"))],
    )
    steps = "featurize + classify"
    if any(f["family"] == "accurate" for f in families):
        steps = "featurize + encode (accurate) + classify"
    queries = max((f["latency"]["queries"] for f in families), default=0)
    notes = [
        f"Data: `{d['path']}`: {d['intents']} in-scope intents; train {d['train']} + oos_train "
        f"{d['oos_train']}, val {d['val']} + oos_val {d['oos_val']}, test {d['test']} + "
        f"oos_test {d['oos_test']}; seed {report['seed']}.",
        "Each family trains on train + oos_train, calibrates its abstain threshold on val + "
        "oos_val, and is scored on test + oos_test at that threshold. In-scope accuracy counts "
        "an abstention on an in-scope query as an error.",
        f"Latency: one query at a time on one thread ({steps}), over {queries} test queries "
        f"(after a warm-up pass over up to {LATENCY_WARMUP} of them).",
    ]
    sections = [
        ("Results at the calibrated threshold (test set)", results),
        ("Best threshold meeting the targets (chosen on the test curve, so optimistic)", best),
        ("Decision latency breakdown", latency),
        (
            "Threshold curve (test set, every 0.1)",
            f"{curve}\n\nPlot: `accuracy.png`. Run time {report['seconds']} s.",
        ),
        ("Published results (from the dataset folder)", _published(report["published"])),
    ]
    return document("Plexus accuracy on CLINC150", report, notes, sections)


def plot(report: dict[str, Any], plt: Any) -> Any:
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
    return fig


def main(args: argparse.Namespace) -> int:
    data_path = Path(args.data)
    families = list(dict.fromkeys(args.families))
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
