"""``plexus audit verify | show | export``: read a configuration's audit trails offline.

Every command reads the files under ``server.audit_dir`` (one folder per tenant) and never
writes; a running server may keep appending meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from router.config import ConfigError, LoadedConfig, load_config

VERIFY_DESCRIPTION = """\
Check each tenant's audit trail: every record's hash, the chain from the first record to the
last (an edited, deleted, inserted or reordered record breaks it there), every checkpoint's
Ed25519 signature, and that the trail still reaches the latest checkpoint (checkpoint.json),
so that a tail cut before it is found. The public key is --public-key, else the one derived
from the configured signing key (server.audit_key_file or server.audit_key_env).

Exit status 0 when every trail verifies; 6 naming the first bad record (segment, line, seq and
what is wrong); 3 when --tenant has no trail.
"""


def add_audit_parser(
    subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()
) -> argparse.ArgumentParser:
    """Add ``audit`` (verify, show, export) to the ``plexus`` sub-commands."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "audit", parents=list(parents), help="verify, show and export the audit trails"
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="{verify,show,export}")
    p = verbs.add_parser(
        "verify",
        parents=list(parents),
        help="check the hash chains, signatures and checkpoints",
        description=VERIFY_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", type=Path, metavar="CONFIG")
    p.add_argument("--tenant", help="only this tenant (default: every trail)")
    p.add_argument(
        "--public-key",
        type=Path,
        metavar="PEM",
        help="the Ed25519 public key checkpoints are "
        "signed with (PEM, 32 raw bytes or 64 hex digits)",
    )
    p.set_defaults(func=cmd_audit_verify)
    p = verbs.add_parser(
        "show",
        parents=list(parents),
        help="print the audit records of one request id",
        description="plexus audit show CONFIG --request-id ID [--tenant T]: the records with "
        "that request id, as JSON.",
    )
    p.add_argument("config", type=Path, metavar="CONFIG")
    p.add_argument("--request-id", required=True, metavar="ID")
    p.add_argument("--tenant", help="only this tenant (default: every trail)")
    p.set_defaults(func=cmd_audit_show)
    p = verbs.add_parser(
        "export",
        parents=list(parents),
        help="print the records since a time as JSON Lines",
        description="plexus audit export CONFIG --since 2025-01-31T00:00:00Z [--tenant T]: every "
        "record (requests and checkpoints) at or after --since, in chain order, one canonical "
        "JSON object a line, tenant by tenant. A naive time is UTC.",
    )
    p.add_argument("config", type=Path, metavar="CONFIG")
    p.add_argument("--since", required=True, metavar="ISO-TIME")
    p.add_argument("--tenant", help="only this tenant (default: every trail)")
    p.set_defaults(func=cmd_audit_export)
    return parser


def audit_root(loaded: LoadedConfig) -> Path:
    """The folder holding every tenant's trail."""
    return loaded.resolve(loaded.config.server.audit_dir)


def trails(loaded: LoadedConfig, tenant: str | None) -> list[tuple[str, Path]]:
    """``(tenant, folder)`` of the trails to read: ``tenant``'s (which must exist), else every
    auditing tenant's and every folder on disk (a removed tenant's trail still counts)."""
    from router.cli import EXIT_NOT_FOUND, CliError

    root = audit_root(loaded)
    if tenant is not None:
        if tenant not in loaded.config.tenants and not (root / tenant).is_dir():
            loaded.tenant(tenant)  # the usual error naming the configured tenants
        if not (root / tenant).is_dir():
            raise CliError(
                f"tenant {tenant!r} has no audit trail in {root} (audit.enabled, and has the "
                "server run since?)",
                EXIT_NOT_FOUND,
            )
        return [(tenant, root / tenant)]
    names = {n for n, t in loaded.config.tenants.items() if t.audit.enabled}
    if root.is_dir():
        names |= {entry.name for entry in os.scandir(root) if entry.is_dir()}
    return [(name, root / name) for name in sorted(names)]


def _public_key(args: argparse.Namespace, loaded: LoadedConfig) -> Any:
    from router.cli import CliError
    from router.observe.audit import load_signing_key, parse_public_key

    if args.public_key is not None:
        try:
            return parse_public_key(args.public_key.read_bytes())
        except OSError as exc:
            raise CliError(f"--public-key {args.public_key}: cannot read: {exc.strerror}") from None
        except ValueError as exc:
            raise CliError(f"--public-key {args.public_key}: {exc}") from None
    try:
        key = load_signing_key(loaded)
    except ConfigError as exc:
        raise CliError(f"{exc}; or pass the public key with --public-key PEM") from None
    return key.public_key() if key is not None else None


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from router.cli import EXIT_INVALID, CliError
    from router.observe.audit import verify

    loaded = load_config(args.config)
    public_key = _public_key(args, loaded)
    first_bad = None
    for tenant, folder in trails(loaded, args.tenant):
        if not folder.is_dir():
            print(f"{tenant}: no audit trail yet ({folder})")
            continue
        result = verify(folder, tenant, public_key)
        print(result.summary())
        for note in result.notes:
            print(f"  note: {note}")
        if result.problem is not None:
            print(f"  first bad record: {result.problem}")
            first_bad = first_bad or f"{tenant}: the audit trail fails at {result.problem}"
    sys.stdout.flush()
    if first_bad is not None:
        raise CliError(f"{first_bad} (in {audit_root(loaded)})", EXIT_INVALID)
    return 0


def cmd_audit_show(args: argparse.Namespace) -> int:
    from router.cli import EXIT_NOT_FOUND, CliError
    from router.observe.audit import find_request

    loaded = load_config(args.config)
    searched = trails(loaded, args.tenant)
    found = [r for _, folder in searched for r in find_request(folder, args.request_id)]
    if not found:
        names = [tenant for tenant, _ in searched]
        raise CliError(
            f"no audit record has request id {args.request_id!r} (searched {names})",
            EXIT_NOT_FOUND,
        )
    for record in found:
        print(json.dumps(record, indent=2, sort_keys=True, ensure_ascii=False))
    return 0


def cmd_audit_export(args: argparse.Namespace) -> int:
    from router.cli import CliError
    from router.observe.audit import canonical, parse_time, records_since

    try:
        since = parse_time(args.since)
    except ValueError as exc:
        raise CliError(f"--since: {exc}") from None
    loaded = load_config(args.config)
    out = sys.stdout.buffer
    try:
        for _, folder in trails(loaded, args.tenant):
            for record in records_since(folder, since):
                out.write(canonical(record) + b"\n")
        out.flush()
    except BrokenPipeError:  # the reader stopped early (| head): not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0
