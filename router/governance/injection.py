"""The prompt-injection / jailbreak guard at serving time: ``P(injection)`` for a text.

A guard model is a routing model (the same ONNX contract, featurizer, families and
:class:`~router.routing.model.Classifier`) with exactly the two labels ``benign`` and
``injection`` and no out-of-scope label. Its ``plexus.threshold`` is the operating point chosen
on validation data for a target false-positive rate on benign prompts
(:func:`router.governance.injection_training.calibrate_fpr_threshold`): a text is flagged when
``score(text) >= threshold``.

For the fast family a score is featurize + the native linear head, a few microseconds. For the
accurate family the text's sentence embedding is an input; pass it when the caller already has
it (the router encodes the question for routing), otherwise the process's serving encoder
computes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np

from router.routing.encoder import shared_encoder
from router.routing.model import Classifier, ModelContractError

BENIGN = "benign"
INJECTION = "injection"
LABELS = (BENIGN, INJECTION)
DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "models" / "injection-guard.onnx"
"""The shipped guard: fast family, trained on the S-Labs prompt-injection training split."""


class InjectionGuard:
    """Scores texts with one loaded guard model; safe to share between threads."""

    def __init__(self, classifier: Classifier):
        card = classifier.card
        if sorted(classifier.labels) != sorted(LABELS) or card.oos_label:
            raise ModelContractError(
                f"{classifier.source}: a guard model has exactly the labels {list(LABELS)} "
                f"and no out-of-scope label; this one has {classifier.labels} "
                f"(oos {card.oos_label!r})"
            )
        self.classifier = classifier
        self.card = card
        self.threshold: float = float(card.threshold)
        self.version: str = classifier.version
        self.uses_encoder: bool = classifier.uses_encoder
        self.metrics: dict[str, float] = dict(card.metrics)
        self._featurizer = classifier.featurizer
        self._pad = np.array([[self._featurizer.pad_id]], dtype=np.int64)
        self._index = classifier.labels.index(INJECTION)

    @classmethod
    def from_file(cls, path: Path) -> InjectionGuard:
        """Load a guard model file; :class:`ModelContractError` says why one is refused."""
        return cls(Classifier.from_file(Path(path)))

    @classmethod
    def default(cls) -> InjectionGuard:
        """The shipped guard model (loaded once per process, then shared)."""
        return _default_guard()

    def score(self, text: str, embedding: np.ndarray | None = None) -> float:
        """``P(injection)`` for one text; ``embedding`` (``[dim]`` or ``[1, dim]``) for the
        accurate family, computed here when not given."""
        ids = self._featurizer.featurize(text)
        ids = ids.reshape(1, -1) if len(ids) else self._pad
        if self.uses_encoder:
            if embedding is None:
                embedding = shared_encoder().encode([text])
            embedding = np.asarray(embedding, dtype=np.float32).reshape(1, -1)
        probs, _ = self.classifier.predict(ids, embedding)
        return float(probs[0, self._index])

    def scores(self, texts: Sequence[str], embeddings: np.ndarray | None = None) -> np.ndarray:
        """``P(injection)`` per text, float64 ``[len(texts)]``; ``embeddings`` ``[n, dim]`` for
        the accurate family, computed here when not given. Batched 256 texts per call."""
        texts = list(texts)
        if self.uses_encoder and embeddings is None:
            embeddings = shared_encoder().encode(texts)
        out = np.empty(len(texts), dtype=np.float64)
        for start in range(0, len(texts), 256):
            ids = self._featurizer.featurize_batch(texts[start : start + 256])
            emb = None
            if embeddings is not None and self.uses_encoder:
                emb = np.asarray(embeddings[start : start + 256], dtype=np.float32)
            probs, _ = self.classifier.predict(ids, emb)
            out[start : start + len(ids)] = probs[:, self._index]
        return out

    def flags(self, score: float) -> bool:
        """Whether a score is at or above this model's threshold (the decision rule)."""
        return score >= self.threshold


@cache
def _default_guard() -> InjectionGuard:
    return InjectionGuard.from_file(DEFAULT_MODEL_PATH)
