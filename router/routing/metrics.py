"""The abstain rule and the metrics a routing model is judged by.

:func:`abstains` decides one query (serving); :func:`decide_rows` is the same rule over a batch
of probability rows (evaluation, calibration). Both are written from the same three conditions,
and a property test holds them to the same answer on every row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from router.routing.encoder import bulk_encoder
from router.routing.model import Classifier


def abstains(confidence: float | None, oos_prob: float, threshold: float) -> bool:
    """The abstain rule for one decision.

    ``confidence`` is the best in-scope label's probability, or None when no in-scope label may
    be chosen; ``oos_prob`` the out-of-scope label's probability (0.0 when the model has none).
    Abstain when there is no in-scope label, when the best one is below ``threshold``, or when
    out-of-scope is strictly more probable than it.
    """
    return confidence is None or confidence < threshold or oos_prob > confidence


@dataclass
class Decisions:
    """Per-example decisions at one threshold: predicted label (or the oos label) per row."""

    predicted: list[str]
    abstained: np.ndarray


def decide_rows(
    probs: np.ndarray, labels: Sequence[str], oos_label: str, threshold: float
) -> Decisions:
    """:func:`abstains` on every row of ``probs`` (``[rows, labels]``); a row that does not
    abstain goes to its most probable in-scope label (the first of equals).

    Probabilities are compared in float64, as the scalar form compares Python floats.
    """
    probs = np.asarray(probs, dtype=np.float64)
    rows = probs.shape[0]
    in_scope = np.array([label != oos_label for label in labels], dtype=bool)
    if not in_scope.any():  # confidence is None on every row
        return Decisions([oos_label] * rows, np.ones(rows, dtype=bool))
    masked = np.where(in_scope[None, :], probs, -np.inf)
    top = masked.argmax(axis=1)
    confidence = masked[np.arange(rows), top]
    oos_prob = probs[:, list(labels).index(oos_label)] if oos_label in labels else np.zeros(rows)
    abstained = (confidence < threshold) | (oos_prob > confidence)
    predicted = [oos_label if a else labels[i] for i, a in zip(top, abstained, strict=True)]
    return Decisions(predicted, abstained)


def macro_f1(
    truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str] | None = None
) -> float:
    """The unweighted mean F1 over ``labels`` (default: every label in ``truth`` or
    ``predicted``); 0 for no rows or no labels.

    Equal to scikit-learn's ``f1_score(truth, predicted, labels=labels, average="macro",
    zero_division=0)``: a prediction of a label outside ``labels`` is still a miss of the true
    label, it only does not count as a class of its own.
    """
    if len(truth) == 0:
        return 0.0
    names, codes = np.unique(
        np.array([*truth, *predicted], dtype=object).astype(str), return_inverse=True
    )
    true_codes, predicted_codes = codes[: len(truth)], codes[len(truth) :]
    hits = np.bincount(true_codes[true_codes == predicted_codes], minlength=len(names))
    counted = np.bincount(true_codes, minlength=len(names)) + np.bincount(
        predicted_codes, minlength=len(names)
    )
    scores = np.divide(2 * hits, counted, out=np.zeros(len(names)), where=counted > 0)
    if labels is None:
        return float(np.mean(scores))  # 2tp / (2tp + fp + fn); never 0/0 here
    if len(labels) == 0:
        return 0.0
    position = {name: i for i, name in enumerate(names)}
    return float(np.mean([scores[position[str(x)]] if str(x) in position else 0.0 for x in labels]))


def evaluate(
    probs: np.ndarray, truth: Sequence[str], labels: Sequence[str], oos_label: str, threshold: float
) -> dict[str, float]:
    """In-scope accuracy (an abstention is an error), out-of-scope recall/precision, macro-F1,
    and the share of rows answered (not abstained).

    Macro-F1 is over the in-scope labels of ``truth``: an abstention on an in-scope query is a
    miss of its label and an out-of-scope query routed to a label a false alarm of that label,
    but abstaining is not a class whose F1 is averaged in.
    """
    result = decide_rows(probs, labels, oos_label, threshold)
    truth_arr = np.array(truth, dtype=object)
    pred_arr = np.array(result.predicted, dtype=object)
    is_oos = truth_arr == oos_label
    metrics: dict[str, float] = {"threshold": float(threshold), "examples": float(len(truth))}
    if len(truth):
        metrics["answered"] = float(1.0 - np.mean(result.abstained))
    if (~is_oos).any():
        metrics["inscope_accuracy"] = float(np.mean(pred_arr[~is_oos] == truth_arr[~is_oos]))
    if is_oos.any():
        metrics["oos_recall"] = float(np.mean(result.abstained[is_oos]))
        metrics["oos_precision"] = (
            float(np.mean(is_oos[result.abstained])) if result.abstained.any() else 0.0
        )
    in_scope_truth = sorted({str(label) for label in truth if label != oos_label})
    metrics["macro_f1"] = macro_f1(truth, result.predicted, in_scope_truth)
    return metrics


def threshold_curve(
    probs: np.ndarray, truth: Sequence[str], labels: Sequence[str], oos_label: str
) -> list[dict[str, float]]:
    """:func:`evaluate` at 100 thresholds from 0 to 0.99."""
    return [evaluate(probs, truth, labels, oos_label, t) for t in np.linspace(0, 0.99, 100)]


@dataclass
class OperatingPoints:
    """In-scope accuracy and out-of-scope recall at many thresholds, from one pass over rows.

    ``inscope_accuracy`` is NaN everywhere when ``truth`` has no in-scope rows, and
    ``oos_recall`` when it has no out-of-scope rows.
    """

    thresholds: np.ndarray
    inscope_accuracy: np.ndarray
    oos_recall: np.ndarray


def operating_points(
    probs: np.ndarray,
    truth: Sequence[str],
    labels: Sequence[str],
    oos_label: str,
    thresholds: np.ndarray,
) -> OperatingPoints:
    """What :func:`evaluate` would report for in-scope accuracy and out-of-scope recall at
    each of ``thresholds``, the same rule (:func:`decide_rows`) counted with sorted searches
    instead of one evaluation per threshold."""
    probs = np.asarray(probs, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    rows = probs.shape[0]
    truth_arr = np.array(truth, dtype=object)
    is_oos = truth_arr == oos_label
    n_in, n_oos = int((~is_oos).sum()), int(is_oos.sum())
    in_scope = np.array([label != oos_label for label in labels], dtype=bool)
    nan = np.full(len(thresholds), np.nan)
    if not in_scope.any():  # every row abstains at every threshold
        none, every = np.zeros(len(thresholds)), np.ones(len(thresholds))
        return OperatingPoints(thresholds, none if n_in else nan, every if n_oos else nan)
    masked = np.where(in_scope[None, :], probs, -np.inf)
    top = masked.argmax(axis=1)
    confidence = masked[np.arange(rows), top]
    oos_prob = probs[:, list(labels).index(oos_label)] if oos_label in labels else np.zeros(rows)
    blocked = oos_prob > confidence  # abstains at any threshold
    # a row abstains at threshold t exactly when blocked or confidence < t
    correct = np.array([labels[i] for i in top], dtype=object) == truth_arr
    accuracy = nan
    if n_in:
        kept = np.sort(confidence[~is_oos & correct & ~blocked])
        accuracy = (len(kept) - np.searchsorted(kept, thresholds, side="left")) / n_in
    recall = nan
    if n_oos:
        open_oos = np.sort(confidence[is_oos & ~blocked])
        caught = int((is_oos & blocked).sum()) + np.searchsorted(open_oos, thresholds, side="left")
        recall = caught / n_oos
    return OperatingPoints(thresholds, accuracy, recall)


def predict_texts(
    classifier: Classifier,
    texts: Sequence[str],
    embeddings: np.ndarray | None = None,
    batch: int = 256,
) -> np.ndarray:
    """Probabilities for many texts, in batches (offline use: training, evaluation, swaps)."""
    if classifier.uses_encoder and embeddings is None:
        embeddings = bulk_encoder().encode(texts)
    out = []
    for start in range(0, len(texts), batch):
        ids = classifier.featurizer.featurize_batch(texts[start : start + batch])
        emb = embeddings[start : start + batch] if embeddings is not None else None
        out.append(classifier.predict(ids, emb)[0])
    return np.concatenate(out) if out else np.zeros((0, len(classifier.labels)), np.float32)
