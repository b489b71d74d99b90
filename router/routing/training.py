"""Training routing models from labelled examples and exporting them as self-describing ONNX.

Two families share one trained head (multinomial logistic regression, scikit-learn's lbfgs):

* ``fast``: hashed word/character n-grams only; a decision costs a few microseconds.
* ``accurate``: the same n-grams plus a frozen pretrained sentence encoder's embedding.

A held-out split (or a given validation set) calibrates the abstain threshold and provides the
metrics stored in the file. Training is deterministic under its seed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from router.files import Progress
from router.routing.encoder import SentenceEncoder, bulk_encoder, encode_in_batches
from router.routing.examples import DEFAULT_OOS_LABEL, DatasetError, Examples
from router.routing.featurizer import Featurizer, FeaturizerParams
from router.routing.metrics import decide_rows, evaluate, predict_texts, threshold_curve
from router.routing.model import Classifier, ModelCard, build_linear_onnx


def sparse_features(featurizer: Featurizer, texts: Sequence[str]) -> sp.csr_matrix:
    """Rows of hashed-id counts scaled by 1/sqrt(ids), the same scaling the ONNX graph applies."""
    rows = [featurizer.featurize(text) for text in texts]
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    scale = 1.0 / np.sqrt(np.maximum(lengths, 1))
    data = np.repeat(scale, lengths).astype(np.float32)
    matrix = sp.csr_matrix(
        (data, indices, indptr), shape=(len(rows), featurizer.params.buckets), dtype=np.float32
    )
    matrix.sum_duplicates()
    return matrix


EMBEDDING_SCALE = 2.0
"""Unit-norm embeddings are scaled up before the shared L2 penalty, so the dense block is not
penalised more than the n-gram block for the same influence."""

INSCOPE_TOLERANCE = 0.03
"""Calibration gives up at most this much held-out in-scope accuracy for out-of-scope recall."""


def calibrate_threshold(
    probs: np.ndarray,
    truth: Sequence[str],
    labels: Sequence[str],
    oos_label: str,
    inscope_tolerance: float = INSCOPE_TOLERANCE,
) -> float:
    """The abstain threshold, chosen on held-out data over a grid of 100 thresholds.

    With out-of-scope examples: the threshold with the best out-of-scope recall among those
    whose in-scope accuracy is within ``inscope_tolerance`` of the best (lowest on ties).
    Without them: the highest threshold that keeps 98% of the correct held-out decisions.
    """
    if oos_label in truth and any(label != oos_label for label in truth):
        curve = threshold_curve(probs, truth, labels, oos_label)
        floor = max(m["inscope_accuracy"] for m in curve) - inscope_tolerance
        eligible = [m for m in curve if m["inscope_accuracy"] >= floor - 1e-12]
        best = max(eligible, key=lambda m: (m["oos_recall"], -m["threshold"]))
        return round(best["threshold"], 4)
    result = decide_rows(probs, labels, oos_label, 0.0)
    correct = np.array(result.predicted, dtype=object) == np.array(truth, dtype=object)
    if not correct.any():
        return 0.0
    in_scope = [i for i, label in enumerate(labels) if label != oos_label]
    confidence = probs[:, in_scope].max(axis=1)[correct]
    return round(float(np.quantile(confidence, 0.02)), 4)


@dataclass
class TrainedModel:
    model_bytes: bytes
    card: ModelCard
    heldout: Examples
    heldout_probs: np.ndarray
    seconds: float


def split_heldout(examples: Examples, fraction: float, seed: int) -> tuple[Examples, Examples]:
    """Stratified split; labels with a single example stay in training."""
    counts: dict[str, int] = {}
    for label in examples.labels:
        counts[label] = counts.get(label, 0) + 1
    single = [i for i, lab in enumerate(examples.labels) if counts[lab] < 2]
    rest = [i for i, lab in enumerate(examples.labels) if counts[lab] >= 2]
    train_idx, held_idx = train_test_split(
        rest,
        test_size=fraction,
        random_state=seed,
        stratify=[examples.labels[i] for i in rest],
    )
    train_idx = sorted(train_idx + single)
    held_idx = sorted(held_idx)

    def pick(idx: list[int]) -> Examples:
        return Examples([examples.texts[i] for i in idx], [examples.labels[i] for i in idx])

    return pick(train_idx), pick(held_idx)


class _Features:
    """Featurizes (and for the accurate family, encodes) text the way the model will see it."""

    def __init__(self, family: str, params: FeaturizerParams, progress: Progress):
        self.featurizer = Featurizer(params)
        self.encoder: SentenceEncoder | None = None
        if family == "accurate":
            progress("loading the sentence encoder")
            self.encoder = bulk_encoder()
        self.progress = progress

    def matrix(self, texts: Sequence[str], what: str) -> tuple[sp.csr_matrix, np.ndarray | None]:
        self.progress(f"featurizing {len(texts)} {what} examples")
        sparse = sparse_features(self.featurizer, texts)
        dense = None
        if self.encoder is not None:
            dense = encode_in_batches(
                self.encoder.encode, texts, self.encoder.dim, progress=f"encoding {what}"
            )
        return sparse, dense


def train_model(
    train: Examples,
    *,
    family: str = "fast",
    heldout: Examples | None = None,
    heldout_fraction: float = 0.2,
    featurizer_params: FeaturizerParams | None = None,
    threshold: float | str = "calibrated",
    oos_label: str = DEFAULT_OOS_LABEL,
    regularization: float = 10.0,
    inscope_tolerance: float = INSCOPE_TOLERANCE,
    embedding_scale: float = EMBEDDING_SCALE,
    seed: int = 0,
    progress: Progress | None = None,
) -> TrainedModel:
    """Train, calibrate on held-out data, and export one ONNX routing model."""
    say = progress or (lambda _message: None)
    started = time.perf_counter()
    params = featurizer_params or FeaturizerParams(seed=seed)
    data_sha = (train + heldout).sha256() if heldout else train.sha256()
    if heldout is None:
        train, heldout = split_heldout(train, heldout_fraction, seed)
    labels = sorted(set(train.labels))
    missing = sorted(set(heldout.labels) - set(labels))
    if missing:
        raise DatasetError(f"held-out labels never seen in training: {missing}")
    if len([lab for lab in labels if lab != oos_label]) < 2:
        raise DatasetError("need examples of at least two in-scope routes")
    features = _Features(family, params, say)
    x_sparse, x_dense = features.matrix(train.texts, "training")
    x = x_sparse
    if x_dense is not None:
        x = sp.hstack([x_sparse, sp.csr_matrix(x_dense * embedding_scale)], format="csr")
    y = np.array([labels.index(label) for label in train.labels])
    say(f"fitting a {family} model: {x.shape[0]} examples, {len(labels)} labels")
    head = LogisticRegression(C=regularization, max_iter=1000, tol=1e-4, random_state=seed)
    head.fit(x, y)
    coef = head.coef_.astype(np.float32)
    bias = head.intercept_.astype(np.float32)
    if coef.shape[0] == 1:  # scikit-learn collapses two classes into one logit
        coef = np.vstack([-coef / 2, coef / 2])
        bias = np.array([-bias[0] / 2, bias[0] / 2], dtype=np.float32)
    buckets = params.buckets
    sparse_w = np.ascontiguousarray(coef[:, :buckets].T)
    dense_w = None
    if x_dense is not None:  # the graph takes the raw embedding: fold the scale into E
        dense_w = np.ascontiguousarray(coef[:, buckets:].T * embedding_scale)

    card = ModelCard(
        family=family,
        labels=labels,
        oos_label=oos_label if oos_label in labels else "",
        featurizer=params,
        threshold=0.0,
        metrics={},
        encoder=(
            {
                "name": features.encoder.name,
                "dim": features.encoder.dim,
                "sha256": features.encoder.sha256,
            }
            if features.encoder is not None
            else None
        ),
        training_data_sha256=data_sha,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    draft = Classifier(build_linear_onnx(sparse_w, bias, card, dense_w), "draft")
    say(f"calibrating on {len(heldout)} held-out examples")
    _, held_dense = features.matrix(heldout.texts, "held-out")
    heldout_probs = predict_texts(draft, heldout.texts, held_dense)
    card.threshold = (
        calibrate_threshold(heldout_probs, heldout.labels, labels, oos_label, inscope_tolerance)
        if threshold == "calibrated"
        else float(threshold)
    )
    card.metrics = evaluate(heldout_probs, heldout.labels, labels, oos_label, card.threshold)
    card.metrics["train_examples"] = float(len(train))
    model_bytes = build_linear_onnx(sparse_w, bias, card, dense_w)
    return TrainedModel(model_bytes, card, heldout, heldout_probs, time.perf_counter() - started)
