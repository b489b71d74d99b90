"""Hot swap under load: zero failed requests, every response names the version that made it."""

from __future__ import annotations

import random
import shutil
import threading
from collections import Counter
from pathlib import Path

import grpc
import pytest
import yaml

from router._generated.plexus.v1 import plexus_pb2 as pb
from router._generated.plexus.v1 import plexus_pb2_grpc as pb_grpc
from router.config import LoadedConfig, parse_config
from router.observe.audit import read_records, verify
from router.routing.examples import Examples
from router.routing.featurizer import FeaturizerParams
from router.routing.registry import ModelRegistry
from router.routing.tenant_training import tenant_examples
from router.routing.training import train_model

from .conftest import ADMIN_KEY, DEMO_KEY, RunningServer

QUERIES = [
    "is the blue hoodie in size M in stock at store 1432?",
    "where is my order, it was supposed to arrive yesterday",
    "what time do you close tonight",
    "I want to return a pair of boots",
    "how many loyalty points do I have",
    "you charged me twice and I want my money back",
]


@pytest.fixture(scope="module")
def swap_server(trained_config: LoadedConfig, tmp_path_factory) -> RunningServer:
    """A private copy of the trained registry plus a deliberately bad v0003."""
    root = tmp_path_factory.mktemp("swap")
    shutil.copytree(trained_config.model_dir, root, dirs_exist_ok=True)
    data = yaml.safe_load(trained_config.path.read_text())
    data["server"]["model_dir"] = str(root)
    loaded = parse_config(data, root / "plexus.yaml")
    (root / "retail" / "ACTIVE").write_text("v0001\n")
    good = tenant_examples(loaded, "retail")
    shuffled = good.labels[:]
    random.Random(0).shuffle(shuffled)
    registry = ModelRegistry(root, "retail")
    heldout = registry.heldout("v0001")
    bad = train_model(
        Examples(good.texts, shuffled),
        heldout=heldout,
        seed=0,
        featurizer_params=FeaturizerParams(buckets_log2=16),
    )
    assert registry.add(bad.model_bytes, heldout) == "v0003"
    running = RunningServer(loaded)
    yield running
    running.stop()


def admin(address: str) -> tuple[grpc.Channel, pb_grpc.AdminStub]:
    channel = grpc.insecure_channel(address)
    return channel, pb_grpc.AdminStub(channel)


META_ADMIN = (("x-api-key", ADMIN_KEY),)
META_DEMO = (("x-api-key", DEMO_KEY),)


def test_fifty_swaps_under_continuous_load(swap_server: RunningServer):
    stop = threading.Event()
    failures: list[str] = []
    versions: Counter[str] = Counter()
    lock = threading.Lock()

    def load() -> None:
        with grpc.insecure_channel(swap_server.address) as channel:
            stub = pb_grpc.RouterStub(channel)
            i = 0
            while not stop.is_set():
                text = QUERIES[i % len(QUERIES)]
                i += 1
                try:
                    reply = stub.Route(
                        pb.RouteRequest(app="storefront", text=text), metadata=META_DEMO, timeout=10
                    )
                except grpc.RpcError as exc:
                    with lock:
                        failures.append(f"{exc.code()}: {exc.details()}")
                    continue
                with lock:
                    versions[reply.model_version] += 1

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    channel, stub = admin(swap_server.address)
    swapped_to = []
    try:
        for i in range(50):
            target = "v0002" if i % 2 == 0 else "v0001"
            status = stub.LoadModel(
                pb.LoadModelRequest(version=target, force=True), metadata=META_ADMIN, timeout=60
            )
            assert status.active_version == target
            swapped_to.append(target)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
        channel.close()
    assert failures == []
    assert len(swapped_to) == 50
    assert set(versions) == {"v0001", "v0002"}
    assert sum(versions.values()) > 100


def test_a_worse_model_is_refused_unless_forced_and_rollback_restores(swap_server: RunningServer):
    channel, stub = admin(swap_server.address)
    with channel:
        stub.LoadModel(
            pb.LoadModelRequest(version="v0001", force=True), metadata=META_ADMIN, timeout=60
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.LoadModel(pb.LoadModelRequest(version="v0003"), metadata=META_ADMIN, timeout=60)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "held-out accuracy" in info.value.details()
        status = stub.LoadModel(
            pb.LoadModelRequest(version="v0003", force=True), metadata=META_ADMIN, timeout=60
        )
        assert status.active_version == "v0003"
        assert status.heldout_accuracy < status.previous_accuracy
        router = pb_grpc.RouterStub(channel)
        reply = router.Route(
            pb.RouteRequest(app="storefront", text="hi there"), metadata=META_DEMO, timeout=10
        )
        assert reply.model_version == "v0003"
        restored = stub.Rollback(pb.RollbackRequest(), metadata=META_ADMIN, timeout=60)
        assert restored.active_version == "v0001"
        assert restored.previous_version == "v0003"
        reply = router.Route(
            pb.RouteRequest(app="storefront", text="hi there"), metadata=META_DEMO, timeout=10
        )
        assert reply.model_version == "v0001"
        active_file = Path(swap_server.server.plexus.loaded.model_dir) / "retail" / "ACTIVE"
        assert active_file.read_text().strip() == "v0001"
        with pytest.raises(grpc.RpcError) as denied:  # a key without admin rights
            stub.LoadModel(pb.LoadModelRequest(version="v0003"), metadata=META_DEMO, timeout=60)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # every change, and every refused attempt, is in the tenant's audit trail, who made it first
    loaded = swap_server.server.plexus.loaded
    trail = loaded.resolve(loaded.config.server.audit_dir) / "retail"
    changes = [r for r in read_records(trail) if r["kind"] == "admin"][-5:]
    seen = [
        (r["rpc"], r.get("version"), r.get("active_version"), r["outcome"], r["key_name"])
        for r in changes
    ]
    admin_key, demo_key = changes[0]["key_name"], changes[-1]["key_name"]
    assert admin_key and demo_key and admin_key != demo_key
    assert seen == [
        ("LoadModel", "v0001", "v0001", "OK", admin_key),
        ("LoadModel", "v0003", None, "FAILED_PRECONDITION", admin_key),
        ("LoadModel", "v0003", "v0003", "OK", admin_key),
        ("Rollback", None, "v0001", "OK", admin_key),
        ("LoadModel", "v0003", None, "PERMISSION_DENIED", demo_key),
    ]
    assert verify(trail, "retail").ok


def test_unknown_version_is_not_found(swap_server: RunningServer):
    channel, stub = admin(swap_server.address)
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            stub.LoadModel(pb.LoadModelRequest(version="v0099"), metadata=META_ADMIN, timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:
            stub.LoadModel(
                pb.LoadModelRequest(version="../../etc/passwd"), metadata=META_ADMIN, timeout=30
            )
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
