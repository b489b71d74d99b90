"""Routing decisions for every tenant, with hot-swappable models.

``TenantDecider.decide(app, text)`` is the route stage's domain call. Each tenant has one active
model; swapping it is one attribute assignment, so a request that has read the active model
finishes on that version while new requests see the new one. Checking the request (app, key,
limits) is the prep stage's job, not this module's.
"""

from __future__ import annotations

import heapq
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from router.calls import Alternative, Caller, RouteDecision
from router.config import LoadedConfig, TenantConfig
from router.errors import FailedPrecondition, NotFound, PermissionDenied
from router.files import version_number
from router.routing.encoder import SERVING_ENCODER_NAME, Encoder
from router.routing.examples import Examples
from router.routing.metrics import abstains, evaluate, predict_texts
from router.routing.model import Classifier, ModelContractError, read_card
from router.routing.registry import ModelRegistry, RegistryError

log = logging.getLogger("plexus.routing")

HISTORY = 16
"""How many previously served models a tenant keeps for rollback."""

EncoderSource = Callable[[], Encoder]
"""Where a model that uses the encoder gets it: the process's serving encoder for the device."""


@dataclass
class ModelInfo:
    version: str
    family: str
    created_at: str
    training_data_sha256: str
    metrics: dict[str, float]
    active: bool


@dataclass
class ModelStatus:
    active_version: str
    previous_version: str
    heldout_accuracy: float
    previous_accuracy: float
    message: str


class ServingModel:
    """A loaded classifier plus everything a decision needs, precomputed for the hot path."""

    def __init__(
        self,
        classifier: Classifier,
        tenant: TenantConfig,
        heldout: Examples | None,
        encoder: EncoderSource,
    ):
        self.classifier = classifier
        self.encoder = encoder
        self.uses_encoder = classifier.uses_encoder  # the text's embedding is an input
        self.version = classifier.version
        self.heldout = heldout
        labels = classifier.labels
        oos = classifier.card.oos_label
        routes = {r.name: r for r in tenant.routes}
        unknown = sorted(set(labels) - set(routes) - {oos})
        if unknown:
            raise ModelContractError(
                f"{classifier.source}: labels {unknown} are not routes of this tenant "
                f"(routes: {sorted(routes)})"
            )
        encoder = classifier.card.encoder
        if encoder is not None and encoder.get("name") != SERVING_ENCODER_NAME:
            raise ModelContractError(
                f"{classifier.source}: trained on encoder {encoder.get('name')!r}; this server "
                f"encodes with {SERVING_ENCODER_NAME!r} (retrain the model)"
            )
        configured = tenant.model.threshold
        self.threshold = classifier.card.threshold if configured == "calibrated" else configured
        self.oos_index = labels.index(oos) if oos else -1
        self.labels = labels
        self.targets = [routes[label].target if label in routes else "" for label in labels]
        self.route_metadata = [
            dict(routes[lab].metadata) if lab in routes else {} for lab in labels
        ]
        in_scope = [i for i, label in enumerate(labels) if label in routes]
        self.app_labels: dict[str, tuple[int, ...]] = {}
        for app_name, app in tenant.apps.items():
            allowed = set(app.routes) if app.routes is not None else set(routes)
            self.app_labels[app_name] = tuple(i for i in in_scope if labels[i] in allowed)

    def probabilities(
        self, texts: Sequence[str], ids: np.ndarray, embedding: np.ndarray | None = None
    ) -> np.ndarray:
        """``embedding`` may be given when the caller already encoded the texts."""
        if self.uses_encoder and embedding is None:
            embedding = self.encoder().encode(list(texts))
        return self.classifier.predict(ids, embedding)[0]

    def heldout_accuracy(self, examples: Examples) -> float:
        probs = predict_texts(self.classifier, examples.texts)
        # Evaluate against this model's own labels; labels it lacks count as errors.
        metrics = evaluate(
            probs,
            examples.labels,
            self.labels,
            self.classifier.card.oos_label or "oos",
            self.threshold,
        )
        return metrics.get("inscope_accuracy", 0.0)


