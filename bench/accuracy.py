"""Routing accuracy per model family on a labelled data set (CLINC150 or any of its shape).

The data is either a JSON object in the CLINC150 shape (``--data data_full.json``: lists of
``[text, label]`` pairs under ``train``, ``test`` and optionally ``val``, ``oos_train``,
``oos_val``, ``oos_test``), a folder holding ``train``, ``test`` and optionally ``val`` files
(``.jsonl`` with ``text`` and ``label``, or ``.csv`` with a ``text,label`` header), or such
files named one by one (``--train``, ``--val``, ``--test``). Rows labelled ``--oos-label``
(``oos``) are out-of-scope; the ``oos_*`` keys are merged into their split.

For each family the model is trained on the training split, its softmax temperature and
abstain threshold are calibrated on the validation split (without one, on a held-out fifth of
the training split) with the family's calibration rule, and it is scored once on the test
split: in-scope accuracy (an abstention on an in-scope query is an error), out-of-scope recall
and precision, macro-F1 over the in-scope labels, the whole threshold curve on validation and
test, training time and peak memory, the model file's size, and single-threaded per-decision
latency.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import dataclass, field
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

CLINC_KEYS = ("train", "val", "test")
CLINC_OOS_KEYS = {"oos_train": "train", "oos_val": "val", "oos_test": "test"}
SPLIT_SUFFIXES = (".jsonl", ".csv")
FAMILIES = ("fast", "accurate")
OOS = "oos"
TARGETS = {"fast": (0.92, 0.50), "accurate": (0.96, 0.60)}
"""The goals per family on CLINC150's test split: (minimum in-scope accuracy, minimum
out-of-scope recall) at the threshold calibrated on validation."""
LATENCY_QUERIES = 1000
LATENCY_WARMUP = 50
PUBLISHED_SUFFIXES = {".md", ".csv", ".tsv", ".json"}
PUBLISHED_MAX_CHARS = 1_000_000
CURVE_MARKS = tuple(round(t, 2) for t in np.arange(0.0, 1.0, 0.1))
HELP = "routing accuracy per model family (CLINC150, or any labelled data set)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        help="a CLINC150-shaped JSON file (data_full.json) or a folder with train/val/test files",
    )
    parser.add_argument("--train", type=Path, help="training examples (.jsonl or .csv)")
    parser.add_argument("--val", type=Path, help="validation examples (optional)")
    parser.add_argument("--test", type=Path, help="test examples (.jsonl or .csv)")
    parser.add_argument("--name", help="the data set's name in the report (default: its folder)")
    parser.add_argument("--oos-label", default=OOS, help="the label of out-of-scope rows")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    common.add_out(parser)
    parser.add_argument("--seed", type=int, default=0)


class DataError(ValueError):
    """The data set is missing or not in a shape this suite reads; the message says why."""


@dataclass
class Dataset:
    """A labelled data set split into train, optional validation, and test."""

    name: str
    source: str
    train: Any
    val: Any | None
    test: Any
    oos_label: str
    folder: Path | None = None
    """Where published results may lie beside the data (README, Markdown, CSV, JSON)."""
    layout: str = ""
    paths: list[Path] = field(default_factory=list)
    """The files the splits were read from (never listed as published results)."""
    notes: list[str] = field(default_factory=list)

    def splits(self) -> dict[str, Any]:
        found = {"train": self.train, "test": self.test}
        if self.val is not None:
            found["val"] = self.val
        return found

    def counts(self) -> dict[str, dict[str, int]]:
        """Per split: rows, in-scope rows, out-of-scope rows."""
        out = {}
        for split, examples in self.splits().items():
            oos = sum(1 for label in examples.labels if label == self.oos_label)
            out[split] = {"rows": len(examples), "inscope": len(examples) - oos, "oos": oos}
        return out

    def intents(self) -> list[str]:
        return sorted(set(self.train.labels) - {self.oos_label})

    def has_oos_test(self) -> bool:
        return any(label == self.oos_label for label in self.test.labels)


def _pairs(path: Path, key: str, rows: Any) -> tuple[list[str], list[str]]:
    if not isinstance(rows, list):
        raise DataError(f"{path}: {key!r} must be a list of [text, label] pairs")
    texts, labels = [], []
    for i, row in enumerate(rows):
        if (
            not isinstance(row, list | tuple)
            or len(row) != 2
            or not all(isinstance(x, str) for x in row)
        ):
            raise DataError(f"{path}: {key}[{i}]: expected a [text, label] pair of strings")
        if not row[0].strip() or not row[1]:
            raise DataError(f"{path}: {key}[{i}]: the text and the label must not be empty")
        texts.append(row[0])
        labels.append(row[1])
    return texts, labels


def load_clinc_json(path: Path, oos_label: str = OOS) -> dict[str, Any]:
    """``{"train", "test"[, "val"]}`` Examples from a CLINC150-shaped JSON file."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read it as JSON: {exc}") from None
    known = (*CLINC_KEYS, *CLINC_OOS_KEYS)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with keys among {list(known)}")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise DataError(f"{path}: unexpected keys {unknown} (expected keys among {list(known)})")
    missing = [key for key in ("train", "test") if key not in data]
    if missing:
        raise DataError(f"{path}: missing keys {missing}")
    splits: dict[str, tuple[list[str], list[str]]] = {}
    for key in known:
        if key not in data:
            continue
        texts, labels = _pairs(path, key, data[key])
        if key in CLINC_OOS_KEYS:
            labels = [oos_label] * len(labels)  # the oos_* keys hold out-of-scope rows
        split = CLINC_OOS_KEYS.get(key, key)
        old_texts, old_labels = splits.get(split, ([], []))
        splits[split] = (old_texts + texts, old_labels + labels)
    if "val" in splits and not splits["val"][0]:
        del splits["val"]
    return {split: api.Examples(*pair) for split, pair in splits.items()}


