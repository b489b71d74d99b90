"""Bundles: export, import elsewhere, the same decisions and context; tampering, interruption,
secrets, partial and historical bundles, keys, the CLI and ``serve --bundle``."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
import zstandard
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.bundle import (
    BUNDLE_KEY_ENV,
    CONFIG_NAME,
    MANIFEST_NAME,
    SIGNATURE_NAME,
    BundleError,
    apply_server_config,
    check_bundle,
    check_member_path,
    encode_manifest,
    encoder_identity,
    export_bundle,
    import_bundle,
    key_id,
    load_private_key,
    load_public_key,
    new_signing_key,
    signing_key_from,
    trailer,
    verify_deployment,
    written_since_import,
)
from router.calls import RouteQuery
from router.cli import main
from router.config import LoadedConfig, load_config
from router.context.ingest import ingest
from router.errors import FailedPrecondition
from router.plexus import Plexus
from router.routing.registry import ModelRegistry
from router.routing.tenant_training import train_tenant

from .conftest import DEMO_KEY, KNOWLEDGE, OTHER_TENANT_KEY, ROOT, context_config

# --------------------------------------------------------------------------------------------
# fixtures: a trained, ingested deployment; a key pair; its bundle; the bundle imported


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> LoadedConfig:
    """Retail (fast family, two versions, ACTIVE on the older, collections, SQL mirror and an
    injection guard) and wholesale (accurate family: the sentence encoder)."""

    def adjust(data: dict) -> None:
        data["tenants"]["retail"]["governance"] = {"injection": {"action": "flag"}}

    loaded = context_config(tmp_path_factory.mktemp("bundle-source"), adjust)
    policies = ["returns.md", "loyalty.md", "shipping.html", "disputes.txt"]
    ingest(loaded, "retail", "policies", [KNOWLEDGE / name for name in policies])
    ingest(loaded, "retail", "products", [KNOWLEDGE / "products.jsonl"])
    train_tenant(loaded, "retail", seed=2)
    ModelRegistry(loaded.model_dir, "retail").set_active("v0001")
    return loaded


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("bundle-keys")
    new_signing_key(folder / "bundle.key", folder / "bundle.pub")
    return folder / "bundle.key", folder / "bundle.pub"


@pytest.fixture(scope="module")
def bundle(
    source: LoadedConfig, keys: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("bundle-out") / "retail.plexus"
    export_bundle(source, out, with_mirrors=True, signing_key=signing_key_from(keys[0]))
    return out


@pytest.fixture(scope="module")
def public_key(keys: tuple[Path, Path]):  # type: ignore[no-untyped-def]
    return load_public_key(keys[1].read_bytes())


@pytest.fixture(scope="module")
def imported(bundle: Path, public_key, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    target = tmp_path_factory.mktemp("bundle-elsewhere") / "deployment"
    report = import_bundle(bundle, target, public_key=public_key)
    assert report.verified and report.signed
    return target


def queries(loaded: LoadedConfig, count: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """``count`` (tenant, app, text): route examples, recombined and cut, and unrelated text."""
    rng = random.Random(seed)
    plans = [("retail", "storefront"), ("retail", "store_ops"), ("wholesale", "buyers")]
    out = []
    while len(out) < count:
        tenant, app = plans[0] if rng.random() < 0.7 else rng.choice(plans)
        examples = [e for r in loaded.config.tenants[tenant].routes for e in r.examples]
        words = " ".join(rng.sample(examples, 2)).split()
        text = " ".join(words[: rng.randint(1, len(words))])
        if rng.random() < 0.1:
            text = f"{rng.choice(['zebra', 'quantum', 'violin', 'glacier'])} {rng.randint(0, 999)}"
        out.append((tenant, app, text))
    return out


async def decisions(config: Path | LoadedConfig, asked: list[tuple[str, str, str]]) -> list:
    loaded = config if isinstance(config, LoadedConfig) else load_config(config)
    plexus = Plexus(loaded)
    keys = {"retail": DEMO_KEY, "wholesale": OTHER_TENANT_KEY}
    callers = {t: plexus.keys.authenticate(keys[t]) for t in loaded.config.tenants}
    try:
        return [
            await plexus.pipeline.route(callers[tenant], RouteQuery(app, text))
            for tenant, app, text in asked
        ]
    finally:
        await plexus.aclose()


STITCHED = [
    ("is the TrailRunner 5 in stock at store 1432?", {"store_id": "1432"}),
    ("what time does store 77 close on sunday", {}),
    ("can I return headphones I opened?", {}),
    ("you charged my card twice for order 7781204", {}),
    ("how many points do I need for gold tier", {}),
    ("is the kettle dishwasher safe", {}),
    ("where is my order 88123", {}),
]


async def stitched(config: Path | LoadedConfig) -> list[tuple]:
    loaded = config if isinstance(config, LoadedConfig) else load_config(config)
    plexus = Plexus(loaded)
    caller = plexus.keys.authenticate(DEMO_KEY)
    try:
        out = []
        for text, metadata in STITCHED:
            result = await plexus.pipeline.stitch(caller, RouteQuery("storefront", text, metadata))
            out.append(
                (
                    result.decision.route,
                    result.assembly.prompt,
                    [dataclasses.asdict(p) for p in result.assembly.placed],
                )
            )
        return out
    finally:
        await plexus.aclose()


# --------------------------------------------------------------------------------------------
# the round trip


async def test_imported_elsewhere_decides_and_stitches_as_the_source(
    source: LoadedConfig, imported: Path
) -> None:
    text = (imported / CONFIG_NAME).read_text()
    assert str(source.base_dir) not in text  # nothing ties the copy to the source's folders
    asked = queries(source, 1000)
    before = await decisions(source, asked)
    after = await decisions(imported / CONFIG_NAME, asked)
    assert len(before) == len(after) == 1000
    assert {d.model_version for d in before if d.route} >= {"v0001"}
    for (tenant, _, query), old, new in zip(asked, before, after, strict=True):
        assert (new.route, new.model_version, new.abstained) == (
            old.route,
            old.model_version,
            old.abstained,
        ), (tenant, query)
        assert new.confidence == pytest.approx(old.confidence, abs=1e-6)
        assert [a.route for a in new.alternatives] == [a.route for a in old.alternatives]
    assert {
        d.model_version for d, (t, _, _) in zip(before, asked, strict=True) if t == "retail"
    } == {"v0001"}  # ACTIVE, not the newest
    old_context, new_context = await stitched(source), await stitched(imported / CONFIG_NAME)
    assert new_context == old_context
    kinds = {piece["piece"]["kind"] for _, _, placed in new_context for piece in placed}
    assert {"sql", "collection"} <= kinds  # the mirror and both collections came along


def test_manifest_lists_every_file_with_its_checksum(imported: Path, bundle: Path) -> None:
    manifest = verify_deployment(imported, strict=False)  # serving it may have added audit trails
    data = manifest.data
    assert data["format"] == "plexus-bundle" and data["format_version"] == 1
    assert data["plexus_version"] and re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", data["created_at"]
    )
    assert data["encoder"] == encoder_identity()
    assert manifest.tenants == ["retail", "wholesale"]
    retail = data["tenants"]["retail"]
    assert retail["model_version"] == "v0001" and retail["model_versions"] == ["v0001"]
    assert set(retail["collections"]) == {"policies", "products"}
    assert retail["sql_mirrors"] == {"stores": "included"}
    paths = {entry.path for entry in manifest.files}
    assert "models/retail/v0002.onnx" not in paths  # the served version only, without history
    assert (imported / "models" / "retail" / "ACTIVE").read_text().strip() == "v0001"
    assert "guards/retail/injection-guard.onnx" in paths
    loaded = load_config(imported / CONFIG_NAME)
    injection = loaded.config.tenants["retail"].governance.injection
    assert injection is not None and loaded.resolve(injection.model).is_file()  # type: ignore[arg-type]
    # the bundle is a plain tar inside zstd: standard tools can read it
    with tarfile.open(fileobj=io.BytesIO(_inflate(bundle.read_bytes()))) as tar:
        names = tar.getnames()
    assert names[:2] == [MANIFEST_NAME, SIGNATURE_NAME] and set(names[2:]) == paths
    assert bundle.stat().st_mode & 0o777 == 0o644  # readable by a container's own user


def test_partial_bundle_moves_one_tenant(source: LoadedConfig, tmp_path: Path) -> None:
    out = tmp_path / "wholesale.plexus"
    report = export_bundle(source, out, tenants=["wholesale"])
    assert report.tenants == ["wholesale"] and not report.signed
    landed = import_bundle(out, tmp_path / "wholesale")
    assert landed.tenants == ["wholesale"] and not landed.verified
    loaded = load_config(landed.config)
    assert list(loaded.config.tenants) == ["wholesale"]
    files = {e.path for e in verify_deployment(landed.path).files}
    assert all(not p.startswith(("models/retail", "data/retail")) for p in files)
    asked = [q for q in queries(source, 300, seed=3) if q[0] == "wholesale"]
    old = asyncio.run(decisions(source, asked))
    new = asyncio.run(decisions(landed.config, asked))
    assert [(d.route, round(d.confidence, 6)) for d in new] == [
        (d.route, round(d.confidence, 6)) for d in old
    ]
    with pytest.raises(Exception, match="no tenant 'nobody'"):
        export_bundle(source, tmp_path / "x.plexus", tenants=["nobody"])


def test_history_carries_every_version_and_keeps_active(
    source: LoadedConfig, tmp_path: Path
) -> None:
    out = tmp_path / "history.plexus"
    report = export_bundle(source, out, history=True, tenants=["retail"])
    assert report.manifest["tenants"]["retail"]["model_versions"] == ["v0001", "v0002"]
    landed = import_bundle(out, tmp_path / "history")
    registry = ModelRegistry(load_config(landed.config).model_dir, "retail")
    assert registry.versions() == ["v0001", "v0002"] and registry.active() == "v0001"
    assert (landed.path / "models/retail/v0002.heldout.jsonl").is_file()


def test_mirrors_only_with_the_flag(source: LoadedConfig, tmp_path: Path) -> None:
    report = export_bundle(source, tmp_path / "plain.plexus", tenants=["retail"])
    assert report.manifest["tenants"]["retail"]["sql_mirrors"] == {"stores": "not included"}
    assert not any(f["path"].startswith("mirrors/") for f in report.manifest["files"])
    landed = import_bundle(tmp_path / "plain.plexus", tmp_path / "plain")
    url = load_config(landed.config).config.tenants["retail"].sql_mirrors["stores"].url
    assert url == source.config.tenants["retail"].sql_mirrors["stores"].url  # left as it was
    with_mirrors = export_bundle(
        source, tmp_path / "m.plexus", tenants=["retail"], with_mirrors=True
    )
    assert "mirrors/retail/stores.sqlite" in {f["path"] for f in with_mirrors.manifest["files"]}


# --------------------------------------------------------------------------------------------
# secrets


def test_secrets_never_go_in(
    source: LoadedConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "sk-" + base64.b32encode(os.urandom(20)).decode()
    tls_key = (
        "-----BEGIN PRIVATE KEY-----\nTLSKEYMATERIAL" + secret[:8] + "\n-----END PRIVATE KEY-----\n"
    )
    (tmp_path / "server.key").write_text(tls_key)
    (tmp_path / "server.crt").write_text("certificate")
    data = yaml.safe_load(source.path.read_text())
    data["server"]["tls"] = {"cert": "server.crt", "key": "server.key"}
    data["tenants"]["retail"]["backends"]["reasoning-large"] = {
        "kind": "openai",
        "url": "http://127.0.0.1:9/v1",
        "model": "m",
        "api_key_env": "PLEXUS_TEST_LLM_KEY",
    }
    config = tmp_path / "plexus.yaml"
    config.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("PLEXUS_TEST_LLM_KEY", secret)
    report = export_bundle(config, tmp_path / "s.plexus", with_mirrors=True)
    assert any("server.tls" in note for note in report.notes)
    raw = (tmp_path / "s.plexus").read_bytes()
    content = _inflate(raw)
    for needle in (secret, "TLSKEYMATERIAL"):
        assert needle.encode() not in raw and needle.encode() not in content
    landed = load_config(import_bundle(tmp_path / "s.plexus", tmp_path / "s").config)
    assert landed.config.server.tls is None
    backend = landed.config.tenants["retail"].backends["reasoning-large"]
    assert backend.api_key_env == "PLEXUS_TEST_LLM_KEY"  # a reference, as in the source
    assert {k.sha256 for k in landed.config.tenants["retail"].api_keys} == {
        k.sha256 for k in source.config.tenants["retail"].api_keys
    }
    data["tenants"]["retail"]["sql_mirrors"]["stores"]["url"] = "postgresql://u:hunter2@db/x"
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(BundleError, match="holds a password"):
        export_bundle(config, tmp_path / "p.plexus")
    assert not (tmp_path / "p.plexus").exists()


# --------------------------------------------------------------------------------------------
# tampering: always refused, nothing written


def _inflate(raw: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompressobj().decompress(raw)


def _members(raw: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(_inflate(raw))) as tar:
        return [
            (m, tar.extractfile(m).read() if m.isreg() else b"")  # type: ignore[union-attr]
            for m in tar.getmembers()
        ]


def _pack(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    """A bundle container around ``members``, with a correct zstd frame and trailer: only the
    checks of what is inside can refuse it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    body = zstandard.ZstdCompressor(write_checksum=True).compress(buffer.getvalue())
    import hashlib

    return body + trailer(hashlib.sha256(body).digest())


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info, b""


