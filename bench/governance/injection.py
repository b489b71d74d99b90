"""Part 2: the shipped prompt-injection guard on the S-Labs test split, and its decision cost.

``InjectionGuard.default()`` at its own threshold (chosen on the validation split for a 1%
benign false-positive rate), scored by ``router.governance.injection_training.evaluate_guard``
on ``test.csv``; the ROC curve comes from the same scores. ``guard.score`` is timed one call
at a time on a 20-word prompt.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import api
from bench.report import markdown_table, percentiles_us, say

GOAL_F1, GOAL_FPR, GOAL_SCORE_US = 0.97, 0.01, 50.0
PROMPT = (
    "hi, is the 65 inch samsung qled tv still in stock at store 1432 or should I just order online"
)
WARMUP = 200


def test_file(path: Path) -> Path:
    """``--injection-data``: the folder (its ``test.csv``) or a CSV file."""
    return path / "test.csv" if path.is_dir() else path


def time_score(guard: Any, count: int) -> dict[str, Any]:
    for _ in range(WARMUP):
        guard.score(PROMPT)
    samples = np.empty(count, dtype=np.int64)
    for i in range(count):
        started = time.perf_counter_ns()
        guard.score(PROMPT)
        samples[i] = time.perf_counter_ns() - started
    stats = {k: round(v, 2) for k, v in percentiles_us(samples).items()}
    return {"calls": count, "words": len(PROMPT.split()), "warmup": WARMUP, **stats}


def _curve(truth: np.ndarray, scores: np.ndarray) -> dict[str, list[float]]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(truth, scores)
    return {"fpr": fpr.round(5).tolist(), "tpr": tpr.round(5).tolist()}


def run(folder: Path, *, timing_calls: int) -> dict[str, Any]:
    path = test_file(folder)
    if not path.is_file():
        say(f"[injection] {path} does not exist; the injection part is not run")
        return {"run": False, "reason": f"the test split `{path}` does not exist"}
    examples = api.load_injection_csv(path)
    guard = api.InjectionGuard.default()
    say(f"[injection] scoring {len(examples.texts)} test prompts (guard {guard.version})")
    metrics = api.evaluate_guard(guard, examples)
    scores = guard.scores(examples.texts)
    truth = np.array([label == "injection" for label in examples.labels])
    flagged = scores >= guard.threshold
    counts = {
        "tp": int(np.sum(flagged & truth)),
        "fp": int(np.sum(flagged & ~truth)),
        "fn": int(np.sum(~flagged & truth)),
        "tn": int(np.sum(~flagged & ~truth)),
    }
    say(f"[injection] timing guard.score, {timing_calls} calls")
    timing = time_score(guard, timing_calls)
    validation = {
        k.removeprefix("validation_"): v for k, v in guard.metrics.items() if "validation" in k
    }
    result: dict[str, Any] = {
        "run": True,
        "data": str(path),
        "guard": {
            "version": guard.version,
            "family": guard.card.family,
            "threshold": guard.threshold,
            "uses_encoder": guard.uses_encoder,
            "validation": validation,
        },
        "metrics": {k: round(v, 5) for k, v in metrics.items()},
        "counts": counts,
        "roc": _curve(truth, scores),
        "timing": timing,
    }
    m = result["metrics"]
    ok = m["f1"] >= GOAL_F1 and m["fpr"] <= GOAL_FPR
    result["goals"] = [
        {
            "goal": f"Injection F1 ≥ {GOAL_F1} with benign FPR ≤ {GOAL_FPR:.0%}",
            "measured": f"F1 {m['f1']:.3f}, FPR {m['fpr']:.2%}",
            "met": ok,
        },
        {
            "goal": f"Injection guard.score p99 ≤ {GOAL_SCORE_US:.0f} µs (20-word prompt, fast)",
            "measured": f"{timing['p99']:.1f} µs",
            "met": timing["p99"] <= GOAL_SCORE_US,
        },
    ]
    return result


def markdown(part: dict[str, Any]) -> str:
    if not part.get("run"):
        return f"Not run: {part['reason']}."
    g, m, c, t = part["guard"], part["metrics"], part["counts"], part["timing"]
    v = g["validation"]
    rows = [
        [
            "test (this run)",
            f"{g['threshold']:.4f}",
            f"{m['precision']:.4f}",
            f"{m['recall']:.4f}",
            f"{m['f1']:.4f}",
            f"{m['fpr']:.2%}",
            f"{m.get('roc_auc', float('nan')):.4f}",
            f"{c['tp']}/{c['fp']}/{c['fn']}/{c['tn']}",
        ]
    ]
    if v:
        rows.append(
            [
                "validation (from the model card)",
                f"{v.get('threshold', g['threshold']):.4f}",
                f"{v.get('precision', float('nan')):.4f}",
                f"{v.get('recall', float('nan')):.4f}",
                f"{v.get('f1', float('nan')):.4f}",
                f"{v.get('fpr', float('nan')):.2%}",
                f"{v.get('roc_auc', float('nan')):.4f}",
                "",
            ]
        )
    header = [
        "split",
        "threshold",
        "precision",
        "recall",
        "F1",
        "benign FPR",
        "ROC AUC",
        "tp/fp/fn/tn",
    ]
    return "\n".join(
        [
            f"Data: `{part['data']}` ({int(m['benign'])} benign, {int(m['injection'])} injection). "
            f"Guard: the shipped `{g['version']}` ({g['family']} family), flagged when "
            f"P(injection) ≥ its threshold, chosen on the validation split for ≤ 1% benign "
            "false positives; scored by `evaluate_guard`. ROC curve: `governance.png`.",
            "",
            markdown_table(header, rows),
            "",
            f"`guard.score` on one {t['words']}-word prompt, one call at a time after "
            f"{t['warmup']} warm-up calls ({t['calls']:,} calls): p50 {t['p50']:.1f} µs, "
            f"p99 {t['p99']:.1f} µs, p99.9 {t['p99_9']:.1f} µs.",
        ]
    )


def plot(part: dict[str, Any], ax: Any) -> None:
    if not part.get("run"):
        ax.text(0.5, 0.5, "injection: not run", ha="center", va="center")
        ax.set_axis_off()
        return
    m = part["metrics"]
    ax.plot(part["roc"]["fpr"], part["roc"]["tpr"], color="tab:blue", label="shipped guard")
    ax.plot([1e-3, 1], [1e-3, 1], color="gray", linestyle=":", linewidth=1)
    ax.scatter(
        [m["fpr"]],
        [m["recall"]],
        color="tab:red",
        zorder=3,
        label=f"threshold {part['guard']['threshold']:.3f}",
    )
    ax.axvline(GOAL_FPR, color="tab:red", linestyle=":", linewidth=1)
    ax.set_xscale("log")  # the operating region is near 1% FPR
    ax.set(xlim=(5e-4, 1.0), ylim=(0.0, 1.02))
    ax.set(xlabel="benign false-positive rate (log)", ylabel="injection recall (TPR)")
    ax.set_title(f"Injection ROC, test split (AUC {m.get('roc_auc', float('nan')):.4f})")
    ax.legend(fontsize=8, loc="lower right")