def _read_split(path: Path) -> Any:
    from router.routing.examples import DatasetError, read_examples

    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return read_examples(path)
    except DatasetError as exc:
        raise DataError(str(exc)) from None


def _split_file(folder: Path, names: tuple[str, ...]) -> Path | None:
    found = [
        folder / f"{n}{s}" for n in names for s in SPLIT_SUFFIXES if (folder / f"{n}{s}").is_file()
    ]
    if len(found) > 1:
        raise DataError(f"{folder}: more than one file for one split: {[p.name for p in found]}")
    return found[0] if found else None


def load_dataset(args: argparse.Namespace) -> Dataset:
    """The data set the arguments name (``--data`` or ``--train``/``--test``)."""
    oos_label = args.oos_label
    files = [args.train, args.val, args.test]
    if args.data is not None and any(p is not None for p in files):
        raise DataError("give --data, or --train and --test (and --val), not both")
    if args.data is None:
        if args.train is None or args.test is None:
            raise DataError("give --data PATH, or --train FILE and --test FILE")
        train, test = _read_split(args.train), _read_split(args.test)
        val = _read_split(args.val) if args.val is not None else None
        folder = args.train.resolve().parent
        source = ", ".join(f"`{p}`" for p in files if p is not None)
        dataset = _dataset(
            args.name or folder.name, source, "split files", train, val, test, oos_label, folder
        )
        dataset.paths = [p for p in files if p is not None]
        return dataset
    path: Path = args.data
    if path.is_dir():
        train_path = _split_file(path, ("train",))
        test_path = _split_file(path, ("test",))
        val_path = _split_file(path, ("val", "validation", "dev"))
        if train_path is None or test_path is None:
            raise DataError(
                f"{path}: expected train and test files ({', '.join(SPLIT_SUFFIXES)}) in it"
            )
        train, test = _read_split(train_path), _read_split(test_path)
        val = _read_split(val_path) if val_path is not None else None
        source = ", ".join(f"`{p}`" for p in (train_path, val_path, test_path) if p is not None)
        name = args.name or path.resolve().name
        dataset = _dataset(
            name, source, "a folder of split files", train, val, test, oos_label, path
        )
        dataset.paths = [p for p in (train_path, val_path, test_path) if p is not None]
        return dataset
    splits = load_clinc_json(path, oos_label)
    folder = path.resolve().parent
    name = args.name or folder.name
    layout = "CLINC150-shaped JSON"
    val = splits.get("val")
    dataset = _dataset(
        name, f"`{path}`", layout, splits["train"], val, splits["test"], oos_label, folder
    )
    dataset.paths = [path]
    return dataset


