"""Draining on SIGTERM: a call the server accepted before the signal is answered."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import yaml

from router._generated.plexus.v1 import plexus_pb2 as pb
from router._generated.plexus.v1 import plexus_pb2_grpc as pb_grpc
from router.config import LoadedConfig

from .conftest import DEMO_KEY, ROOT


def test_calls_sent_just_before_sigterm_are_answered(trained_config: LoadedConfig, tmp_path):
    data = yaml.safe_load(trained_config.path.read_text())
    data["server"]["grace_seconds"] = 5
    config = tmp_path / "plexus.yaml"
    config.write_text(yaml.safe_dump(data))
    process = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "serve", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = process.stdout.readline()
        assert "plexus serving on" in line, process.stderr.read()
        address = line.strip().rsplit(" ", 1)[1]
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.RouterStub(channel)
            request = pb.RouteRequest(app="storefront", text="where is my order")
            meta = (("x-api-key", DEMO_KEY),)
            stub.Route(request, metadata=meta, timeout=10)  # connected and warm
            for _ in range(3):
                calls = [stub.Route.future(request, metadata=meta, timeout=10) for _ in range(24)]
                if _ == 2:
                    process.send_signal(signal.SIGTERM)
                codes = []
                for call in calls:
                    try:
                        call.result()
                        codes.append("OK")
                    except grpc.RpcError as exc:
                        codes.append(exc.code().name)
                assert codes == ["OK"] * len(calls), codes
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in process.stderr.read()
    assert Path(config).exists()
