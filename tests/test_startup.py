"""Start-up: a fast-family server without collections loads no encoder, onnx or scikit-learn."""

from __future__ import annotations

import subprocess
import sys

import yaml

from router.config import LoadedConfig

from .conftest import ROOT

PROBE = """
import asyncio, sys
from router.config import load_config
from router.plexus import Plexus

async def main():
    plexus = Plexus(load_config(sys.argv[1]))
    await plexus.warm()
    await plexus.aclose()

asyncio.run(main())
print(sorted(m for m in ("onnx", "sklearn", "scipy") if m in sys.modules))
print(sorted(m for m in sys.modules if m.startswith("router.routing.training")))
"""


def test_a_fast_only_server_loads_only_what_it_serves(trained_config: LoadedConfig, tmp_path):
    data = yaml.safe_load(trained_config.path.read_text())
    for tenant in data["tenants"].values():
        tenant["model"]["family"] = "fast"
        for key in ("collections", "sql_mirrors"):
            tenant.pop(key, None)
        for route in tenant["routes"]:
            route.pop("context", None)
    data["tenants"].pop("wholesale")  # an accurate-family tenant
    config = tmp_path / "plexus.yaml"
    config.write_text(yaml.safe_dump(data))
    run = lambda: subprocess.run(  # noqa: E731
        [sys.executable, "-c", PROBE, str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={"PLEXUS_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"},
    )
    first = run()  # the first start parses each model file once and caches its head
    assert first.returncode == 0, first.stderr
    second = run()
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == ["[]", "[]"], second.stdout