def _dataset(
    name: str,
    source: str,
    layout: str,
    train: Any,
    val: Any | None,
    test: Any,
    oos_label: str,
    folder: Path | None,
) -> Dataset:
    if not len(train) or not len(test):
        raise DataError(f"{source}: the train and test splits must not be empty")
    dataset = Dataset(name, source, train, val, test, oos_label, folder, layout)
    in_scope = dataset.intents()
    if len(in_scope) < 2:
        raise DataError(f"{source}: the training split needs at least two in-scope labels")
    unseen = sorted(set(test.labels) - set(train.labels) - {oos_label})
    if unseen:
        dataset.notes.append(
            f"{len(unseen)} test label(s) never seen in training count as errors: "
            + ", ".join(f"`{label}`" for label in unseen[:10])
            + (" ..." if len(unseen) > 10 else "")
        )
    if val is not None:
        unseen_val = sorted(set(val.labels) - set(train.labels))
        if unseen_val:
            raise DataError(f"{source}: validation labels never seen in training: {unseen_val}")
    return dataset


def published_files(folder: Path, data_paths: set[Path]) -> list[dict[str, Any]]:
    """README*, *.md, *.csv, *.tsv and *.json beside the data (not the data files, nor
    data*.json)."""
    found = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.resolve() in data_paths:
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
        "native_head": getattr(classifier, "native_head", None) is not None,
    }


def targets_for(family: str, with_oos: bool) -> dict[str, float | None]:
    min_acc, min_recall = TARGETS[family]
    return {"inscope_accuracy": min_acc, "oos_recall": min_recall if with_oos else None}


def meets(metrics: dict[str, float], targets: dict[str, float | None]) -> bool:
    return all(metrics.get(key, 0.0) >= goal for key, goal in targets.items() if goal is not None)


def best_meeting(
    curve: list[dict[str, float]], targets: dict[str, float | None]
) -> dict[str, float] | None:
    """The curve point meeting ``targets`` with the highest accuracy + recall."""
    ok = [p for p in curve if meets(p, targets)]
    if not ok:
        return None
    return max(ok, key=lambda p: p.get("inscope_accuracy", 0.0) + p.get("oos_recall", 0.0))


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_family(family: str, dataset: Dataset, seed: int) -> dict[str, Any]:
    train, val, test = dataset.train, dataset.val, dataset.test
    where = f"{len(val)} validation examples" if val is not None else "a held-out fifth of train"
    say(f"[{family}] training on {len(train)} examples, calibrating on {where}")
    wall = time.perf_counter()
    trained = api.train_model(
        train,
        family=family,
        heldout=val,
        oos_label=dataset.oos_label,
        seed=seed,
        progress=lambda m: say(f"[{family}] {m}"),
    )
    wall = time.perf_counter() - wall
    peak = peak_rss_mib()
    classifier = api.Classifier(trained.model_bytes, f"{dataset.name}-{family}")
    labels = classifier.labels
    threshold = trained.card.threshold
    say(f"[{family}] scoring {len(test)} test examples once (threshold {threshold:.4f})")
    probs = api.predict_texts(classifier, test.texts)
    metrics = api.evaluate(probs, test.labels, labels, dataset.oos_label, threshold)
    curve = api.threshold_curve(probs, test.labels, labels, dataset.oos_label)
    rng = np.random.default_rng(seed)
    count = min(LATENCY_QUERIES, len(test))
    sample = [test.texts[i] for i in rng.permutation(len(test))[:count]]
    say(f"[{family}] timing {count} single decisions")
    latency = decision_latency(classifier, sample)
    targets = targets_for(family, dataset.has_oos_test())
    calibration = trained.calibration
    return {
        "family": family,
        "labels": len(labels),
        "train_examples": int(trained.card.metrics.get("train_examples", len(train))),
        "heldout_examples": len(trained.heldout),
        "test_examples": len(test),
        "train_seconds": round(trained.seconds, 2),
        "train_wall_seconds": round(wall, 2),
        "peak_rss_mib": round(peak, 1),
        "model_bytes": len(trained.model_bytes),
        "temperature": float(trained.card.extra.get("plexus.temperature", "nan")),
        "threshold": threshold,
        "calibration": {**calibration.to_dict(), "curve": calibration.curve},
        "heldout_metrics": trained.card.metrics,
        "test_metrics": metrics,
        "targets": targets,
        "calibrated_meets_targets": meets(metrics, targets),
        "best_point_meeting_targets": best_meeting(curve, targets),
        "latency": latency,
        "curve": curve,
    }


