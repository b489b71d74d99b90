"""Shared fixtures: a trained tenant on disk and a real gRPC server on an ephemeral port."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from router.config import LoadedConfig, hash_api_key, parse_config
from router.routing.tenant_training import train_tenant
from router.server.app import PlexusServer
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "examples" / "retail" / "plexus.yaml"
DEMO_KEY = "retail-demo-key"
ADMIN_KEY = "retail-admin-key"
OPS_ONLY_KEY = "retail-ops-only-key"
OTHER_TENANT_KEY = "wholesale-key"


def demo_config_data(model_dir: Path) -> dict:
    """The retail demo configuration, with test keys, a second tenant and a small model."""
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    data["server"]["model_dir"] = str(model_dir)
    data["server"]["address"] = "127.0.0.1:0"
    data["server"]["max_text_chars"] = 500
    retail = data["tenants"]["retail"]
    retail["model"]["data"] = str(DEMO_CONFIG.parent / retail["model"]["data"])
    retail["model"]["buckets_log2"] = 16
    stored = {key["sha256"] for key in retail["api_keys"]}
    retail["api_keys"] += [
        key
        for key in [
            {"name": "admin", "sha256": hash_api_key(ADMIN_KEY), "admin": True},
            {"name": "ops", "sha256": hash_api_key(OPS_ONLY_KEY), "apps": ["store_ops"]},
        ]
        if key["sha256"] not in stored  # the example may ship the demo admin key itself
    ]
    data["tenants"]["wholesale"] = {
        "api_keys": [{"name": "w", "sha256": hash_api_key(OTHER_TENANT_KEY)}],
        "apps": {"buyers": {}},
        "model": {"fallback_route": "other", "buckets_log2": 12, "family": "accurate"},
        "routes": [
            {
                "name": "pricing",
                "target": "t1",
                "examples": ["bulk price for pallets", "volume discount please", "price per case"],
            },
            {
                "name": "other",
                "target": "t2",
                "examples": ["hello there", "talk to someone", "something else entirely"],
            },
        ],
    }
    return data


KNOWLEDGE = DEMO_CONFIG.parent / "knowledge"


def context_config(root: Path, adjust=None) -> LoadedConfig:  # type: ignore[no-untyped-def]
    """The demo configuration with its SQL mirror loaded and both tenants trained.

    ``adjust(data)`` may change the configuration data before it is validated and written.
    """
    data = demo_config_data(root / "models")
    data["server"]["data_dir"] = str(root / "data")
    data["tenants"]["retail"]["sql_mirrors"]["stores"]["url"] = f"sqlite:///{root / 'stores.db'}"
    if adjust is not None:
        adjust(data)
    path = root / "plexus.yaml"
    path.write_text(yaml.safe_dump(data))
    loaded = parse_config(data, path)
    with sqlite3.connect(root / "stores.db") as db:
        db.executescript((DEMO_CONFIG.parent / "stores.sql").read_text())
    train_tenant(loaded, "retail", seed=1)
    train_tenant(loaded, "wholesale")
    return loaded


@pytest.fixture(scope="session")
def trained_config(tmp_path_factory: pytest.TempPathFactory) -> LoadedConfig:
    """Two fast retail versions (v0001, v0002) and one wholesale version, trained once."""
    model_dir = tmp_path_factory.mktemp("models")
    path = model_dir / "plexus.yaml"
    data = demo_config_data(model_dir)
    path.write_text(yaml.safe_dump(data))
    loaded = parse_config(data, path)
    train_tenant(loaded, "retail", seed=1)
    train_tenant(loaded, "retail", seed=2)
    train_tenant(loaded, "wholesale")
    (model_dir / "retail" / "ACTIVE").write_text("v0001\n")
    return loaded


class RunningServer:
    """A PlexusServer on its own event loop thread, as a real deployment runs it."""

    def __init__(self, loaded: LoadedConfig):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self._call(self._build(loaded))
        self.port = self._call(self.server.start())
        self.address = f"127.0.0.1:{self.port}"

    async def _build(self, loaded: LoadedConfig) -> PlexusServer:
        return PlexusServer(loaded)

    def _call(self, coroutine):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=120)

    def stop(self) -> None:
        self._call(self.server.stop(grace=1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(trained_config: LoadedConfig) -> Iterator[RunningServer]:
    running = RunningServer(trained_config)
    yield running
    running.stop()


@pytest.fixture()
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


# Accelerated modules run their behaviour tests twice: natively and on the pure-Python
# reference. A test module names its extension in NATIVE_MODULE; the native run skips, saying
# why, when that extension is not built or PLEXUS_NO_EXTENSIONS disables extensions.


def _skip_unless_native(request: pytest.FixtureRequest) -> None:
    import importlib

    from router._native import NO_EXTENSIONS

    name = request.module.NATIVE_MODULE
    if NO_EXTENSIONS:
        pytest.skip(f"{name}: extensions are disabled (PLEXUS_NO_EXTENSIONS is set)")
    try:
        importlib.import_module(name)
    except ImportError as exc:
        pytest.skip(f"{name} is not built ({exc})")


@pytest.fixture(scope="module", params=["native", "reference"])
def implementation(request: pytest.FixtureRequest) -> str:
    """``"native"`` or ``"reference"``: the implementation of NATIVE_MODULE under test."""
    if request.param == "native":
        _skip_unless_native(request)
    return str(request.param)


@pytest.fixture(scope="module")
def native_available(request: pytest.FixtureRequest) -> None:
    """Skips a test that compares NATIVE_MODULE with its reference when it cannot run."""
    _skip_unless_native(request)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on an ephemeral port, for the whole session; tests that use it skip,
    saying why, where redis-server is not installed."""
    running = RedisServer()
    running.start()
    yield running
    running.close()
