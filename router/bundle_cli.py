"""``plexus export`` (a deployment as one signed bundle), ``plexus import`` (a bundle laid out
as a deployment folder) and the ``--bundle`` options of ``plexus serve``."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from router.config import ConfigError

EXPORT_DESCRIPTION = """\
Write a deployment as one file: the configuration (its paths made relative), per tenant the
served routing model version (every version with --history), its held-out examples and the
injection guard model, the current version of every ingested collection, the training
examples named by model.data, and with --with-mirrors the SQLite files of SQLite SQL mirrors;
plus a manifest (format and Plexus versions, creation time, tenants, the encoder's identity,
the SHA-256 and size of every file) and, with a signing key, an Ed25519 signature of the
manifest. The signing key is --signing-key FILE, else $PLEXUS_BUNDLE_KEY (PEM, or the 32-byte
seed as hex or base64); make a pair with
  openssl genpkey -algorithm ed25519 -out bundle.key
  openssl pkey -in bundle.key -pubout -out bundle.pub
Secrets never go in: API keys are stored as hashes, backend credentials stay the names of
environment variables, server.tls (its private key) is left out, and a URL holding a password
stops the export.
"""

IMPORT_DESCRIPTION = """\
Verify a bundle and lay it out as a folder that `plexus serve DIR/plexus.yaml` runs as is.
Everything is checked while it streams into a temporary folder beside DIR: the signature (with
--public-key), every file's size and SHA-256, that nothing unlisted, no link and no path
leaving DIR is in it, and that the configuration loads; only then is the folder renamed into
place. A refused bundle writes nothing. DIR must not exist or be empty; --replace swaps out an
earlier import. --check verifies without writing anything.
"""


def _say(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def _public_key(path: Path | None) -> Any:
    from router.bundle import load_public_key, read_key_file

    return None if path is None else load_public_key(read_key_file(path), str(path))


def add_bundle_parsers(
    subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()
) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Add ``export`` and ``import`` to the ``plexus`` sub-commands."""
    export: argparse.ArgumentParser = subparsers.add_parser(
        "export",
        parents=list(parents),
        help="write a deployment (config, models, collections) as one signed bundle",
        description=EXPORT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("config", type=Path, help="the plexus YAML configuration")
    export.add_argument(
        "-o", "--out", type=Path, required=True, metavar="FILE", help="the bundle to write"
    )
    export.add_argument(
        "--tenant",
        dest="tenants",
        action="append",
        default=[],
        metavar="TENANT",
        help="only this tenant (repeatable; default: every tenant)",
    )
    export.add_argument(
        "--history", action="store_true", help="every stored model version, not only the served"
    )
    export.add_argument(
        "--with-mirrors", action="store_true", help="include SQLite SQL mirror files"
    )
    export.add_argument(
        "--signing-key",
        type=Path,
        metavar="FILE",
        help="Ed25519 private key to sign with (default: $PLEXUS_BUNDLE_KEY, else unsigned)",
    )
    export.set_defaults(func=cmd_export)

    imported: argparse.ArgumentParser = subparsers.add_parser(
        "import",
        parents=list(parents),
        help="verify a bundle and lay it out as a deployment folder",
        description=IMPORT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imported.add_argument("bundle", type=Path, metavar="BUNDLE", help="the bundle file")
    imported.add_argument("--into", type=Path, metavar="DIR", help="the deployment folder")
    imported.add_argument(
        "--public-key", type=Path, metavar="FILE", help="require a signature this key verifies"
    )
    imported.add_argument("--replace", action="store_true", help="replace an earlier import in DIR")
    imported.add_argument(
        "--check", action="store_true", help="verify the bundle only; write nothing"
    )
    imported.add_argument(
        "--allow-encoder-change",
        action="store_true",
        help="accept a bundle made with another sentence encoder (its embeddings won't match)",
    )
    imported.set_defaults(func=cmd_import)
    return export, imported


def add_serve_bundle_arguments(parser: argparse.ArgumentParser) -> None:
    """``--bundle``, ``--public-key`` and ``--server-config`` for ``plexus serve``."""
    group = parser.add_argument_group("serving a bundle")
    group.add_argument(
        "--bundle", type=Path, metavar="FILE", help="import FILE into a temporary folder, serve it"
    )
    group.add_argument(
        "--public-key", type=Path, metavar="FILE", help="--bundle must be signed by this key"
    )
    group.add_argument(
        "--server-config",
        type=Path,
        metavar="FILE",
        help="YAML with a server: mapping (address, state, TLS, limits) over the bundle's",
    )


def cmd_export(args: argparse.Namespace) -> int:
    from router.bundle import BUNDLE_KEY_ENV, export_bundle, signing_key_from

    key = signing_key_from(args.signing_key)
    report = export_bundle(
        args.config,
        args.out,
        tenants=args.tenants or None,
        history=args.history,
        with_mirrors=args.with_mirrors,
        signing_key=key,
        progress=_say,
    )
    for note in report.notes:
        _say(f"left out: {note}")
    signed = (
        f"signed by key {report.key_id}"
        if report.signed
        else f"unsigned (pass --signing-key FILE or set {BUNDLE_KEY_ENV} to sign it)"
    )
    print(
        f"exported {', '.join(report.tenants)} to {report.path}: {report.files} files, "
        f"{report.content_bytes} bytes ({report.bundle_bytes} compressed), {signed}"
    )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from router.bundle import check_bundle, import_bundle

    if args.check == (args.into is not None):
        raise ConfigError("give --into DIR to import, or --check to verify only")
    public_key = _public_key(args.public_key)
    if args.check:
        report = check_bundle(
            args.bundle, public_key=public_key, allow_encoder_change=args.allow_encoder_change
        )
    else:
        report = import_bundle(
            args.bundle,
            args.into,
            public_key=public_key,
            replace=args.replace,
            allow_encoder_change=args.allow_encoder_change,
            progress=_say,
        )
    for note in report.notes:
        _say(f"note: {note}")
    if report.verified:
        trust = f"signature verified (key {report.key_id})"
    else:
        trust = "checksums verified; signature not checked (pass --public-key FILE)"
    what = f"{report.files} files, tenants {', '.join(report.tenants)}"
    made = f"made by Plexus {report.plexus_version} at {report.created_at}"
    if args.check:
        print(f"{args.bundle}: a valid bundle ({what}, {made}); {trust}")
    else:
        print(f"imported {args.bundle} into {report.path} ({what}, {made}); {trust}")
        print(f"  serve it: plexus serve {report.config}")
    return 0


def serve_bundle(args: argparse.Namespace, serve: Callable[[argparse.Namespace], int]) -> int:
    """``plexus serve --bundle FILE``: import FILE into a temporary folder, apply
    ``--server-config``, run ``serve`` on the result, and remove the folder afterwards, unless
    the server wrote files there (audit trails): then it is kept and named."""
    from router.bundle import apply_server_config, import_bundle, written_since_import

    if args.config and args.bundle:
        raise ConfigError("give CONFIG or --bundle FILE, not both")
    if not args.bundle:
        if args.public_key or args.server_config:
            raise ConfigError("--public-key and --server-config go with --bundle FILE")
        raise ConfigError("give CONFIG, or --bundle FILE to serve a bundle")
    if args.address:  # fail fast, before the import, as plain `serve` does before loading
        from router.cli import check_address

        check_address(args.address)
    public_key = _public_key(args.public_key)
    if args.server_config is not None and not os.path.isfile(args.server_config):
        raise ConfigError(f"{args.server_config}: no such file (--server-config)")
    tmp = Path(tempfile.mkdtemp(prefix="plexus-serve-"))
    deployment = tmp / "deployment"
    try:
        report = import_bundle(args.bundle, deployment, public_key=public_key, progress=_say)
        if not report.verified:
            _say("the bundle's signature was not checked (pass --public-key FILE)")
        config = report.config
        if args.server_config is not None:
            config = apply_server_config(config, args.server_config)
        served = argparse.Namespace(**{**vars(args), "config": config, "bundle": None})
        return serve(served)
    finally:
        written = written_since_import(deployment) if deployment.is_dir() else []
        if written:
            _say(
                f"kept {deployment}: the server wrote {len(written)} files there "
                f"({written[0]}, ...); set server.audit_dir in --server-config to keep audit "
                f"trails elsewhere"
            )
        else:
            shutil.rmtree(tmp, ignore_errors=True)