def _manifest(members: list[tuple[tarfile.TarInfo, bytes]]) -> dict:
    return json.loads(members[0][1])


def _resigned(members, data: dict, key: Ed25519PrivateKey | None):  # type: ignore[no-untyped-def]
    raw = encode_manifest(data)
    out = [_file(MANIFEST_NAME, raw)]
    if key is not None:
        out.append(_file(SIGNATURE_NAME, key.sign(raw)))
    return out + [(i, d) for i, d in members if i.name not in (MANIFEST_NAME, SIGNATURE_NAME)]


def _body(members):  # type: ignore[no-untyped-def]
    return [(i, d) for i, d in members if i.name not in (MANIFEST_NAME, SIGNATURE_NAME)]


def _tamperings(raw: bytes, secret: Ed25519PrivateKey) -> dict[str, tuple[bytes, bool]]:
    """name -> (tampered bundle, whether it is refused even without a public key)."""
    members = _members(raw)
    manifest = _manifest(members)
    body = _body(members)
    heads = members[:2]
    other = Ed25519PrivateKey.generate()
    onnx = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".onnx"))
    sqlite = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".sqlite"))
    swapped = list(members)
    swapped[onnx] = (members[onnx][0], members[sqlite][1])
    swapped[sqlite] = (members[sqlite][0], members[onnx][1])
    edited = dict(manifest, tenants={**manifest["tenants"], "ghost": {}})
    forged_files = [dict(f) for f in manifest["files"]]
    config_at = next(i for i, f in enumerate(forged_files) if f["path"] == CONFIG_NAME)
    evil_config = members[[m.name for m, _ in members].index(CONFIG_NAME)][1].replace(
        b"model_dir: models", b"model_dir: /etc"
    )
    import hashlib

    forged_files[config_at] = {
        "path": CONFIG_NAME,
        "sha256": hashlib.sha256(evil_config).hexdigest(),
        "size": len(evil_config),
    }
    forged = [
        (i, evil_config if i.name == CONFIG_NAME else d)
        for i, d in _resigned(members, dict(manifest, files=forged_files), None)
    ]
    listed_traversal = dict(
        manifest, files=[*manifest["files"], {"path": "../evil", "sha256": "0" * 64, "size": 1}]
    )
    cases = {
        "removed file": (_pack([*heads, *body[:3], *body[4:]]), True),
        "swapped files": (_pack(swapped), True),
        "edited manifest": (_pack(_resigned(members, edited, None)), False),
        "manifest signed by another key": (_pack(_resigned(members, edited, other)), False),
        "consistent forgery, unsigned": (_pack(forged), False),
        "consistent forgery, signed by another key": (
            _pack(
                [(i, d) for i, d in forged if i.name != SIGNATURE_NAME][:1]
                + [_file(SIGNATURE_NAME, other.sign(forged[0][1]))]
                + forged[1:]
            ),
            False,
        ),
        "added file (unlisted)": (_pack([*members, _file("models/retail/extra.onnx", b"x")]), True),
        "added file at the root": (_pack([*members, _file("evil.sh", b"rm -rf /")]), True),
        "path traversal member": (_pack([*members, _file("../outside", b"x")]), True),
        "absolute path member": (_pack([*members, _file("/tmp/outside", b"x")]), True),
        "traversal listed in the manifest": (
            _pack(_resigned(members, listed_traversal, secret)),
            True,
        ),
        "symlink member": (
            _pack(
                [
                    *heads,
                    *[
                        (
                            _special(i.name, tarfile.SYMTYPE, "/etc/passwd")
                            if i.name == CONFIG_NAME
                            else (i, d)
                        )
                        for i, d in body
                    ],
                ]
            ),
            True,
        ),
        "hard link member": (
            _pack(
                [
                    *heads,
                    *[
                        (
                            _special(i.name, tarfile.LNKTYPE, MANIFEST_NAME)
                            if i.name == CONFIG_NAME
                            else (i, d)
                        )
                        for i, d in body
                    ],
                ]
            ),
            True,
        ),
        "directory member": (
            _pack([*members[:2], _special("models", tarfile.DIRTYPE), *body]),
            True,
        ),
        "fifo member": (_pack([*members, _special("models/retail/pipe", tarfile.FIFOTYPE)]), True),
        "duplicate member": (_pack([*members, body[0]]), True),
        "manifest not first": (_pack([*body[:1], *heads, *body[1:]]), True),
        "no manifest": (_pack(body), True),
        "truncated to the manifest": (_pack(heads), True),
        "data after the end": (raw + b"\x00" * 7, True),
        "two bundles": (raw + raw, True),
        "not a bundle": (b"hello world\n" * 50, True),
        "empty": (b"", True),
    }
    return cases


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_every_tampering_is_refused_and_writes_nothing(
    bundle: Path,
    keys: tuple[Path, Path],
    public_key,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    secret = load_private_key(keys[0].read_bytes())
    raw = bundle.read_bytes()
    (tmp_path / "keep").mkdir()
    for name, (tampered, without_key) in _tamperings(raw, secret).items():
        path = tmp_path / "t.plexus"
        path.write_bytes(tampered)
        before = _listing(tmp_path)
        attempts = [public_key, None] if without_key else [public_key]
        for key in attempts:
            with pytest.raises(BundleError) as refused:
                import_bundle(path, tmp_path / "target", public_key=key)
            assert str(refused.value), name
            assert _listing(tmp_path) == before, f"{name}: something was written"
    # the untouched bundle still imports: the refusals above were about the tampering
    import_bundle(bundle, tmp_path / "target", public_key=public_key)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_a_flipped_byte_anywhere_is_refused(
    bundle: Path, tmp_path: Path, data: st.DataObject
) -> None:
    raw = bytearray(bundle.read_bytes())
    at = data.draw(st.integers(0, len(raw) - 1), label="offset")
    raw[at] ^= data.draw(st.integers(1, 255), label="xor")
    path = tmp_path / f"flip-{at}.plexus"
    path.write_bytes(bytes(raw))
    target = tmp_path / f"flip-{at}"
    with pytest.raises(BundleError):
        import_bundle(path, target)
    assert not target.exists() and not list(tmp_path.glob(".flip-*"))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_a_truncated_bundle_is_refused(bundle: Path, tmp_path: Path, data: st.DataObject) -> None:
    raw = bundle.read_bytes()
    cut = data.draw(
        st.one_of(st.integers(0, len(raw) - 1), st.integers(len(raw) - 64, len(raw) - 1))
    )
    path = tmp_path / f"cut-{cut}.plexus"
    path.write_bytes(raw[:cut])
    with pytest.raises(BundleError):
        import_bundle(path, tmp_path / f"cut-{cut}")
    assert not (tmp_path / f"cut-{cut}").exists()


def test_size_bounds(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="more than the 1000 this import accepts"):
        import_bundle(bundle, tmp_path / "small", max_bytes=1000)
    members = _members(bundle.read_bytes())
    manifest = _manifest(members)
    files = [
        dict(f, size=f["size"] - 1) if f["path"] == CONFIG_NAME else f for f in manifest["files"]
    ]
    path = tmp_path / "size.plexus"
    path.write_bytes(_pack(_resigned(members, dict(manifest, files=files), None)))
    with pytest.raises(BundleError, match="its manifest says"):
        import_bundle(path, tmp_path / "size")
    assert not (tmp_path / "size").exists()


@settings(max_examples=200, deadline=None)
@given(
    st.text(max_size=60)
    | st.builds(
        "/".join,
        st.lists(
            st.sampled_from(["models", "..", ".", "", "a", ".x", "v0001.onnx", "data"]), max_size=4
        ),
    )
)
def test_member_paths_are_safe_or_refused(path: str) -> None:
    try:
        checked = check_member_path(path)
    except BundleError:
        return
    parts = checked.split("/")
    assert (
        not checked.startswith("/") and ".." not in parts and "." not in parts and "" not in parts
    )
    assert all(not part.startswith(".") for part in parts) and "\\" not in checked
    assert checked == CONFIG_NAME or parts[0] in ("models", "data", "guards", "training", "mirrors")


# --------------------------------------------------------------------------------------------
# the target: refused, replaced, interrupted


def test_a_non_empty_target_needs_replace(bundle: Path, tmp_path: Path) -> None:
    target = tmp_path / "deployment"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FailedPrecondition, match="not empty"):
        import_bundle(bundle, target)
    with pytest.raises(FailedPrecondition, match="not an imported Plexus deployment"):
        import_bundle(bundle, target, replace=True)
    assert _listing(target) == ["notes.txt"]
    fresh = tmp_path / "fresh"
    fresh.mkdir()  # an empty folder is fine
    import_bundle(bundle, fresh)
    (fresh / "models" / "retail" / "ACTIVE").write_text("v0009\n")
    report = import_bundle(bundle, fresh, replace=True)
    verify_deployment(report.path)
    assert (fresh / "models" / "retail" / "ACTIVE").read_text() == "v0001\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deployment", "fresh"]


