"""Build steps that pyproject.toml cannot declare: Cython extensions and gRPC code generation.

The extensions are compiled from ``native/`` into ``router._native``; the protobuf and gRPC
modules are generated from ``protos/plexus/v1`` into ``router._generated`` (never committed).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
PROTO_ROOT = ROOT / "protos"
GENERATED_PACKAGE = ("router", "_generated")


def generate_protos(out_dir: Path) -> None:
    """Run protoc on every .proto under protos/, writing a package rooted at ``out_dir``."""
    from grpc_tools import protoc

    try:
        import importlib.resources as resources

        well_known = str(resources.files("grpc_tools") / "_proto")
    except Exception:  # pragma: no cover - very old grpc_tools
        well_known = ""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
    ]
    if well_known:
        args.append(f"-I{well_known}")
    if protoc.main([*args, *protos]) != 0:
        raise RuntimeError(f"protoc failed on {protos}")
    prefix = ".".join(GENERATED_PACKAGE)
    for generated in out_dir.rglob("*.py*"):
        text = generated.read_text()
        # protoc writes absolute imports rooted at the proto path; root them in our package.
        fixed = re.sub(r"^from plexus\.", f"from {prefix}.plexus.", text, flags=re.M)
        if fixed != text:
            generated.write_text(fixed)
    for package_dir in [out_dir, *[p for p in out_dir.rglob("*") if p.is_dir()]]:
        (package_dir / "__init__.py").touch()


class BuildPyWithProtos(build_py):
    """build_py that also generates the gRPC code (in place for editable installs)."""

    def run(self) -> None:
        if getattr(self, "editable_mode", False):
            target = ROOT.joinpath(*GENERATED_PACKAGE)
        else:
            target = Path(self.build_lib).joinpath(*GENERATED_PACKAGE)
        generate_protos(target)
        super().run()


extensions = [
    Extension(
        "router._native.featurizer",
        ["native/featurizer.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
    ),
    Extension(
        "router._native.linear_head",
        ["native/linear_head.pyx"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level="3",
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
    cmdclass={"build_py": BuildPyWithProtos},
)
