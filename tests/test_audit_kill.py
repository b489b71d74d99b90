"""kill -9 under load, 20 times: every request whose answer reached the client is in the audit
trail, and the trail verifies.

A real ``plexus serve`` process takes Route and Orchestrate calls (local backends) from client
threads; at a random moment it is killed with SIGKILL, restarted on the same trail, and loaded
again. A torn last line left by a kill is cut on the next start; a request's response (or its
stream's final event) is only sent once its record is durable, so nothing acknowledged is lost.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from router._generated.plexus.v1 import plexus_pb2 as pb
from router._generated.plexus.v1 import plexus_pb2_grpc as pb_grpc
from router.observe.audit import read_records, verify

from .conftest import DEMO_KEY, ROOT
from .test_audit import audit_data, write_config

ROUNDS = 20
ROUTE_CLIENTS = 6
ORCHESTRATE_CLIENTS = 2
META = (("x-api-key", DEMO_KEY),)
TEXTS = [
    "where is my order 88123, it has not arrived",
    "is the red kettle in stock at store 1432?",
    "can I return headphones I opened?",
    "what time does store 77 close on sunday",
]


def start_server(config: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "serve", str(config), "--address", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    line = process.stdout.readline()
    if "plexus serving on" not in line:
        process.kill()
        pytest.fail(f"the server did not start: {line!r} {process.stderr.read()}")
    return process, line.strip().rsplit(" ", 1)[1]


class Load:
    """Client threads calling one server until told to stop; ``acked`` holds the request ids
    whose response (Route) or final event (Orchestrate) arrived."""

    def __init__(self, address: str, acked: list[str], lock: threading.Lock, seed: int):
        self.address = address
        self.acked = acked
        self.lock = lock
        self.stop = threading.Event()
        self.answered = 0
        self.threads = [
            threading.Thread(target=self._route, args=(seed + i,)) for i in range(ROUTE_CLIENTS)
        ] + [
            threading.Thread(target=self._orchestrate, args=(seed + 100 + i,))
            for i in range(ORCHESTRATE_CLIENTS)
        ]
        for thread in self.threads:
            thread.start()

    def _ack(self, request_id: str) -> None:
        with self.lock:
            self.acked.append(request_id)
            self.answered += 1

    def _route(self, seed: int) -> None:
        rng = random.Random(seed)
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.RouterStub(channel)
            while not self.stop.is_set():
                request_id = uuid.uuid4().hex
                request = pb.RouteRequest(
                    app="storefront", text=rng.choice(TEXTS), request_id=request_id
                )
                try:
                    stub.Route(request, metadata=META, timeout=5)
                except grpc.RpcError:
                    time.sleep(0.01)
                    continue
                self._ack(request_id)

    def _orchestrate(self, seed: int) -> None:
        rng = random.Random(seed)
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.RouterStub(channel)
            while not self.stop.is_set():
                request_id = uuid.uuid4().hex
                request = pb.OrchestrateRequest(
                    request=pb.RouteRequest(
                        app="storefront", text=rng.choice(TEXTS), request_id=request_id
                    )
                )
                try:
                    for event in stub.Orchestrate(request, metadata=META, timeout=5):
                        if event.WhichOneof("event") == "final":
                            self._ack(request_id)
                except grpc.RpcError:
                    time.sleep(0.01)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)


def test_kill_9_under_load_loses_no_acknowledged_record(tmp_path, trained_config):
    key = Ed25519PrivateKey.generate()
    (tmp_path / "audit-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    data = audit_data(tmp_path, trained_config, checkpoint_records=50, segment_bytes=65536)
    data["server"]["audit_key_file"] = "audit-key.pem"
    data["server"]["drain_delay_seconds"] = 0
    config = write_config(tmp_path, data).path
    folder = tmp_path / "audit" / "retail"
    rng = random.Random(99)
    acked: list[str] = []
    logs: list[str] = []
    lock = threading.Lock()
    for round_number in range(ROUNDS):
        process, address = start_server(config)
        load = Load(address, acked, lock, seed=round_number * 1000)
        try:
            wanted = rng.randrange(5, 60)  # a random moment: after some answers, mid-flight
            deadline = time.monotonic() + 60
            while load.answered < wanted and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.random() * 0.05)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            logs.append(process.stderr.read())
        finally:
            if process.poll() is None:
                process.kill()
            load.finish()
        assert load.answered >= wanted, f"round {round_number}: the server stopped answering"
    assert not [log for log in logs if "Traceback" in log], logs
    after_kills = verify(folder, "retail", key.public_key())
    assert after_kills.ok, str(after_kills.problem)
    # one clean start and stop: the torn tail (if any) is cut, the final checkpoint written
    process, address = start_server(config)
    with grpc.insecure_channel(address) as channel:  # serving, its signal handlers in place
        request = pb.RouteRequest(app="storefront", text=TEXTS[0], request_id="last")
        pb_grpc.RouterStub(channel).Route(request, metadata=META, timeout=30)
    acked.append("last")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    recorded = {r.get("request_id") for r in read_records(folder) if r["kind"] == "request"}
    missing = [request_id for request_id in acked if request_id not in recorded]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged requests are not audited"
    assert len(acked) >= ROUNDS * 5
    verified = subprocess.run(
        [sys.executable, "-m", "router.cli", "audit", "verify", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "retail: ok:" in verified.stdout and "0 records after it" in verified.stdout