def _big_bundle(source: LoadedConfig, folder: Path) -> Path:
    """The wholesale tenant with 24 MB of training examples: an import long enough to kill."""
    rng = random.Random(5)
    examples = folder / "examples.jsonl"
    with examples.open("w") as handle:
        for i in range(120_000):
            words = " ".join(f"{rng.getrandbits(40):x}" for _ in range(16))
            handle.write(json.dumps({"text": f"{i} {words}", "label": "other"}) + "\n")
    data = yaml.safe_load(source.path.read_text())
    data["tenants"]["wholesale"]["model"]["data"] = str(examples)
    config = folder / "plexus.yaml"
    config.write_text(yaml.safe_dump(data))
    return export_bundle(config, folder / "big.plexus", tenants=["wholesale"]).path


def test_an_import_killed_at_any_moment_leaves_nothing_half_written(
    source: LoadedConfig, tmp_path: Path
) -> None:
    bundle = _big_bundle(source, tmp_path)
    command = [sys.executable, "-m", "router.cli", "import", str(bundle), "--into"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    subprocess.run([*command, str(tmp_path / "whole")], env=env, check=True, capture_output=True)
    span = time.monotonic() - started  # kill moments are spread over one whole run
    verify_deployment(tmp_path / "whole")
    rng = random.Random(11)
    outcomes = []
    for attempt in range(8):
        target = tmp_path / f"killed-{attempt}"
        process = subprocess.Popen(
            [*command, str(target)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(rng.uniform(0.3, 1.0) * span)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if target.exists():
            verify_deployment(target)  # complete, and it verifies
            outcomes.append("complete")
        else:
            outcomes.append("absent")
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".killed-{attempt}")]
        assert all(".import-" in name for name in leftovers)  # hidden, never the target
        if leftovers:
            outcomes[-1] += " (killed mid-write)"
        # importing again over the debris works
        import_bundle(bundle, target, replace=target.exists())
        verify_deployment(target)
    print("kill outcomes:", outcomes)


# --------------------------------------------------------------------------------------------
# keys and server settings


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.sampled_from(["raw", "hex", "base64", "pem"]))
def test_keys_load_in_every_form(seed: bytes, form: str) -> None:
    private = Ed25519PrivateKey.from_private_bytes(seed)
    raw_public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    encode: dict[str, Callable[[bytes], bytes]] = {
        "raw": lambda b: b,
        "hex": lambda b: b.hex().encode() + b"\n",
        "base64": lambda b: base64.b64encode(b) + b"\n",
    }
    if form == "pem":
        secret = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        public = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        secret, public = encode[form](seed), encode[form](raw_public)
    signature = load_private_key(secret).sign(b"manifest")
    load_public_key(public).verify(signature, b"manifest")
    assert key_id(load_public_key(public)) == key_id(private.public_key())


