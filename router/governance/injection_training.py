"""Training the prompt-injection guard: a two-label routing model with an FPR-calibrated threshold.

The guard is trained by :func:`router.routing.training.train_model` (same families, featurizer,
head and ONNX contract as routing models) on labels ``benign`` and ``injection``. Only the
operating point differs: instead of an abstain threshold, :func:`calibrate_fpr_threshold` picks
the threshold on ``P(injection)`` that keeps the false-positive rate on benign validation
prompts within a target (1% by default). The file records the threshold in
``plexus.threshold`` and the validation metrics (``validation_fpr``, ``validation_recall``,
``validation_f1``, ...) in ``plexus.metrics``.

    python -m router.governance.injection_training --data ../shared/data/injection \\
        --out router/governance/models/injection-guard.onnx [--family fast] [--seed 0]

reads ``train.csv`` (training) and ``validation.csv`` (calibration), and, when present,
evaluates on ``test.csv`` and records those figures as ``test_*`` metrics.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import helper
from sklearn.metrics import roc_auc_score

from router.files import Progress, atomic_write
from router.governance.injection import BENIGN, INJECTION, LABELS, InjectionGuard
from router.routing.encoder import bulk_encoder
from router.routing.examples import DatasetError, Examples, read_examples
from router.routing.featurizer import FeaturizerParams
from router.routing.model import Classifier, ModelCard
from router.routing.training import TrainedModel, train_model

DEFAULT_TARGET_FPR = 0.01
GUARD_REGULARIZATION = 3.0
"""Inverse L2 strength of the head (scikit-learn's ``C``), chosen on the validation split."""

CSV_LABELS = {"0": BENIGN, "1": INJECTION, BENIGN: BENIGN, INJECTION: INJECTION}
"""Labels a guard CSV may use: the data set's 0/1, or the model's own names."""


GUARD_BUCKETS_LOG2 = 17


def guard_featurizer(seed: int = 0, buckets_log2: int = GUARD_BUCKETS_LOG2) -> FeaturizerParams:
    """The guard's n-grams: word unigrams and bigrams plus character 4-6-grams.

    Longer character n-grams than routing's 3-5 (chosen on the validation split): attacks are
    phrased around multi-word cues ("your initialization", "ignore previous"), and 4-6-grams
    keep more of them while still catching leetspeak and spaced-out spellings. 2^17 buckets
    keep the file under 2 MB and did as well on validation as 2^18 and 2^19.
    """
    return FeaturizerParams(
        buckets_log2=buckets_log2, seed=seed, char_ngram_min=4, char_ngram_max=6, word_bigrams=True
    )


def load_injection_csv(path: Path) -> Examples:
    """A ``text,label`` CSV with labels 0 (benign) / 1 (injection), as ``benign``/``injection``."""
    examples = read_examples(Path(path))
    labels = []
    for row, label in enumerate(examples.labels, start=1):
        mapped = CSV_LABELS.get(label.strip().lower())
        if mapped is None:
            raise DatasetError(
                f"{path}: example {row}: label {label!r} is not 0/1 or {BENIGN}/{INJECTION}"
            )
        labels.append(mapped)
    return Examples(examples.texts, labels)


def calibrate_fpr_threshold(
    scores: np.ndarray, is_injection: np.ndarray, target_fpr: float = DEFAULT_TARGET_FPR
) -> float:
    """The lowest threshold on ``P(injection)`` whose benign false-positive rate is within target.

    A text is flagged when ``score >= threshold``, so the FPR on the ``n`` benign rows only
    changes at their scores. With ``k = floor(target_fpr * n)`` false positives allowed, the
    threshold is the smallest float32 value above the ``(k+1)``-th highest benign score: every
    benign row above that score is flagged (at most ``k``), that one and every row below it are
    not, and no lower threshold has an FPR within target. It is a float32 value, so comparing
    float32 or float64 scores against it gives the same answer.

    Ties are never split: rows with equal scores fall on the same side, so when the ``k``-th and
    ``(k+1)``-th highest benign scores are equal the threshold goes above both and the achieved
    FPR is below the target. When the target cannot be met (more than ``k`` benign rows score
    exactly 1.0, the top of the contract's range), the threshold is 1.0: only scores of 1.0 are
    flagged and the achieved FPR, recorded in the metrics, exceeds the target. With
    ``target_fpr >= 1`` the threshold is 0.0 (everything is flagged).
    """
    scores = np.asarray(scores, dtype=np.float32)
    is_injection = np.asarray(is_injection, dtype=bool)
    if scores.shape != is_injection.shape or scores.ndim != 1:
        raise ValueError("scores and is_injection must be 1-D arrays of the same length")
    if not 0.0 <= target_fpr <= 1.0:
        raise ValueError(f"target_fpr must be in [0, 1], not {target_fpr}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    benign = np.sort(scores[~is_injection])[::-1]  # highest first
    if len(benign) == 0:
        raise DatasetError("calibration needs benign validation examples")
    allowed = math.floor(target_fpr * len(benign) + 1e-9)
    if allowed >= len(benign):
        return 0.0
    boundary = benign[allowed]  # the highest benign score that must not be flagged
    above = np.nextafter(boundary, np.float32(np.inf), dtype=np.float32)
    return float(min(above, np.float32(1.0)))


def guard_metrics(
    scores: np.ndarray, is_injection: np.ndarray, threshold: float
) -> dict[str, float]:
    """Precision, recall, F1, benign false-positive rate and ROC AUC at ``threshold``."""
    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(is_injection, dtype=bool)
    flagged = scores >= threshold
    tp = int(np.sum(flagged & truth))
    fp = int(np.sum(flagged & ~truth))
    fn = int(np.sum(~flagged & truth))
    benign = int(np.sum(~truth))
    injections = int(np.sum(truth))
    metrics = {
        "threshold": float(threshold),
        "examples": float(len(truth)),
        "benign": float(benign),
        "injection": float(injections),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / injections if injections else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
        "fpr": fp / benign if benign else 0.0,
    }
    if benign and injections:
        metrics["roc_auc"] = float(roc_auc_score(truth, scores))
    return metrics


def evaluate_guard(
    guard: InjectionGuard,
    examples: Examples,
    *,
    embeddings: np.ndarray | None = None,
    threshold: float | None = None,
) -> dict[str, float]:
    """:func:`guard_metrics` of ``guard`` on labelled examples, at its own threshold unless
    ``threshold`` is given; ``embeddings`` (for the accurate family) are computed when absent."""
    truth = _is_injection(examples, "evaluation")
    if guard.uses_encoder and embeddings is None:
        embeddings = bulk_encoder().encode(examples.texts)
    scores = guard.scores(examples.texts, embeddings)
    return guard_metrics(scores, truth, guard.threshold if threshold is None else threshold)


def train_guard(
    train: Examples,
    validation: Examples,
    family: str = "fast",
    seed: int = 0,
    target_fpr: float = DEFAULT_TARGET_FPR,
    *,
    featurizer_params: FeaturizerParams | None = None,
    regularization: float = GUARD_REGULARIZATION,
    progress: Progress | None = None,
) -> TrainedModel:
    """Train on ``train``, calibrate the threshold on ``validation``, export one guard model.

    Deterministic under ``seed`` (weights, threshold and metrics; ``plexus.created_at`` is the
    time of training). ``heldout_probs`` of the result are the validation probabilities.
    """
    say = progress or (lambda _message: None)
    _is_injection(train, "training")
    is_injection = _is_injection(validation, "validation")
    trained = train_model(
        train,
        family=family,
        heldout=validation,
        featurizer_params=featurizer_params or guard_featurizer(seed),
        threshold=0.5,  # replaced below by the FPR calibration
        oos_label="",
        regularization=regularization,
        seed=seed,
        progress=say,
    )
    scores = trained.heldout_probs[:, trained.card.labels.index(INJECTION)]
    threshold = calibrate_fpr_threshold(scores, is_injection, target_fpr)
    measured = guard_metrics(scores, is_injection, threshold)
    met = measured["fpr"] <= target_fpr
    if not met:
        say(
            f"the target FPR {target_fpr} is unreachable on validation: threshold 1.0 "
            f"gives FPR {measured['fpr']:.4f}"
        )
    metrics = {f"validation_{name}": value for name, value in measured.items()}
    metrics |= {
        "target_fpr": float(target_fpr),
        "target_fpr_met": float(met),
        "train_examples": float(len(train)),
    }
    card = replace(
        trained.card,
        threshold=threshold,
        metrics=metrics,
        extra={"plexus.task": "injection-guard"},
    )
    return replace(trained, model_bytes=with_card(trained.model_bytes, card), card=card)


def with_card(model_bytes: bytes, card: ModelCard) -> bytes:
    """The same graph with ``card`` as its metadata."""
    model = onnx.load_from_string(model_bytes)
    helper.set_model_props(model, card.to_metadata())
    return model.SerializeToString()


def record_metrics(trained: TrainedModel, metrics: dict[str, float]) -> TrainedModel:
    """``trained`` with ``metrics`` added to the ones its file records."""
    card = replace(trained.card, metrics={**trained.card.metrics, **metrics})
    return replace(trained, model_bytes=with_card(trained.model_bytes, card), card=card)


def _is_injection(examples: Examples, what: str) -> np.ndarray:
    unknown = sorted(set(examples.labels) - set(LABELS))
    if unknown:
        raise DatasetError(f"{what} labels must be {list(LABELS)}; found {unknown}")
    truth = np.array([label == INJECTION for label in examples.labels], dtype=bool)
    if truth.all() or not truth.any():
        raise DatasetError(f"{what} examples need both {BENIGN} and {INJECTION} prompts")
    return truth


def _format(metrics: dict[str, float], keys: Sequence[str]) -> str:
    return ", ".join(f"{key}={metrics[key]:.4f}" for key in keys if key in metrics)


SHOWN = ("threshold", "precision", "recall", "f1", "fpr", "roc_auc")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m router.governance.injection_training",
        description="Train the prompt-injection guard (train.csv), calibrate its threshold "
        "(validation.csv) and, when test.csv is present, evaluate it there.",
    )
    parser.add_argument("--data", type=Path, required=True, help="folder with the split CSVs")
    parser.add_argument("--out", type=Path, required=True, help="the ONNX file to write")
    parser.add_argument("--family", choices=("fast", "accurate"), default="fast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-fpr", type=float, default=DEFAULT_TARGET_FPR)
    parser.add_argument("--buckets-log2", type=int, default=GUARD_BUCKETS_LOG2)
    parser.add_argument("--regularization", type=float, default=GUARD_REGULARIZATION)
    args = parser.parse_args(argv)

    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    try:
        train = load_injection_csv(args.data / "train.csv")
        validation = load_injection_csv(args.data / "validation.csv")
        test_path = args.data / "test.csv"
        test = load_injection_csv(test_path) if test_path.exists() else None
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    trained = train_guard(
        train,
        validation,
        family=args.family,
        seed=args.seed,
        target_fpr=args.target_fpr,
        featurizer_params=guard_featurizer(args.seed, args.buckets_log2),
        regularization=args.regularization,
        progress=say,
    )
    print(f"validation: {_format(trained.card.metrics, [f'validation_{k}' for k in SHOWN])}")
    if not trained.card.metrics["target_fpr_met"]:
        print(f"warning: the target FPR {args.target_fpr} is not met on validation")
    if test is not None:
        say(f"evaluating on {len(test)} test examples")
        guard = InjectionGuard(Classifier(trained.model_bytes, args.out.stem))
        measured = evaluate_guard(guard, test)
        print(f"test: {_format(measured, SHOWN)}")
        trained = record_metrics(trained, {f"test_{k}": v for k, v in measured.items()})
    atomic_write(args.out, trained.model_bytes)
    print(
        f"{args.family} guard -> {args.out} ({len(trained.model_bytes) / 1e6:.2f} MB), "
        f"trained in {trained.seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
