"""TLS and mutual TLS on the gRPC server, with certificates made in the test."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from router._generated.plexus.v1 import plexus_pb2 as pb
from router._generated.plexus.v1 import plexus_pb2_grpc as pb_grpc
from router.config import ConfigError, LoadedConfig, parse_config
from router.server.app import server_credentials

from .conftest import DEMO_KEY, RunningServer

META = (("x-api-key", DEMO_KEY),)
REQUEST = pb.RouteRequest(app="storefront", text="where is my order")


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _issue(
    subject: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    server: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0].subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256()), key


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pki")
    ca = _issue("plexus test CA", None)
    other_ca = _issue("someone else's CA", None)
    files = {
        "ca": ca[0],
        "server": _issue("localhost", ca, server=True),
        "client": _issue("a client", ca),
        "stranger": _issue("a stranger", other_ca),
    }
    paths: dict[str, Path] = {}
    for name, item in files.items():
        cert, key = item if isinstance(item, tuple) else (item, None)
        paths[name] = root / f"{name}.pem"
        paths[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            paths[f"{name}-key"] = root / f"{name}-key.pem"
            paths[f"{name}-key"].write_bytes(_pem(key))
    return paths


def tls_config(trained: LoadedConfig, tmp_path: Path, tls: dict) -> LoadedConfig:
    data = yaml.safe_load(trained.path.read_text())
    data["server"]["tls"] = tls
    path = tmp_path / "plexus.yaml"
    path.write_text(yaml.safe_dump(data))
    return parse_config(data, path)


def route(channel: grpc.Channel) -> pb.RouteDecision:
    return pb_grpc.RouterStub(channel).Route(REQUEST, metadata=META, timeout=5)


def credentials(pki: dict[str, Path], client: str | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(),
        private_key=pki[f"{client}-key"].read_bytes() if client else None,
        certificate_chain=pki[client].read_bytes() if client else None,
    )


def test_tls(trained_config: LoadedConfig, tmp_path: Path, pki: dict[str, Path]) -> None:
    loaded = tls_config(
        trained_config, tmp_path, {"cert": str(pki["server"]), "key": str(pki["server-key"])}
    )
    running = RunningServer(loaded)
    try:
        with grpc.secure_channel(running.address, credentials(pki)) as channel:
            assert route(channel).route
        with grpc.insecure_channel(running.address) as channel:  # plaintext is refused
            with pytest.raises(grpc.RpcError) as info:
                route(channel)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop()


def test_mutual_tls(trained_config: LoadedConfig, tmp_path: Path, pki: dict[str, Path]) -> None:
    loaded = tls_config(
        trained_config,
        tmp_path,
        {"cert": str(pki["server"]), "key": str(pki["server-key"]), "client_ca": str(pki["ca"])},
    )
    running = RunningServer(loaded)
    try:
        with grpc.secure_channel(running.address, credentials(pki, "client")) as channel:
            assert route(channel).route
        for client in (None, "stranger"):  # no certificate, or one another CA signed
            with grpc.secure_channel(running.address, credentials(pki, client)) as channel:
                with pytest.raises(grpc.RpcError) as info:
                    route(channel)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop()


def test_an_unreadable_certificate_names_its_key(
    trained_config: LoadedConfig, tmp_path: Path, pki: dict[str, Path]
) -> None:
    loaded = tls_config(
        trained_config, tmp_path, {"cert": "missing.pem", "key": str(pki["server-key"])}
    )
    with pytest.raises(ConfigError, match=r"server\.tls\.cert: cannot read missing\.pem"):
        server_credentials(loaded)