def test_key_errors_and_the_environment(tmp_path: Path) -> None:
    for bad in [
        b"",
        b"not a key",
        b"-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----\n",
        b"ab" * 31,
    ]:
        with pytest.raises(BundleError):
            load_private_key(bad)
        with pytest.raises(BundleError):
            load_public_key(bad)
    with pytest.raises(BundleError, match="cannot read"):
        signing_key_from(tmp_path / "missing.key")
    seed = os.urandom(32)
    key = signing_key_from(None, {BUNDLE_KEY_ENV: seed.hex()})
    assert key is not None and key_id(key.public_key()) == key_id(
        Ed25519PrivateKey.from_private_bytes(seed).public_key()
    )
    assert signing_key_from(None, {}) is None


def test_server_config_over_a_bundle(imported: Path, tmp_path: Path) -> None:
    server = tmp_path / "server.yaml"
    server.write_text(
        "server:\n  address: 0.0.0.0:50051\n  grace_seconds: 20\n"
        "  state: {kind: redis, url: 'redis://plexus-redis:6379/0'}\n"
        "  tls: {cert: tls/tls.crt, key: tls/tls.key}\n"
    )
    copy = tmp_path / "deployment"
    import shutil

    shutil.copytree(imported, copy)
    served = load_config(apply_server_config(copy / CONFIG_NAME, server))
    assert served.config.server.state.kind == "redis"
    assert served.config.server.address == "0.0.0.0:50051"
    assert served.model_dir == (copy / "models").resolve()
    assert served.config.server.tls is not None
    assert served.config.server.tls.key == tmp_path / "tls" / "tls.key"
    assert list(served.config.tenants) == ["retail", "wholesale"]
    verify_deployment(copy, strict=False)  # the served configuration sits beside it
    server.write_text("server:\n  model_dir: /elsewhere\n")
    with pytest.raises(Exception, match="the bundle decides it"):
        apply_server_config(copy / CONFIG_NAME, server)
    server.write_text("tenants: {}\n")
    with pytest.raises(Exception, match="expected one key, server:"):
        apply_server_config(copy / CONFIG_NAME, server)


