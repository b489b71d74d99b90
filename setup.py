"""Build steps that pyproject.toml cannot declare: Cython extensions and gRPC code generation.

The extensions are compiled from ``native/`` into ``router._native``; their C-level declarations
(``.pxd``) and Python stubs (``.pyi``) live in ``router/_native/``, where Cython looks for a
module's ``.pxd`` (by package path) and where other extensions can ``cimport`` them. The
protobuf and gRPC modules are generated from ``protos/plexus/v1`` into ``router._generated``
(never committed).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

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
    # Only the sources protoc wrote: a rebuild finds compiled __pycache__ files here too.
    for generated in [*out_dir.rglob("*.py"), *out_dir.rglob("*.pyi")]:
        text = generated.read_text()
        # protoc writes absolute imports rooted at the proto path; root them in our package.
        fixed = re.sub(r"^from plexus\.", f"from {prefix}.plexus.", text, flags=re.M)
        if fixed != text:
            generated.write_text(fixed)
    packages = [p for p in out_dir.rglob("*") if p.is_dir() and p.name != "__pycache__"]
    for package_dir in [out_dir, *packages]:
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


NATIVE_PACKAGE = ROOT / "router" / "_native"


def native_extension(name: str, *compile_args: str, **kwargs: Any) -> Extension:
    """``native/<name>.pyx`` built as ``router._native.<name>``, declared by its ``.pxd``."""
    source = ROOT / "native" / f"{name}.pyx"
    declarations = NATIVE_PACKAGE / f"{name}.pxd"
    generated = source.with_suffix(".c")
    # cythonize tracks a .pxd only beside its .pyx, so it would keep C generated before the
    # declarations changed; drop such C to have it generated again.
    if generated.exists() and declarations.stat().st_mtime > generated.stat().st_mtime:
        generated.unlink()
    return Extension(
        f"router._native.{name}",
        [str(source.relative_to(ROOT))],
        depends=[str(declarations.relative_to(ROOT))],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3", *compile_args],
        **kwargs,
    )


extensions = [
    native_extension("featurizer", include_dirs=[numpy.get_include()]),
    # no fused multiply-add: an int8 row times its scale must round as the ONNX graph's Mul does
    native_extension("linear_head", "-ffp-contract=off"),
    native_extension("pii"),
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=[str(ROOT)],
        language_level="3",
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
    package_data={"router._native": ["*.pxd", "*.pyi"]},
    cmdclass={"build_py": BuildPyWithProtos},
)