def _goal(targets: dict[str, float | None]) -> str:
    goal = f"in-scope ≥ {pct(targets['inscope_accuracy'])}"
    if targets.get("oos_recall") is not None:
        goal += f", oos recall ≥ {pct(targets['oos_recall'])}"
    return goal


def _best_row(f: dict[str, Any]) -> dict[str, Any]:
    best = f["best_point_meeting_targets"]
    goal = _goal(f["targets"])
    if best is None:
        return {"family": f["family"], "goal": goal, "threshold": "none on the curve"}
    return {"family": f["family"], "goal": goal, **best, "threshold": f"{best['threshold']:.2f}"}


def _curve_rows(f: dict[str, Any]) -> list[dict[str, Any]]:
    """The validation curve every 0.1, with the point the rule landed on in bold."""
    rows = [
        {"family": f["family"], **p}
        for p in f["calibration"]["curve"]
        if any(abs(p["threshold"] - m) < 0.005 for m in CURVE_MARKS)
    ]
    landed = {**f["calibration"]["heldout"], "family": f"**{f['family']}: calibrated**"}
    return sorted([*rows, landed], key=lambda r: (r["threshold"], "calibrated" in r["family"]))


def _published(published: dict[str, Any]) -> str:
    if not published["files"]:
        return (
            f"No README, Markdown, CSV, TSV or JSON (other than data*.json) files were found in "
            f"`{published['folder']}`, so no published results are shown here."
        )
    return "\n\n".join(
        f"### {item['name']}{' (truncated)' if item['truncated'] else ''}\n\n{fence(item['text'])}"
        for item in published["files"]
    )