# --------------------------------------------------------------------------------------------
# the command


def test_cli_export_import_and_errors(
    source: LoadedConfig,
    keys: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "cli.plexus"
    code = main(
        [
            "export",
            str(source.path),
            "-o",
            str(out),
            "--tenant",
            "wholesale",
            "--signing-key",
            str(keys[0]),
        ]
    )
    assert code == 0
    assert "signed by key" in capsys.readouterr().out
    assert main(["import", str(out), "--check", "--public-key", str(keys[1])]) == 0
    assert "a valid bundle" in capsys.readouterr().out
    assert (
        main(["import", str(out), "--into", str(tmp_path / "d"), "--public-key", str(keys[1])]) == 0
    )
    assert "plexus serve" in capsys.readouterr().out
    assert main(["import", str(out), "--into", str(tmp_path / "d")]) == 7
    assert "--replace" in capsys.readouterr().err
    assert main(["import", str(out)]) == 2
    damaged = tmp_path / "damaged.plexus"
    damaged.write_bytes(out.read_bytes()[:-100])
    assert main(["import", str(damaged), "--into", str(tmp_path / "e")]) == 6
    err = capsys.readouterr().err
    assert (
        err.startswith("plexus: error: ") and "truncated" in err and not (tmp_path / "e").exists()
    )
    other = tmp_path / "other.pub"
    new_signing_key(tmp_path / "other.key", other)
    assert main(["import", str(out), "--check", "--public-key", str(other)]) == 6
    assert "does not verify" in capsys.readouterr().err
    assert main(["serve", "--bundle", str(out), str(source.path)]) == 2
    assert main(["serve"]) == 2


def test_serve_bundle_serves_it_and_cleans_up(
    bundle: Path, keys: tuple[Path, Path], source: LoadedConfig, tmp_path: Path
) -> None:
    from router.client import PlexusClient

    server = tmp_path / "server.yaml"
    server.write_text("server:\n  grace_seconds: 1\n  drain_delay_seconds: 0\n")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "router.cli",
            "serve",
            "--bundle",
            str(bundle),
            "--public-key",
            str(keys[1]),
            "--server-config",
            str(server),
            "--address",
            "127.0.0.1:0",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("plexus serving on 127.0.0.1:"), (
            process.stderr.read() if process.stderr else ""
        )
        address = line.split()[-1]
        with PlexusClient(address, DEMO_KEY) as client:
            remote = client.route("storefront", "where is my order 88123?")
        (local,) = asyncio.run(
            decisions(source, [("retail", "storefront", "where is my order 88123?")])
        )
        assert (remote.route, remote.model_version) == (local.route, local.model_version)
        assert remote.confidence == pytest.approx(local.confidence, abs=1e-6)
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0
    folder = re.search(r"into (\S+)", err)
    assert folder is not None
    deployment = Path(folder.group(1))
    if "kept " in err:  # the server wrote files there (audit trails): they are kept, and said
        assert written_since_import(deployment)
        verify_deployment(deployment, strict=False)
    else:
        assert not deployment.parent.exists()  # removed on the way out


def test_check_bundle_writes_nothing_beside_it(bundle: Path, public_key) -> None:  # type: ignore[no-untyped-def]
    before = sorted(bundle.parent.iterdir())
    report = check_bundle(bundle, public_key=public_key)
    assert report.verified and report.files > 10
    assert sorted(bundle.parent.iterdir()) == before
