"""Three `plexus serve` processes on one configuration and one real Redis behave as one.

Clients balance over them with gRPC's own round_robin policy (one channel, three addresses),
as docs/operations.md describes for N replicas.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import yaml

from router._generated.plexus.v1 import plexus_pb2 as pb
from router._generated.plexus.v1 import plexus_pb2_grpc as pb_grpc
from router.context.ingest import ingest
from router.routing.tenant_training import train_tenant

from .conftest import ADMIN_KEY, DEMO_KEY, KNOWLEDGE, ROOT, context_config
from .openai_peer import Behaviour, OpenAIPeer
from .redis_server import RedisServer, require_redis_server

DISPUTE = "you charged my card twice for one order and I want my money back"
REPLICAS = 3
MAX_TOKENS = 8
KEY = (("x-api-key", DEMO_KEY),)
ADMIN = (("x-api-key", ADMIN_KEY),)


def start_replica(config: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "serve", str(config), "--address", "127.0.0.1:0",
         "--workers", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    line = process.stdout.readline()  # type: ignore[union-attr]
    assert "plexus serving on" in line, f"the replica did not start: {line!r}"
    return process, line.strip().rsplit(" ", 1)[1]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    require_redis_server()
    redis = RedisServer()
    redis.start()
    peer = OpenAIPeer()

    def adjust(data: dict) -> None:
        data["server"]["state"] = {"kind": "redis", "url": redis.url}
        data["server"]["drain_delay_seconds"] = 0
        retail = data["tenants"]["retail"]
        retail["backends"]["reasoning-large"] = {
            "kind": "openai",
            "url": peer.url,
            "model": "big-model",
            "max_concurrency": 64,
            "retry": {"attempts": 1},
        }
        retail["policy"] = {
            "rules": [],
            "rate_limits": [
                {
                    "name": "per-user",
                    "per": "user",
                    "apps": ["store_ops"],
                    "requests": {"rate": 3, "per_seconds": 3600, "burst": 3},
                }
            ],
            "budgets": [],
            "on_state_error": "fail_closed",
        }

    root = tmp_path_factory.mktemp("replicas")
    loaded = context_config(root, adjust)
    ingest(loaded, "retail", "policies", [KNOWLEDGE / "disputes.txt"])
    train_tenant(loaded, "retail", seed=2)  # v0002, for the hot swap
    (root / "models" / "retail" / "ACTIVE").write_text("v0001\n")
    with ThreadPoolExecutor(REPLICAS) as pool:
        replicas = list(pool.map(lambda _: start_replica(loaded.path), range(REPLICAS)))
    addresses = [address for _, address in replicas]
    target = "ipv4:" + ",".join(addresses)
    channel = grpc.insecure_channel(target, options=[("grpc.lb_policy_name", "round_robin")])
    yield loaded, addresses, channel, peer
    channel.close()
    for process, _ in replicas:
        process.kill()
        process.wait()
    peer.close()
    redis.close()


def route(channel: grpc.Channel, app: str = "storefront", **metadata: str) -> pb.RouteDecision:
    request = pb.RouteRequest(app=app, text=DISPUTE, metadata=metadata)
    return pb_grpc.RouterStub(channel).Route(request, metadata=KEY, timeout=10)


def test_round_robin_reaches_every_replica(deployment):
    _, addresses, channel, _ = deployment
    # Each replica reports its own port in nothing a client sees; the balancing is shown by
    # the shared limit below. Here: every address answers on its own.
    for address in addresses:
        with grpc.insecure_channel(address) as own:
            assert route(own).route == "customer_dispute"
    assert route(channel).route == "customer_dispute"


def test_a_rate_limit_holds_across_replicas(deployment):
    _, _, channel, _ = deployment
    user = uuid.uuid4().hex
    outcomes = []
    for _ in range(3 * REPLICAS):
        try:
            route(channel, "store_ops", user=user)
            outcomes.append("OK")
        except grpc.RpcError as exc:
            outcomes.append(exc.code().name)
    assert outcomes.count("OK") == 3
    assert outcomes.count("RESOURCE_EXHAUSTED") == 3 * REPLICAS - 3


def test_a_budget_holds_across_replicas(deployment):
    loaded, addresses, channel, peer = deployment
    # Size the budget from one call's reservation: the estimate of the stitched prompt.
    from router.stages.budget import prompt_token_estimate

    reply = pb_grpc.RouterStub(channel).Stitch(
        pb.StitchRequest(request=pb.RouteRequest(app="case_desk", text=DISPUTE)),
        metadata=KEY,
        timeout=30,
    )
    per_call = prompt_token_estimate(reply.prompt) + MAX_TOKENS
    data = yaml.safe_load(loaded.path.read_text())
    data["tenants"]["retail"]["policy"]["budgets"] = [
        {"name": "five", "per": "user", "period": "day", "tokens": int(per_call * 5.5)}
    ]
    loaded.path.write_text(yaml.safe_dump(data))
    for address in addresses:  # every replica reads the same file
        with grpc.insecure_channel(address) as own:
            pb_grpc.AdminStub(own).ReloadConfig(
                pb.ReloadConfigRequest(), metadata=ADMIN, timeout=60
            )
    user = uuid.uuid4().hex
    start = threading.Barrier(64)

    def one(_: int) -> str:
        request = pb.OrchestrateRequest(
            request=pb.RouteRequest(app="case_desk", text=DISPUTE, metadata={"user": user}),
            max_tokens=MAX_TOKENS,
        )
        start.wait()
        try:
            events = list(
                pb_grpc.RouterStub(channel).Orchestrate(request, metadata=KEY, timeout=60)
            )
            return events[-1].WhichOneof("event")
        except grpc.RpcError as exc:
            return exc.code().name

    peer.behaviour = Behaviour(first_byte_delay=3.0)
    try:
        with ThreadPoolExecutor(64) as pool:
            outcomes = list(pool.map(one, range(64)))
    finally:
        peer.behaviour = Behaviour()
    assert outcomes.count("final") == 5
    assert outcomes.count("RESOURCE_EXHAUSTED") == 59


def test_a_hot_swap_on_one_replica_reaches_the_others_with_no_failed_request(deployment):
    loaded, addresses, channel, _ = deployment
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                route(channel)
            except grpc.RpcError as exc:
                failures.append(exc.code().name)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        with grpc.insecure_channel(addresses[0]) as first:
            status = pb_grpc.AdminStub(first).LoadModel(
                pb.LoadModelRequest(version="v0002", force=True), metadata=ADMIN, timeout=120
            )
        assert status.active_version == "v0002"
        started = time.monotonic()
        for address in addresses[1:]:
            with grpc.insecure_channel(address) as other:
                for _ in range(300):
                    if route(other).model_version == "v0002":
                        break
                    time.sleep(0.02)
                else:
                    pytest.fail(f"the replica at {address} still serves the old model")
        print(f"the swap reached the other replicas within {time.monotonic() - started:.2f}s")

        data = yaml.safe_load(loaded.path.read_text())
        data["tenants"]["retail"]["policy"]["rules"] = [
            {"name": "no-vip", "when": {"metadata": {"tier": ["vip"]}}, "then": {"deny": "no"}}
        ]
        loaded.path.write_text(yaml.safe_dump(data))
        with grpc.insecure_channel(addresses[0]) as first:
            pb_grpc.AdminStub(first).ReloadConfig(
                pb.ReloadConfigRequest(), metadata=ADMIN, timeout=60
            )
        for address in addresses[1:]:
            with grpc.insecure_channel(address) as other:
                for _ in range(300):
                    try:
                        route(other, tier="vip")
                    except grpc.RpcError as exc:
                        assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
                        break
                    time.sleep(0.02)
                else:
                    pytest.fail(f"the replica at {address} still serves the old rules")
    finally:
        stop.set()
        worker.join()
    assert failures == []
