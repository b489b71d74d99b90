"""Training a tenant's routing model from its configuration and storing it as a new version."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from router.config import LoadedConfig
from router.files import Progress
from router.routing.examples import DEFAULT_OOS_LABEL, DatasetError, Examples, read_examples
from router.routing.featurizer import FeaturizerParams
from router.routing.registry import ModelRegistry
from router.routing.training import CalibrationRule, TrainedModel, train_model


@dataclass
class TenantTrainingResult:
    tenant: str
    version: str
    path: Path
    trained: TrainedModel
    active: str
    """The version ``ACTIVE`` names after training (else the newest): what a server configured
    with ``model.version: active`` serves when it starts. Training never moves ``ACTIVE``
    unless asked to (``activate``), so after a load or a rollback it may stay older."""


def tenant_examples(loaded: LoadedConfig, tenant: str, data: Path | None = None) -> Examples:
    """The route examples from the config plus the optional labelled dataset.

    Labels in the dataset must be route names or ``oos`` (out-of-scope).
    """
    config = loaded.tenant(tenant)
    examples = Examples(
        [text for route in config.routes for text in route.examples],
        [route.name for route in config.routes for _ in route.examples],
    )
    data_path = data or (loaded.resolve(config.model.data) if config.model.data else None)
    if data_path is not None:
        extra = read_examples(data_path)
        allowed = {r.name for r in config.routes} | {DEFAULT_OOS_LABEL}
        unknown = sorted(set(extra.labels) - allowed)
        if unknown:
            raise DatasetError(
                f"{data_path}: labels {unknown} are neither routes of tenant {tenant!r} nor "
                f"{DEFAULT_OOS_LABEL!r}"
            )
        examples = examples + extra
    return examples


def train_tenant(
    loaded: LoadedConfig,
    tenant: str,
    *,
    data: Path | None = None,
    family: str | None = None,
    seed: int | None = None,
    progress: Progress | None = None,
    activate: bool = False,
) -> TenantTrainingResult:
    """Train ``tenant``'s model and store it as the next version; ``activate`` also points
    ``ACTIVE`` at it. Stages are reported through ``progress``: reading examples, featurizing,
    fitting, calibrating, exporting."""
    say = progress or (lambda _message: None)
    config = loaded.tenant(tenant)
    model_config = config.model
    use_seed = model_config.seed if seed is None else seed
    data_path = data or (loaded.resolve(config.model.data) if config.model.data else None)
    say(
        f"reading examples: the routes of tenant {tenant!r}"
        + (f" and {data_path}" if data_path is not None else "")
    )
    examples = tenant_examples(loaded, tenant, data)
    labels = sorted(set(examples.labels))
    say(f"read {len(examples)} examples of {len(labels)} labels")
    trained = train_model(
        examples,
        family=family or model_config.family,
        heldout_fraction=model_config.heldout_fraction,
        featurizer_params=FeaturizerParams(buckets_log2=model_config.buckets_log2, seed=use_seed),
        threshold=model_config.threshold,
        regularization=model_config.regularization,
        calibration=CalibrationRule(**model_config.calibration.model_dump()),
        seed=use_seed,
        progress=progress,
    )
    registry = ModelRegistry(loaded.model_dir, tenant)
    say(
        f"exporting the ONNX model ({len(trained.model_bytes) / 1024:.0f} KiB) and its "
        f"held-out set to {registry.directory}"
    )
    version = registry.add(trained.model_bytes, trained.heldout)
    if activate:
        registry.set_active(version)
    active = registry.active() or version
    return TenantTrainingResult(tenant, version, registry.path(version), trained, active)
