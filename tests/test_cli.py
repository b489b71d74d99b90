"""The `plexus` command, run as a user runs it: help, train, route, models, serve + signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml

from router._generated.plexus.v1 import plexus_pb2 as pb
from router._generated.plexus.v1 import plexus_pb2_grpc as pb_grpc
from router.config import LoadedConfig

from .conftest import ADMIN_KEY, DEMO_KEY, ROOT, demo_config_data


def plexus(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "router.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["serve"],
        ["train"],
        ["route"],
        ["models"],
        ["ingest"],
        ["bench"],
        ["bench", "latency"],
        ["bench", "decision"],
        ["bench", "accuracy"],
        ["bench", "retrieval"],
        ["bench", "orchestrate"],
        ["demo"],
    ],
)
def test_help_on_every_command(command):
    result = plexus(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: plexus" in result.stdout


def test_train_route_and_models_on_disk(tmp_path: Path):
    data = demo_config_data(tmp_path / "models")
    del data["tenants"]["wholesale"]
    config = tmp_path / "plexus.yaml"
    config.write_text(yaml.safe_dump(data))
    trained = plexus("train", str(config), "--tenant", "retail")
    assert trained.returncode == 0, trained.stderr
    assert "retail: v0001 (fast)" in trained.stdout
    assert "inscope_accuracy=" in trained.stdout
    assert "fitting" in trained.stderr  # progress is shown
    routed = plexus(
        "route",
        str(config),
        "--app",
        "storefront",
        "--text",
        "where is my order? it has not arrived",
    )
    assert routed.returncode == 0, routed.stderr
    decision = json.loads(routed.stdout)
    assert decision["model_version"] == "v0001"
    assert decision["route"] == "order_status"
    listed = plexus("models", "list", str(config))
    assert listed.returncode == 0 and "* v0001" in listed.stdout
    missing = plexus("models", "load", str(config), "v0042")
    assert missing.returncode == 2 and "no model 'v0042'" in missing.stderr


def test_invalid_config_is_a_clear_error(tmp_path: Path):
    config = tmp_path / "bad.yaml"
    config.write_text("server: {port: 1}\ntenants: {}\n")
    result = plexus("train", str(config))
    assert result.returncode == 2
    assert "server.port: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def _start_server(config: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "serve", str(config), "--address", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    line = process.stdout.readline()
    assert "plexus serving on" in line, process.stderr.read()
    return process, line.strip().rsplit(" ", 1)[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_drains_on_signal_and_exits_zero(trained_config: LoadedConfig, sig):
    process, address = _start_server(trained_config.path)
    results: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.RouterStub(channel)
            while not stop.is_set():
                try:
                    stub.Route(
                        pb.RouteRequest(app="storefront", text="where is my order"),
                        metadata=(("x-api-key", DEMO_KEY),),
                        timeout=5,
                    )
                    results.append("OK")
                except grpc.RpcError as exc:
                    results.append(exc.code().name)
                    time.sleep(0.01)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        while results.count("OK") < 50:
            time.sleep(0.01)
        with grpc.insecure_channel(address) as channel:
            admin = pb_grpc.AdminStub(channel)
            reply = admin.ListModels(
                pb.ListModelsRequest(), metadata=(("x-api-key", ADMIN_KEY),), timeout=10
            )
            assert reply.models
        process.send_signal(sig)
        assert process.wait(timeout=30) == 0
    finally:
        stop.set()
        worker.join(timeout=10)
        if process.poll() is None:
            process.kill()
    # calls either completed or were refused once shutdown began (grpc core answers those
    # CANCELLED while stopping, UNAVAILABLE once the port is closed); none failed otherwise
    assert set(results) <= {"OK", "UNAVAILABLE", "CANCELLED"}, set(results)
    assert results.count("OK") >= 50
    assert "Traceback" not in process.stderr.read()
