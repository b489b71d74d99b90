"""Every router name the benchmarks use, in one place, each imported on first use.

Suites write ``api.load_config(...)`` or ``from bench.api import pb``; the module behind a name
is imported only when a suite first touches it, so ``plexus bench --help`` and the client
processes stay light. Each name lists where to look, in order: the public ``router`` package
first where the name belongs to its public API, then the module that defines it today.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = ("router",)

_WHERE: dict[str, tuple[str, ...]] = {
    # the public API
    "load_config": (*_PUBLIC, "router.config"),
    "RouteQuery": (*_PUBLIC, "router.calls"),
    "Plexus": (*_PUBLIC, "router.plexus"),
    "PlexusServer": (*_PUBLIC, "router.server.app"),
    "train_tenant": (*_PUBLIC, "router.routing.tenant_training"),
    "ingest": (*_PUBLIC, "router.context.ingest"),
    # configuration, serving and training internals the suites measure directly
    "CollectionConfig": ("router.config",),
    "new_server": ("router.server.app",),
    "tenant_examples": ("router.routing.tenant_training",),
    "train_model": ("router.routing.training",),
    "Examples": ("router.routing.examples",),
    "evaluate": ("router.routing.metrics",),
    "predict_texts": ("router.routing.metrics",),
    "threshold_curve": ("router.routing.metrics",),
    "Classifier": ("router.routing.model",),
    "Featurizer": ("router.routing.featurizer",),
    "FeaturizerParams": ("router.routing.featurizer",),
    "USING_NATIVE": ("router.routing.featurizer",),
    "shared_encoder": ("router.routing.encoder",),
    "bulk_encoder": ("router.routing.encoder",),
    "SERVING_ENCODER_NAME": ("router.routing.encoder",),
    "build_index": ("router.context.collections",),
    "jsonl_objects": ("router.files",),
    "set_search_params": ("router.context.collections",),
    "CollectionWriter": ("router.context.collections",),
    "ChunkRecord": ("router.context.types",),
    # governance
    "PlexusError": (*_PUBLIC, "router.errors"),
    "GovernanceConfig": ("router.config",),
    "PiiConfig": ("router.config",),
    "Span": ("router.governance.types",),
    "PiiScanner": ("router.governance.pii_scan",),
    "EntityTagger": ("router.governance.ner",),
    "merge_spans": ("router.governance.rules",),
    "compile_rules": ("router.governance.rules",),
    "redact": ("router.governance.guards",),
    "evaluate_spans": ("router.governance.ner_training",),
    "InjectionGuard": ("router.governance.injection",),
    "evaluate_guard": ("router.governance.injection_training",),
    "load_injection_csv": ("router.governance.injection_training",),
}
# Names that differ from the attribute they stand for.
_ALIASES = {"set_search_params": "_set_search_params"}
# Whole modules.
_MODULES = {"pb": "router._generated.plexus.v1.plexus_pb2"}

__all__ = sorted([*_WHERE, *_MODULES])


def _import(name: str) -> Any | None:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:  # the module exists but something it needs is missing
            raise
        return None


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    else:
        attribute = _ALIASES.get(name, name)
        for module_name in _WHERE.get(name, ()):
            module = _import(module_name)
            if module is not None and hasattr(module, attribute):
                value = getattr(module, attribute)
                break
        else:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value