def to_markdown(report: dict[str, Any]) -> str:
    d, families = report["dataset"], report["families"]
    with_oos = d["test_oos"] > 0
    quality = [("in-scope acc", percent("inscope_accuracy"))]
    if with_oos:
        quality += [
            ("oos recall", percent("oos_recall")),
            ("oos precision", percent("oos_precision")),
        ]
    results = table(
        [{**f, **f["test_metrics"]} for f in families],
        [
            ("family", "family"),
            ("threshold", num("threshold", 3)),
            *quality,
            ("macro-F1", percent("macro_f1")),
            ("train s", num("train_seconds", 1)),
            ("peak MiB", num("peak_rss_mib")),
            ("model MB", lambda f: f"{f['model_bytes'] / 1e6:.2f}"),
            ("p50 µs", num("latency.p50_us", 1)),
            ("p99 µs", num("latency.p99_us", 1)),
            ("meets goals", lambda f: "yes" if f["calibrated_meets_targets"] else "no"),
        ],
    )
    goals = table(
        families,
        [("family", "family"), ("goal on test", lambda f: _goal(f["targets"]))],
    )
    landed = table(
        [{**f, **f["calibration"]["heldout"], "rule": f["calibration"]["how"]} for f in families],
        [
            ("family", "family"),
            ("rule (where it landed)", "rule"),
            ("threshold", num("threshold", 3)),
            ("temperature", num("temperature", 2)),
            *quality,
            ("rule met", lambda f: "yes" if f["calibration"]["met"] else "no"),
        ],
    )
    val_curve = table(
        [row for f in families for row in _curve_rows(f)],
        [("family", "family"), ("threshold", num("threshold", 3)), *quality],
    )
    best = table(
        [_best_row(f) for f in families],
        [("family", "family"), ("goal", "goal"), ("threshold", "threshold"), *quality],
    )
    latency = table(
        families,
        [
            ("family", "family"),
            ("queries", "latency.queries"),
            ("featurize p50 µs", num("latency.featurize_p50_us", 1)),
            ("encode p50 µs", num("latency.encode_p50_us", 1)),
            ("classify p50 µs", num("latency.classify_p50_us", 1)),
            ("total p50 µs", num("latency.p50_us", 1)),
            ("total p99 µs", num("latency.p99_us", 1)),
            ("native featurizer", "latency.native_featurizer"),
            ("native head", "latency.native_head"),
        ],
    )
    test_curve = table(
        [
            {"family": f["family"], **point}
            for f in families
            for point in f["curve"]
            if any(abs(point["threshold"] - m) < 0.005 for m in CURVE_MARKS)
        ],
        [("family", "family"), ("threshold", num("threshold", 2)), *quality]
        + [("macro-F1", percent("macro_f1"))],
    )
    steps = "featurize + classify"
    if any(f["family"] == "accurate" for f in families):
        steps = "featurize + encode (accurate) + classify"
    queries = max((f["latency"]["queries"] for f in families), default=0)
    shown = ", ".join(
        f"{key} {d['splits'][key]['inscope']:,} in-scope + {d['splits'][key]['oos']:,} out-of-scope"
        for key in ("train", "val", "test")
        if key in d["splits"]
    )
    calibrated_on = (
        "the validation split"
        if "val" in d["splits"]
        else "a stratified fifth of the training split held out (no validation split given)"
    )
    notes = [
        f"Data: {d['source']} ({d['layout']}): {d['intents']} in-scope labels; {shown}; "
        f"out-of-scope label `{d['oos_label']}`; seed {report['seed']}.",
        f"Each family trains on the training split, fits its softmax temperature and calibrates "
        f"its abstain threshold on {calibrated_on}, and is scored once on the test split at that "
        "threshold. In-scope accuracy counts an abstention on an in-scope query as an error; "
        "macro-F1 averages the in-scope labels (an abstention is a miss, not a class).",
        f"Latency: one query at a time on one thread ({steps}), over {queries} test queries "
        f"(after a warm-up pass over up to {LATENCY_WARMUP} of them). Peak MiB is this "
        "process's peak resident memory once the family was trained (it includes the data and "
        "any family run before).",
        *d.get("notes", []),
    ]
    if not with_oos:
        notes.append(
            "The test split has no out-of-scope rows: out-of-scope recall and precision are not "
            "measured, and the plot shows accuracy and the share answered against the threshold."
        )
    sections = [
        ("Results at the calibrated threshold (test split, scored once)", results),
        ("Goals", goals),
        ("Calibration: where each family's rule landed (validation)", landed),
        ("Calibration curve (validation, every 0.1, with the calibrated point)", val_curve),
        ("Best threshold meeting the goals (chosen on the test curve, so optimistic)", best),
        ("Decision latency breakdown", latency),
        (
            "Threshold curve (test split, every 0.1)",
            f"{test_curve}\n\nPlot: `accuracy.png`. Run time {report['seconds']} s.",
        ),
        ("Published results (from the data set's folder)", _published(report["published"])),
    ]
    return document(f"Plexus accuracy on {d['name']}", report, notes, sections)


COLORS = {"fast": "tab:blue", "accurate": "tab:orange"}


def plot(report: dict[str, Any], plt: Any) -> Any:
    """With out-of-scope test rows: in-scope accuracy against out-of-scope recall over the
    thresholds (test solid, validation dashed, the calibrated point starred); without them:
    accuracy and the share of queries answered against the threshold."""
    if report["dataset"]["test_oos"] > 0:
        return _plot_tradeoff(report, plt)
    return _plot_answered(report, plt)


