"""Hostile inputs and broken files: each is refused or survived, never served wrongly."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from router._generated.plexus.v1 import plexus_pb2 as pb
from router._generated.plexus.v1 import plexus_pb2_grpc as pb_grpc
from router.config import LoadedConfig, parse_config
from router.routing.decider import TenantDecider
from router.routing.encoder import shared_encoder
from router.routing.model import ModelCard, build_linear_onnx, read_card
from router.routing.registry import ModelRegistry

from .conftest import ADMIN_KEY, DEMO_KEY, RunningServer

META_ADMIN = (("x-api-key", ADMIN_KEY),)
META_DEMO = (("x-api-key", DEMO_KEY),)


def private_copy(trained: LoadedConfig, root: Path) -> LoadedConfig:
    shutil.copytree(trained.model_dir, root, dirs_exist_ok=True)
    data = yaml.safe_load(trained.path.read_text())
    data["server"]["model_dir"] = str(root)
    return parse_config(data, root / "plexus.yaml")


def nan_model(like: Path) -> bytes:
    """A model of the same contract as ``like`` whose every probability is NaN."""
    card: ModelCard = read_card(like)
    classes = len(card.labels)
    weights = np.zeros((card.featurizer.buckets, classes), dtype=np.float32)
    weights[0, :] = 1.0
    bias = np.full(classes, np.nan, dtype=np.float32)
    return build_linear_onnx(weights, bias, card)


@pytest.fixture(scope="module")
def nan_server(trained_config: LoadedConfig, tmp_path_factory) -> RunningServer:
    loaded = private_copy(trained_config, tmp_path_factory.mktemp("nan"))
    registry = ModelRegistry(loaded.model_dir, "retail")
    assert registry.add(nan_model(registry.path("v0001")), registry.heldout("v0001")) == "v0003"
    (loaded.model_dir / "retail" / "ACTIVE").write_text("v0001\n")
    running = RunningServer(loaded)
    yield running
    running.stop()


def code_and_details(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()


def test_a_non_finite_model_output_abstains_and_is_counted(nan_server: RunningServer):
    with grpc.insecure_channel(nan_server.address) as channel:
        admin, router = pb_grpc.AdminStub(channel), pb_grpc.RouterStub(channel)
        status = admin.LoadModel(
            pb.LoadModelRequest(version="v0003", force=True), metadata=META_ADMIN, timeout=60
        )
        assert status.active_version == "v0003"
        decision = router.Route(
            pb.RouteRequest(app="storefront", text="where is my order"),
            metadata=META_DEMO,
            timeout=10,
        )
        assert decision.model_version == "v0003"
        assert decision.abstained and decision.fallback_used
        assert decision.confidence == 0.0 and decision.route == "escalate_to_human"
        assert nan_server.server.plexus.deciders.tenants["retail"].nonfinite >= 1
        admin.Rollback(pb.RollbackRequest(), metadata=META_ADMIN, timeout=60)


def test_admin_names_are_validated_and_errors_carry_no_paths(nan_server: RunningServer):
    model_dir = str(nan_server.server.plexus.loaded.model_dir)
    with grpc.insecure_channel(nan_server.address) as channel:
        admin = pb_grpc.AdminStub(channel)
        for version in ["v" + "0" * 299, "v" + "9" * 40, "x" * 300, "../v0001", "v0099"]:
            code, details = code_and_details(
                admin.LoadModel,
                pb.LoadModelRequest(version=version),
                metadata=META_ADMIN,
                timeout=30,
            )
            assert code == grpc.StatusCode.NOT_FOUND, (version, details)
            assert model_dir not in details and len(details) < 300


def test_echoed_client_values_are_cut_short(nan_server: RunningServer):
    with grpc.insecure_channel(nan_server.address) as channel:
        router = pb_grpc.RouterStub(channel)
        for size in (20_000, 1_000_000):
            code, details = code_and_details(
                router.Route,
                pb.RouteRequest(app="a" * size, text="hello"),
                metadata=META_DEMO,
                timeout=10,
            )
            assert code == grpc.StatusCode.NOT_FOUND
            assert len(details) < 200


def test_rollback_walks_back_through_history_with_accuracies(
    trained_config: LoadedConfig, tmp_path: Path
):
    loaded = private_copy(trained_config, tmp_path / "models")
    (loaded.model_dir / "retail" / "ACTIVE").write_text("v0001\n")
    decider = TenantDecider(
        "retail",
        loaded.config.tenants["retail"],
        ModelRegistry(loaded.model_dir, "retail"),
        3,
        shared_encoder,
    )
    decider.load_version("v0002", force=True)
    decider.load_version("v0001", force=True)
    decider.load_version("v0002", force=True)
    walked = []
    while decider.history:
        status = decider.rollback()
        assert np.isfinite(status.heldout_accuracy) and np.isfinite(status.previous_accuracy)
        walked.append(status.active_version)
    assert walked == ["v0001", "v0002", "v0001"]  # back through every swap, not a toggle
    assert (loaded.model_dir / "retail" / "ACTIVE").read_text().strip() == "v0001"


def test_without_active_a_broken_newest_model_falls_back_loudly(
    trained_config: LoadedConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    loaded = private_copy(trained_config, tmp_path / "models")
    directory = loaded.model_dir / "retail"
    (directory / "ACTIVE").unlink(missing_ok=True)
    (directory / "v0003.onnx").write_bytes(b"a truncated model file")

    def decider() -> TenantDecider:
        tenant = loaded.config.tenants["retail"]
        return TenantDecider(
            "retail", tenant, ModelRegistry(loaded.model_dir, "retail"), 3, shared_encoder
        )

    with caplog.at_level("ERROR"):
        assert decider().active.version == "v0002"
    assert any("NOT the newest model v0003" in r.getMessage() for r in caplog.records)
    # A version the operator pinned is served or refused, never silently replaced.
    (directory / "ACTIVE").write_text("v0003\n")
    with pytest.raises(Exception, match="v0003"):
        decider()


def test_a_killed_writer_leaves_no_temporary_file_behind(tmp_path: Path):
    directory = tmp_path / "retail"
    directory.mkdir()
    stale = directory / ".v0001.onnx.abc123.tmp"
    stale.write_bytes(b"half a model")
    fresh = directory / ".v0002.onnx.def456.tmp"
    fresh.write_bytes(b"a write in progress")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    ModelRegistry(tmp_path, "retail")
    assert not stale.exists() and fresh.exists()
