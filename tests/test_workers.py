"""`plexus serve --workers N`: N processes on one port, sharing limits and swaps through Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest

from router._generated.plexus.v1 import plexus_pb2 as pb
from router._generated.plexus.v1 import plexus_pb2_grpc as pb_grpc
from router.routing.tenant_training import train_tenant

from .conftest import ADMIN_KEY, DEMO_KEY, ROOT, context_config
from .redis_server import RedisServer, require_redis_server

KEY = (("x-api-key", DEMO_KEY),)
ADMIN = (("x-api-key", ADMIN_KEY),)


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def route(address: str, **metadata: str) -> pb.RouteDecision:
    # A channel of its own: a new connection, which the kernel hands to one of the workers.
    metadata.setdefault("user", uuid.uuid4().hex)  # the per-user limit counts each call apart
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        request = pb.RouteRequest(app="storefront", text="where is my order", metadata=metadata)
        return pb_grpc.RouterStub(ch).Route(request, metadata=KEY, timeout=20)


@pytest.fixture(scope="module")
def redis():
    require_redis_server()
    server = RedisServer()
    server.start()
    yield server
    server.close()


def test_workers_share_the_port_the_limits_and_the_swaps(tmp_path, redis):
    def adjust(data: dict) -> None:
        data["server"]["state"] = {"kind": "redis", "url": redis.url}
        data["server"]["drain_delay_seconds"] = 0
        data["tenants"]["retail"]["policy"] = {
            "rules": [],
            "rate_limits": [
                {
                    "name": "u",
                    "per": "user",
                    "requests": {"rate": 4, "per_seconds": 3600, "burst": 4},
                }
            ],
            "on_state_error": "fail_closed",
        }

    loaded = context_config(tmp_path, adjust)
    train_tenant(loaded, "retail", seed=2)
    (tmp_path / "models" / "retail" / "ACTIVE").write_text("v0001\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "serve", str(loaded.path), "--workers", "2",
         "--address", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        line = process.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("plexus workers: 2 (pids "), line
        line = process.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("plexus serving on 127.0.0.1:"), line
        address = line.split()[3]
        workers = children(process.pid)
        assert len(workers) == 2
        before = {pid: cpu_ticks(pid) for pid in workers}
        for _ in range(40):
            assert route(address).route == "order_status"
        assert all(cpu_ticks(pid) > before[pid] for pid in workers), "one worker took no calls"

        # One user's limit, counted across both workers.
        outcomes = []
        for _ in range(8):
            try:
                route(address, user="shared-user")
                outcomes.append("OK")
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)
        assert outcomes.count("OK") == 4 and outcomes.count("RESOURCE_EXHAUSTED") == 4

        # A swap through whichever worker takes the Admin call reaches the other.
        with grpc.insecure_channel(address) as channel:
            status = pb_grpc.AdminStub(channel).LoadModel(
                pb.LoadModelRequest(version="v0002", force=True), metadata=ADMIN, timeout=120
            )
        assert status.active_version == "v0002"
        for _ in range(200):
            versions = {route(address).model_version for _ in range(10)}
            if versions == {"v0002"}:
                break
            time.sleep(0.05)
        assert versions == {"v0002"}

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_several_workers_need_the_shared_store(trained_config, capsys):
    from router.cli import main

    assert main(["serve", str(trained_config.path), "--workers", "2"]) == 2
    assert "server.state.kind: redis" in capsys.readouterr().err