def _plot_tradeoff(report: dict[str, Any], plt: Any) -> Any:
    fig, ax = plt.subplots(figsize=(7, 5.5))
    for f in report["families"]:
        color = COLORS.get(f["family"])
        for points, style, what in (
            (f["curve"], "-", "test"),
            (f["calibration"]["curve"], "--", "validation"),
        ):
            points = [p for p in points if "oos_recall" in p and "inscope_accuracy" in p]
            if points:
                ax.plot(
                    [p["oos_recall"] for p in points],
                    [p["inscope_accuracy"] for p in points],
                    style,
                    color=color,
                    linewidth=1.2 if what == "test" else 0.9,
                    label=f"{f['family']} {what} (thresholds 0–0.99)",
                )
        for m, marker, what in (
            (f["test_metrics"], "*", "test"),
            (f["calibration"]["heldout"], "o", "validation"),
        ):
            if "oos_recall" in m and "inscope_accuracy" in m:
                ax.plot(
                    [m["oos_recall"]],
                    [m["inscope_accuracy"]],
                    marker,
                    markersize=13 if marker == "*" else 7,
                    color=color,
                    label=f"{f['family']} calibrated {f['threshold']:.3f} ({what})",
                )
        goal = f["targets"]
        ax.axhline(goal["inscope_accuracy"], color=color, linestyle=":", linewidth=1)
        if goal.get("oos_recall") is not None:
            ax.axvline(goal["oos_recall"], color=color, linestyle=":", linewidth=1)
            ax.fill_between(
                [goal["oos_recall"], 1.0], goal["inscope_accuracy"], 1.0, color=color, alpha=0.07
            )
    ax.set_xlabel("out-of-scope recall")
    ax.set_ylabel("in-scope accuracy (abstention = error)")
    ax.set_xlim(0, 1.01)
    ax.set_title(
        f"{report['dataset']['name']}: in-scope accuracy vs out-of-scope recall\n"
        "(dotted lines / shaded: the family's goals)"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return fig


def _plot_answered(report: dict[str, Any], plt: Any) -> Any:
    fig, ax = plt.subplots(figsize=(7, 5.5))
    for f in report["families"]:
        color = COLORS.get(f["family"])
        points = [p for p in f["curve"] if "inscope_accuracy" in p]
        thresholds = [p["threshold"] for p in points]
        ax.plot(
            thresholds,
            [p["inscope_accuracy"] for p in points],
            "-",
            color=color,
            label=f"{f['family']} accuracy (abstention = error)",
        )
        ax.plot(
            thresholds,
            [p.get("answered", float("nan")) for p in points],
            "--",
            color=color,
            label=f"{f['family']} share answered",
        )
        ax.axvline(f["threshold"], color=color, linestyle=":", linewidth=1)
    ax.set_xlabel("abstain threshold")
    ax.set_ylabel("share of test queries")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(
        f"{report['dataset']['name']} test: accuracy and answers vs threshold\n"
        "(dotted: the calibrated threshold)"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return fig


def main(args: argparse.Namespace) -> int:
    families = list(dict.fromkeys(args.families))
    try:
        dataset = load_dataset(args)
    except DataError as exc:
        print(f"plexus bench accuracy: error: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    results = [run_family(family, dataset, args.seed) for family in families]
    counts = dataset.counts()
    data_paths = {p.resolve() for p in dataset.paths}
    folder = dataset.folder.resolve() if dataset.folder is not None else None
    report = {
        "suite": "accuracy",
        "machine": machine_facts(),
        "seed": args.seed,
        "dataset": {
            "name": dataset.name,
            "source": dataset.source,
            "layout": dataset.layout,
            "oos_label": dataset.oos_label,
            "intents": len(dataset.intents()),
            "splits": counts,
            "test_oos": counts["test"]["oos"],
            "notes": dataset.notes,
        },
        "families": results,
        "published": {
            "folder": str(folder) if folder is not None else "",
            "files": published_files(folder, data_paths) if folder is not None else [],
        },
        "seconds": round(time.monotonic() - started, 1),
    }
    publish(Path(args.out), "accuracy", report, to_markdown(report), plot)
    return 0
