"""The light client distribution (clients/python): built from this checkout, it talks to a real
server while importing nothing of the server package or its dependencies."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from .conftest import DEMO_KEY, ROOT, RunningServer

PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
import plexus_client
with plexus_client.PlexusClient(sys.argv[2], sys.argv[3]) as client:
    decision = client.route("storefront", "where is my order, it was due yesterday")
print(decision.route, decision.model_version)
heavy = ("router", "numpy", "onnxruntime", "faiss", "sklearn", "scipy", "pydantic", "tokenizers")
print(sorted(m for m in heavy if m in sys.modules))
"""


def test_the_light_client_is_built_and_talks_to_a_server(server: RunningServer, tmp_path: Path):
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "wheel")]
        + [str(ROOT / "clients" / "python")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("plexus_client-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "plexus_client/client.py" in names
    assert "plexus_client/_generated/plexus/v1/plexus_pb2_grpc.py" in names
    assert not any(name.startswith("router/") for name in names)
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "site"), server.address, DEMO_KEY],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # not the checkout: `router` must not be importable from here by accident
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    route_line, loaded = probe.stdout.splitlines()
    assert route_line.split()[1].startswith("v")
    assert loaded == "[]"
