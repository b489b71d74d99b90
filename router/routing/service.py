"""Serving routing decisions for every tenant, with hot-swappable models.

``Router.decide(caller, query)`` is the in-process form of the gRPC ``Route`` call. Each tenant
has one active model; swapping it is one attribute assignment, so a request that has read the
active model finishes on that version while new requests see the new one.
"""

from __future__ import annotations

import heapq
import hmac
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from router.config import LoadedConfig, TenantConfig, hash_api_key
from router.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from router.routing.encoder import SERVING_ENCODER_NAME
from router.routing.model import Classifier, ModelContractError, read_card
from router.routing.registry import ModelRegistry, RegistryError
from router.routing.training import Examples, evaluate, predict_texts

log = logging.getLogger("plexus.routing")


@dataclass(frozen=True)
class Caller:
    """Who is calling, resolved from the API key: never from the request body."""

    tenant: str
    key_name: str
    admin: bool
    apps: frozenset[str] | None


@dataclass
class RouteQuery:
    app: str
    text: str
    metadata: dict[str, str] = field(default_factory=dict)
    user_tier: str = ""
    request_id: str = ""


@dataclass
class Alternative:
    route: str
    target: str
    confidence: float


@dataclass
class RouteDecision:
    route: str
    target: str
    confidence: float
    abstained: bool
    fallback_used: bool
    alternatives: list[Alternative]
    model_version: str
    threshold: float
    timings_us: dict[str, int]
    route_metadata: dict[str, str]
    request_id: str = ""

    @property
    def server_us(self) -> int:
        return sum(self.timings_us.values())


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

    def __init__(self, classifier: Classifier, tenant: TenantConfig, heldout: Examples | None):
        self.classifier = classifier
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
        if self.classifier.needs_embedding and embedding is None:
            from router.routing.encoder import shared_encoder

            embedding = shared_encoder().encode(texts)
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


