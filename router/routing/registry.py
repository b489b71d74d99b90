"""On-disk versions of each tenant's routing model.

Layout: ``MODEL_DIR/<tenant>/<version>.onnx`` with ``<version>.heldout.jsonl`` beside it (the
held-out examples a swap is checked on) and ``ACTIVE`` naming the version being served. Every
write goes to a temporary file first and is renamed into place.
"""

from __future__ import annotations

import logging
from pathlib import Path

from router.errors import shown
from router.files import (
    atomic_write,
    next_version,
    sorted_versions,
    sweep_stale_temporaries,
    version_number,
)
from router.routing.examples import Examples, read_examples

ACTIVE_FILE = "ACTIVE"
log = logging.getLogger("plexus.routing")


class RegistryError(LookupError):
    """A version that is not in the registry, or a registry that cannot be written."""


class ModelRegistry:
    """Versions ``v0001``, ``v0002``, ... of one tenant's models."""

    def __init__(self, root: Path, tenant: str):
        self.tenant = tenant
        self.directory = root / tenant
        if self.directory.is_dir():
            for leftover in sweep_stale_temporaries(self.directory):
                log.info("removed %s, left by an interrupted write", leftover.name)

    def versions(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted_versions(p.stem for p in self.directory.glob("v*.onnx"))

    def newest(self) -> str | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def path(self, version: str) -> Path:
        if version_number(version) is None:
            raise RegistryError(
                f"{shown(version)} is not a version name (expected v0001, v0002, ...)"
            )
        path = self.directory / f"{version}.onnx"
        if not path.is_file():
            raise RegistryError(
                f"tenant {self.tenant!r} has no model {version!r} "
                f"(have {self.versions() or 'none'})"
            )
        return path

    def heldout(self, version: str) -> Examples | None:
        path = self.directory / f"{version}.heldout.jsonl"
        return read_examples(path) if path.is_file() else None

    def add(self, model_bytes: bytes, heldout: Examples | None) -> str:
        """Store a new version (model file and its held-out set); returns its name."""
        version = next_version(self.versions())
        if heldout is not None:
            atomic_write(
                self.directory / f"{version}.heldout.jsonl", heldout.to_jsonl().encode("utf-8")
            )
        atomic_write(self.directory / f"{version}.onnx", model_bytes)
        return version

    def pinned(self) -> bool:
        """Whether ``ACTIVE`` names a version that exists (else ``active`` means the newest)."""
        pointer = self.directory / ACTIVE_FILE
        if not pointer.is_file():
            return False
        name = pointer.read_text(encoding="utf-8").strip()
        return version_number(name) is not None and (self.directory / f"{name}.onnx").is_file()

    def active(self) -> str | None:
        """The version named by ``ACTIVE``, else the newest."""
        pointer = self.directory / ACTIVE_FILE
        if pointer.is_file():
            name = pointer.read_text(encoding="utf-8").strip()
            if (self.directory / f"{name}.onnx").is_file():
                return name
        return self.newest()

    def set_active(self, version: str) -> None:
        self.path(version)
        atomic_write(self.directory / ACTIVE_FILE, f"{version}\n".encode())

    def resolve(self, wanted: str) -> str:
        """``active`` (pointer or newest), ``latest`` (newest) or an explicit version."""
        if wanted in ("active", "latest"):
            version = self.active() if wanted == "active" else self.newest()
            if version is None:
                raise RegistryError(
                    f"tenant {self.tenant!r} has no trained model in {self.directory}; "
                    f"run `plexus train CONFIG --tenant {self.tenant}` first"
                )
            return version
        self.path(wanted)
        return wanted
