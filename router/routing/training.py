"""Training routing models from labelled examples and exporting them as self-describing ONNX.

Two families share one trained head (multinomial logistic regression, scikit-learn's lbfgs):

* ``fast``: hashed word/character n-grams only; a decision costs a few microseconds.
* ``accurate``: the same n-grams plus a frozen pretrained sentence encoder's embedding.

A held-out split (or a given validation set) calibrates the abstain threshold and provides the
metrics stored in the file. Training is deterministic under its seed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split

from router.routing.featurizer import Featurizer, FeaturizerParams
from router.routing.model import ModelCard, build_linear_onnx

DEFAULT_OOS_LABEL = "oos"
Progress = Callable[[str], None]


class DatasetError(ValueError):
    """A labelled data file that cannot be read; the message names file and line."""


@dataclass
class Examples:
    texts: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def __add__(self, other: Examples) -> Examples:
        return Examples(self.texts + other.texts, self.labels + other.labels)

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for text, label in zip(self.texts, self.labels, strict=True):
            digest.update(json.dumps([text, label], ensure_ascii=False).encode("utf-8"))
            digest.update(b"\n")
        return digest.hexdigest()

    def to_jsonl(self) -> str:
        return "".join(
            json.dumps({"text": t, "label": lab}, ensure_ascii=False) + "\n"
            for t, lab in zip(self.texts, self.labels, strict=True)
        )


def read_examples(path: Path) -> Examples:
    """Read ``{"text", "label"}`` JSONL, or CSV with a ``text,label`` header."""
    texts: list[str] = []
    labels: list[str] = []
    try:
        handle = path.open(encoding="utf-8", newline="")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror}") from None
    with handle:
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
                raise DatasetError(f"{path}: line 1: expected a header with 'text' and 'label'")
            rows = ((reader.line_num, row) for row in reader)
        else:
            rows = _jsonl_rows(path, handle)
        for line, row in rows:
            text, label = row.get("text"), row.get("label")
            if not isinstance(text, str) or not text.strip():
                raise DatasetError(f"{path}: line {line}: 'text' must be a non-empty string")
            if not isinstance(label, str) or not label:
                raise DatasetError(f"{path}: line {line}: 'label' must be a non-empty string")
            texts.append(text)
            labels.append(label)
    if not texts:
        raise DatasetError(f"{path}: no examples")
    return Examples(texts, labels)


def _jsonl_rows(path: Path, handle):  # type: ignore[no-untyped-def]
    for number, raw in enumerate(handle, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: line {number}: not JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path}: line {number}: expected an object with text and label")
        yield number, row


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


@dataclass
class Decisions:
    """Per-example decisions at one threshold: predicted label (or the oos label) per row."""

    predicted: list[str]
    abstained: np.ndarray


def decide(probs: np.ndarray, labels: Sequence[str], oos_label: str, threshold: float) -> Decisions:
    """The serving rule: abstain when the out-of-scope class wins or confidence < threshold."""
    in_scope = np.array([label != oos_label for label in labels])
    masked = np.where(in_scope[None, :], probs, -1.0)
    top = masked.argmax(axis=1)
    confidence = masked[np.arange(len(top)), top]
    abstained = confidence < threshold
    if oos_label in labels:
        abstained |= probs[:, labels.index(oos_label)] > confidence
    predicted = [oos_label if a else labels[i] for i, a in zip(top, abstained, strict=True)]
    return Decisions(predicted, abstained)


def evaluate(
    probs: np.ndarray, truth: Sequence[str], labels: Sequence[str], oos_label: str, threshold: float
) -> dict[str, float]:
    """In-scope accuracy (an abstention is an error), out-of-scope recall/precision, macro-F1."""
    result = decide(probs, labels, oos_label, threshold)
    truth_arr = np.array(truth, dtype=object)
    pred_arr = np.array(result.predicted, dtype=object)
    is_oos = truth_arr == oos_label
    metrics: dict[str, float] = {"threshold": float(threshold), "examples": float(len(truth))}
    if (~is_oos).any():
        metrics["inscope_accuracy"] = float(np.mean(pred_arr[~is_oos] == truth_arr[~is_oos]))
    if is_oos.any():
        metrics["oos_recall"] = float(np.mean(result.abstained[is_oos]))
        metrics["oos_precision"] = (
            float(np.mean(is_oos[result.abstained])) if result.abstained.any() else 0.0
        )
    metrics["macro_f1"] = float(f1_score(truth_arr, pred_arr, average="macro", zero_division=0))
    return metrics


EMBEDDING_SCALE = 2.0
"""Unit-norm embeddings are scaled up before the shared L2 penalty, so the dense block is not
penalised more than the n-gram block for the same influence."""

INSCOPE_TOLERANCE = 0.03
"""Calibration gives up at most this much held-out in-scope accuracy for out-of-scope recall."""


def threshold_curve(
    probs: np.ndarray, truth: Sequence[str], labels: Sequence[str], oos_label: str
) -> list[dict[str, float]]:
    return [evaluate(probs, truth, labels, oos_label, t) for t in np.linspace(0, 0.99, 100)]


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
    result = decide(probs, labels, oos_label, 0.0)
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
        self.encoder = None
        if family == "accurate":
            from router.routing.encoder import bulk_encoder

            progress("loading the sentence encoder")
            self.encoder = bulk_encoder()
        self.progress = progress

    def matrix(self, texts: Sequence[str], what: str) -> tuple[sp.csr_matrix, np.ndarray | None]:
        self.progress(f"featurizing {len(texts)} {what} examples")
        sparse = sparse_features(self.featurizer, texts)
        dense = None
        if self.encoder is not None:
            dense = _encode_with_progress(self.encoder, texts, what)
        return sparse, dense


def _encode_with_progress(encoder, texts: Sequence[str], what: str) -> np.ndarray:  # type: ignore[no-untyped-def]
    from tqdm import tqdm

    chunk = 256
    parts = []
    for start in tqdm(
        range(0, len(texts), chunk), desc=f"encoding {what}", unit="batch", leave=False
    ):
        parts.append(encoder.encode(texts[start : start + chunk]))
    return np.concatenate(parts) if parts else np.zeros((0, encoder.dim), np.float32)


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
    from router.routing.model import Classifier

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


def predict_texts(
    classifier,
    texts: Sequence[str],
    embeddings: np.ndarray | None = None,
    batch: int = 256,  # type: ignore[no-untyped-def]
) -> np.ndarray:
    """Probabilities for many texts, in batches (offline use: training, evaluation, swaps)."""
    if classifier.needs_embedding and embeddings is None:
        from router.routing.encoder import bulk_encoder

        embeddings = bulk_encoder().encode(texts)
    out = []
    for start in range(0, len(texts), batch):
        ids = classifier.featurizer.featurize_batch(texts[start : start + batch])
        emb = embeddings[start : start + batch] if embeddings is not None else None
        out.append(classifier.predict(ids, emb)[0])
    return np.concatenate(out) if out else np.zeros((0, len(classifier.labels)), np.float32)