class TenantDecider:
    """One tenant's routes, apps, registry and active model."""

    def __init__(
        self,
        name: str,
        config: TenantConfig,
        registry: ModelRegistry,
        top_k: int,
        encoder: EncoderSource,
    ):
        self.name = name
        self.config = config
        self.registry = registry
        self.top_k = top_k
        self.encoder = encoder
        self.fallback_route = config.model.fallback_route
        fallback = config.route(self.fallback_route)
        self.fallback_target = fallback.target
        self.fallback_metadata = dict(fallback.metadata)
        self._swap_lock = threading.Lock()
        self.active: ServingModel = self._load_at_start(config.model.version)
        self.history: deque[ServingModel] = deque(maxlen=HISTORY)
        """Models served before the active one, newest last: rollback walks back through them."""
        self.nonfinite = 0
        """Decisions whose model output was NaN or infinite (each abstained)."""

    @property
    def uses_encoder(self) -> bool:
        """Whether a decision needs the text's sentence embedding (encoded off the loop)."""
        return self.active.uses_encoder

    def _load_at_start(self, wanted: str) -> ServingModel:
        """The configured version; when none is pinned and the newest is broken, the newest
        that loads (loudly: an operator must see that the newest model is not served)."""
        version = self.registry.resolve(wanted)
        implicit = wanted == "latest" or (wanted == "active" and not self.registry.pinned())
        newest = version_number(version) or 0
        versions = reversed(self.registry.versions())
        candidates = [v for v in versions if (version_number(v) or 0) <= newest]
        if not implicit:
            candidates = [version]
        for i, candidate in enumerate(candidates):
            try:
                model = self._load(candidate)
            except ModelContractError as exc:
                if i == len(candidates) - 1:
                    raise
                log.error(
                    "tenant %s: model %s cannot be served (%s); trying the next older version",
                    self.name,
                    candidate,
                    exc,
                )
                continue
            if i:
                log.error(
                    "tenant %s: SERVING %s, NOT the newest model %s, which is broken",
                    self.name,
                    candidate,
                    version,
                )
            return model
        raise AssertionError("unreachable: the last candidate raises")

    def _load(self, version: str) -> ServingModel:
        path = self.registry.path(version)
        try:
            classifier = Classifier.from_file(path, version)
            model = ServingModel(
                classifier, self.config, self.registry.heldout(version), self.encoder
            )
        except ModelContractError as exc:
            # The reason without the server's file system layout (it reaches Admin callers).
            raise ModelContractError(str(exc).replace(str(path), f"{version}.onnx")) from None
        # Warm the session (first runs allocate) before it can see a request.
        sample = model.heldout.texts[:8] if model.heldout else ["warm up"]
        for text in sample:
            model.probabilities([text], model.classifier.featurizer.featurize_batch([text]))
        return model

    def decide(self, app: str, text: str, embedding: np.ndarray | None = None) -> RouteDecision:
        """One decision; ``embedding`` (``[1, dim]``) is the text's, when the model uses it."""
        model = self.active  # read once: this request finishes on this version
        featurizer = model.classifier.featurizer
        ids = featurizer.featurize(text)
        if len(ids) == 0:
            ids = np.array([featurizer.pad_id], dtype=np.int64)
        probs = model.probabilities([text], ids.reshape(1, -1), embedding)[0]
        return self._decision(model, app, probs)

    def decide_many(
        self, apps: Sequence[str], texts: Sequence[str], embeddings: np.ndarray | None = None
    ) -> list[RouteDecision]:
        """Decisions for a batch: one model call; every decision names the same version."""
        model = self.active  # read once: the whole batch runs on this version
        ids = model.classifier.featurizer.featurize_batch(list(texts))
        probs = model.probabilities(texts, ids, embeddings)
        return [self._decision(model, app, probs[i]) for i, app in enumerate(apps)]

    def _decision(self, model: ServingModel, app: str, probs: np.ndarray) -> RouteDecision:
        values = probs.tolist()  # a few labels: plain Python beats numpy's per-call cost
        total = sum(values)
        if total - total != 0.0:  # NaN or infinite somewhere: never serve such a probability
            return self._nonfinite(model)
        ranked = heapq.nlargest(self.top_k, model.app_labels[app], key=values.__getitem__)
        best = ranked[0] if ranked else -1
        confidence = values[best] if ranked else None
        oos_prob = values[model.oos_index] if model.oos_index >= 0 else 0.0
        abstained = abstains(confidence, oos_prob, model.threshold)
        alternatives = [Alternative(model.labels[i], model.targets[i], values[i]) for i in ranked]
        if abstained:
            route, target, meta = self.fallback_route, self.fallback_target, self.fallback_metadata
        else:
            route, target, meta = (
                model.labels[best],
                model.targets[best],
                model.route_metadata[best],
            )
        return RouteDecision(
            route=route,
            target=target,
            confidence=confidence or 0.0,
            abstained=abstained,
            fallback_used=abstained,
            alternatives=alternatives,
            model_version=model.version,
            threshold=float(model.threshold),
            route_metadata=meta,
        )

    def _nonfinite(self, model: ServingModel) -> RouteDecision:
        self.nonfinite += 1
        if self.nonfinite == 1 or self.nonfinite % 1000 == 0:
            log.error(
                "tenant %s: model %s returned a non-finite probability (%d decisions so far); "
                "they abstain to %s",
                self.name,
                model.version,
                self.nonfinite,
                self.fallback_route,
            )
        return RouteDecision(
            route=self.fallback_route,
            target=self.fallback_target,
            confidence=0.0,
            abstained=True,
            fallback_used=True,
            alternatives=[],
            model_version=model.version,
            threshold=float(model.threshold),
            route_metadata=self.fallback_metadata,
        )

    # -- hot swap --------------------------------------------------------------------------

    def load_version(self, version: str | None, force: bool = False) -> ModelStatus:
        """Build and warm ``version`` off the request path, check it, then swap it in."""
        with self._swap_lock:
            try:
                resolved = self.registry.resolve(version or "latest")
            except RegistryError as exc:
                raise NotFound(str(exc)) from None
            try:
                candidate = self._load(resolved)
            except ModelContractError as exc:
                raise FailedPrecondition(str(exc)) from None
            current = self.active
            new_acc, old_acc = self._accuracies(candidate, current)
            margin = self.config.model.swap_margin
            heldout = candidate.heldout or current.heldout
            if heldout and new_acc < old_acc - margin and not force:
                raise FailedPrecondition(
                    f"refused {resolved}: held-out accuracy {new_acc:.4f} is more than {margin} "
                    f"below the active {current.version}'s {old_acc:.4f} (force to load anyway)"
                )
            self.history.append(current)
            self.active = candidate
            self.registry.set_active(candidate.version)
            log.info("tenant %s: swapped %s -> %s", self.name, current.version, candidate.version)
            return ModelStatus(
                candidate.version, current.version, new_acc, old_acc, f"loaded {candidate.version}"
            )

    def list_models(self) -> list[ModelInfo]:
        infos = []
        for version in self.registry.versions():
            try:
                card = read_card(self.registry.path(version))
            except ModelContractError as exc:
                log.warning("tenant %s: skipping %s: %s", self.name, version, exc)
                continue
            infos.append(
                ModelInfo(
                    version,
                    card.family,
                    card.created_at,
                    card.training_data_sha256,
                    card.metrics,
                    version == self.active.version,
                )
            )
        return infos

    @staticmethod
    def _accuracies(new: ServingModel, old: ServingModel) -> tuple[float, float]:
        """Both models' in-scope accuracy on the new one's held-out set (else the old one's);
        NaN only when neither has a held-out set."""
        heldout = new.heldout or old.heldout
        if not heldout:
            return float("nan"), float("nan")
        return new.heldout_accuracy(heldout), old.heldout_accuracy(heldout)

    def rollback(self) -> ModelStatus:
        """Restore the model served before the active one; repeated calls walk further back
        (up to HISTORY swaps, while the server runs)."""
        with self._swap_lock:
            if not self.history:
                raise FailedPrecondition(f"tenant {self.name!r} has no previous model to restore")
            current, restored = self.active, self.history.pop()
            self.active = restored
            self.registry.set_active(restored.version)
            log.info(
                "tenant %s: rolled back %s -> %s", self.name, current.version, restored.version
            )
            restored_acc, current_acc = self._accuracies(restored, current)
            return ModelStatus(
                restored.version,
                current.version,
                restored_acc,
                current_acc,
                f"restored {restored.version}",
            )


class Deciders:
    """Every tenant's decider, built from the configuration."""

    def __init__(self, loaded: LoadedConfig, encoder: EncoderSource):
        server = loaded.config.server
        self.tenants = {
            name: TenantDecider(
                name, tenant, ModelRegistry(loaded.model_dir, name), server.top_k, encoder
            )
            for name, tenant in loaded.config.tenants.items()
        }

    def tenant(self, caller: Caller) -> TenantDecider:
        return self.tenants[caller.tenant]

    def admin_tenant(self, caller: Caller) -> TenantDecider:
        if not caller.admin:
            raise PermissionDenied("this API key is not an admin key")
        return self.tenants[caller.tenant]