class TenantRouter:
    """One tenant's routes, apps, registry and active model."""

    def __init__(
        self,
        name: str,
        config: TenantConfig,
        registry: ModelRegistry,
        max_text_chars: int,
        top_k: int,
    ):
        self.name = name
        self.config = config
        self.registry = registry
        self.max_text_chars = max_text_chars
        self.top_k = top_k
        self.fallback_route = config.model.fallback_route
        fallback = config.route(self.fallback_route)
        self.fallback_target = fallback.target
        self.fallback_metadata = dict(fallback.metadata)
        self._swap_lock = threading.Lock()
        version = registry.resolve(config.model.version)
        self.active: ServingModel = self._load(version)
        self.previous: ServingModel | None = None

    @property
    def heavy(self) -> bool:
        """Whether a decision runs a dense encoder (then it belongs off the event loop)."""
        return self.active.classifier.needs_embedding

    def _load(self, version: str) -> ServingModel:
        path = self.registry.path(version)
        classifier = Classifier.from_file(path, version)
        model = ServingModel(classifier, self.config, self.registry.heldout(version))
        # Warm the session (first runs allocate) before it can see a request.
        sample = model.heldout.texts[:8] if model.heldout else ["warm up"]
        for text in sample:
            model.probabilities([text], model.classifier.featurizer.featurize_batch([text]))
        return model

    def check_query(self, query: RouteQuery, caller: Caller) -> None:
        if query.app not in self.config.apps:
            raise NotFound(f"tenant {self.name!r} has no app {query.app!r}")
        if caller.apps is not None and query.app not in caller.apps:
            raise PermissionDenied(f"this API key may not call app {query.app!r}")
        text = query.text
        if not text or text.isspace():
            raise InvalidArgument("text is empty")
        if len(text) > self.max_text_chars:
            raise InvalidArgument(
                f"text has {len(text)} characters; the limit is {self.max_text_chars}"
            )

    def decide_many(self, queries: Sequence[RouteQuery], caller: Caller) -> list[RouteDecision]:
        """Decisions for a batch: one model call; every decision names the same version."""
        model = self.active  # read once: the whole batch runs on this version
        for query in queries:
            self.check_query(query, caller)
        started = time.perf_counter_ns()
        featurizer = model.classifier.featurizer
        ids = featurizer.featurize_batch([q.text for q in queries])
        featurized = time.perf_counter_ns()
        probs = model.probabilities([q.text for q in queries], ids)
        classified = time.perf_counter_ns()
        prep_us = (featurized - started) // 1000 // max(len(queries), 1)
        route_us = (classified - featurized) // 1000 // max(len(queries), 1)
        return [
            self._decision(model, query, probs[i], prep_us, route_us, classified)
            for i, query in enumerate(queries)
        ]

    def decide(
        self, query: RouteQuery, caller: Caller, embedding: np.ndarray | None = None
    ) -> RouteDecision:
        """One decision; ``embedding`` (``[1, dim]``) reuses an encoding made by the caller."""
        model = self.active  # read once: this request finishes on this version
        self.check_query(query, caller)
        started = time.perf_counter_ns()
        ids = model.classifier.featurizer.featurize(query.text)
        if len(ids) == 0:
            ids = np.array([model.classifier.featurizer.pad_id], dtype=np.int64)
        ids = ids.reshape(1, -1)
        featurized = time.perf_counter_ns()
        probs = model.probabilities([query.text], ids, embedding)[0]
        classified = time.perf_counter_ns()
        return self._decision(
            model,
            query,
            probs,
            (featurized - started) // 1000,
            (classified - featurized) // 1000,
            classified,
        )

    def _decision(
        self,
        model: ServingModel,
        query: RouteQuery,
        probs: np.ndarray,
        prep_us: int,
        route_us: int,
        classified_ns: int,
    ) -> RouteDecision:
        values = probs.tolist()  # a few labels: plain Python beats numpy's per-call cost
        ranked = heapq.nlargest(self.top_k, model.app_labels[query.app], key=values.__getitem__)
        best = ranked[0] if ranked else -1
        confidence = values[best] if ranked else 0.0
        oos_prob = values[model.oos_index] if model.oos_index >= 0 else 0.0
        abstained = best < 0 or confidence < model.threshold or oos_prob > confidence
        alternatives = [Alternative(model.labels[i], model.targets[i], values[i]) for i in ranked]
        if abstained:
            route, target, meta = self.fallback_route, self.fallback_target, self.fallback_metadata
        else:
            route, target, meta = (
                model.labels[best],
                model.targets[best],
                model.route_metadata[best],
            )
        decided_us = (time.perf_counter_ns() - classified_ns) // 1000
        return RouteDecision(
            route=route,
            target=target,
            confidence=confidence,
            abstained=abstained,
            fallback_used=abstained,
            alternatives=alternatives,
            model_version=model.version,
            threshold=float(model.threshold),
            timings_us={"prep": int(prep_us), "route": int(route_us), "decide": int(decided_us)},
            route_metadata=meta,
            request_id=query.request_id,
        )

    # -- hot swap --------------------------------------------------------------------------

    def load_version(self, version: str | None, force: bool = False) -> ModelStatus:
        """Build and warm ``version`` off the request path, check it, then swap it in."""
        with self._swap_lock:
            try:
                resolved = self.registry.resolve(version or "latest")
                candidate = self._load(resolved)
            except (RegistryError, ModelContractError) as exc:
                raise (
                    NotFound(str(exc))
                    if isinstance(exc, RegistryError)
                    else FailedPrecondition(str(exc))
                ) from None
            current = self.active
            heldout = candidate.heldout or current.heldout
            new_acc = candidate.heldout_accuracy(heldout) if heldout else float("nan")
            old_acc = current.heldout_accuracy(heldout) if heldout else float("nan")
            margin = self.config.model.swap_margin
            if heldout and new_acc < old_acc - margin and not force:
                raise FailedPrecondition(
                    f"refused {resolved}: held-out accuracy {new_acc:.4f} is more than {margin} "
                    f"below the active {current.version}'s {old_acc:.4f} (force to load anyway)"
                )
            self.previous, self.active = current, candidate
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

    def rollback(self) -> ModelStatus:
        with self._swap_lock:
            if self.previous is None:
                raise FailedPrecondition(f"tenant {self.name!r} has no previous model to restore")
            current, restored = self.active, self.previous
            self.previous, self.active = current, restored
            self.registry.set_active(restored.version)
            log.info(
                "tenant %s: rolled back %s -> %s", self.name, current.version, restored.version
            )
            nan = float("nan")
            return ModelStatus(
                restored.version, current.version, nan, nan, f"restored {restored.version}"
            )


class Router:
    """All tenants; authenticates API keys and dispatches to the caller's tenant."""

    def __init__(self, loaded: LoadedConfig):
        self.loaded = loaded
        server = loaded.config.server
        self.tenants = {
            name: TenantRouter(
                name,
                tenant,
                ModelRegistry(loaded.model_dir, name),
                server.max_text_chars,
                server.top_k,
            )
            for name, tenant in loaded.config.tenants.items()
        }
        self._keys = [
            (
                key.sha256.encode("ascii"),
                Caller(
                    tenant_name,
                    key.name,
                    key.admin,
                    frozenset(key.apps) if key.apps is not None else None,
                ),
            )
            for tenant_name, tenant in loaded.config.tenants.items()
            for key in tenant.api_keys
        ]

    def authenticate(self, api_key: str | None) -> Caller:
        """Constant-time comparison of the key's hash against every stored hash."""
        if not api_key:
            raise Unauthenticated("missing API key (send it as x-api-key metadata)")
        presented = hash_api_key(api_key).encode("ascii")
        found: Caller | None = None
        for stored, caller in self._keys:
            if hmac.compare_digest(stored, presented):
                found = caller
        if found is None:
            raise Unauthenticated("unknown API key")
        return found

    def tenant(self, caller: Caller) -> TenantRouter:
        return self.tenants[caller.tenant]

    def decide(self, caller: Caller, query: RouteQuery) -> RouteDecision:
        return self.tenants[caller.tenant].decide(query, caller)

    def admin_tenant(self, caller: Caller) -> TenantRouter:
        if not caller.admin:
            raise PermissionDenied("this API key is not an admin key")
        return self.tenants[caller.tenant]
