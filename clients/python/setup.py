"""The light client distribution, built from a Plexus checkout.

``plexus_client`` is ``router/client.py`` and the code protoc generates from ``protos/``, with
their imports rooted in this package instead of ``router``; nothing else of the server comes
along. Build it from the checkout: ``pip install ./clients/python``.
"""

from __future__ import annotations

import re
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent.resolve()
CHECKOUT = HERE.parents[1]
PACKAGE = "plexus_client"


def write_package(target: Path) -> None:
    """``target/plexus_client``: the client module and the generated code."""
    from grpc_tools import protoc

    package = target / PACKAGE
    generated = package / "_generated"
    generated.mkdir(parents=True, exist_ok=True)
    protos_root = CHECKOUT / "protos"
    protos = sorted(str(p.relative_to(protos_root)) for p in protos_root.rglob("*.proto"))
    args = [
        "protoc",
        f"-I{protos_root}",
        f"--python_out={generated}",
        f"--grpc_python_out={generated}",
    ]
    if protoc.main([*args, *protos]) != 0:
        raise RuntimeError(f"protoc failed on {protos}")
    for source in generated.rglob("*.py"):
        text = source.read_text()
        source.write_text(
            re.sub(r"^from plexus\.", f"from {PACKAGE}._generated.plexus.", text, flags=re.M)
        )
    for folder in [generated, *[p for p in generated.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()
    client = (CHECKOUT / "router" / "client.py").read_text()
    (package / "client.py").write_text(client.replace("router._generated", f"{PACKAGE}._generated"))


class BuildPackage(build_py):
    def run(self) -> None:
        super().run()
        write_package(Path(self.build_lib))


setup(packages=[PACKAGE], cmdclass={"build_py": BuildPackage})
