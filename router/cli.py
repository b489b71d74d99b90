"""The ``plexus`` command: serve, train, route, models, bench, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from router.config import ConfigError, load_config
from router.context.ingest_cli import add_ingest_parser
from router.errors import PlexusError

DEMO_CONFIG = Path("examples/retail/plexus.yaml")


def _say(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def _single_tenant(loaded, tenant: str | None) -> str:  # type: ignore[no-untyped-def]
    if tenant:
        loaded.tenant(tenant)
        return tenant
    names = sorted(loaded.config.tenants)
    if len(names) != 1:
        raise ConfigError(f"{loaded.path}: several tenants {names}; choose one with --tenant")
    return names[0]


def cmd_train(args: argparse.Namespace) -> int:
    from router.routing.tenant_training import train_tenant

    loaded = load_config(args.config)
    tenants = [args.tenant] if args.tenant else sorted(loaded.config.tenants)
    for tenant in tenants:
        print(f"training tenant {tenant!r}", file=sys.stderr)
        result = train_tenant(
            loaded, tenant, data=args.data, family=args.family, seed=args.seed, progress=_say
        )
        card = result.trained.card
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in card.metrics.items())
        print(f"{tenant}: {result.version} ({card.family}) -> {result.path}")
        print(f"  held-out: {metrics}")
        print(f"  trained in {result.trained.seconds:.1f} s")
    return 0


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _remote_client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from router.client import PlexusClient

    api_key = args.api_key or os.environ.get("PLEXUS_API_KEY")
    if not api_key:
        raise SystemExit("--remote needs --api-key or PLEXUS_API_KEY")
    return PlexusClient(args.remote, api_key)


def _message_dict(message) -> dict:  # type: ignore[no-untyped-def]
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True)


def cmd_route(args: argparse.Namespace) -> int:
    if args.remote:
        with _remote_client(args) as client:
            decision = client.route(args.app, args.text, dict(args.meta or []), args.tier)
        _print_json(_message_dict(decision))
        return 0
    from dataclasses import asdict

    from router.calls import Caller, RouteQuery
    from router.plexus import Plexus

    if not args.config:
        raise SystemExit("give CONFIG for an in-process decision, or --remote ADDR")
    loaded = load_config(args.config)
    tenant = _single_tenant(loaded, args.tenant)
    caller = Caller(tenant, "cli", admin=True, apps=None)
    query = RouteQuery(args.app, args.text, dict(args.meta or []), args.tier)

    async def decide() -> object:
        plexus = Plexus(loaded)
        try:
            return await plexus.pipeline.route(caller, query)
        finally:
            await plexus.aclose()

    _print_json(asdict(asyncio.run(decide())))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from router.server.app import PlexusServer

    loaded = load_config(args.config)

    async def run() -> None:
        server = PlexusServer(loaded, address=args.address)
        port = await server.start()
        print(f"plexus serving on {server.address.rpartition(':')[0]}:{port}", flush=True)
        await server.serve_until_signalled()

    asyncio.run(run())
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    if args.remote:
        with _remote_client(args) as client:
            if args.action == "list":
                reply = client.list_models()
            elif args.action == "load":
                reply = client.load_model(args.version or "", args.force)
            else:
                reply = client.rollback()
        _print_json(_message_dict(reply))
        return 0
    from dataclasses import asdict

    from router.routing.decider import Deciders
    from router.routing.encoder import shared_encoder

    if not args.config:
        raise SystemExit("give CONFIG to act on the registry on disk, or --remote ADDR")
    loaded = load_config(args.config)
    tenant_name = _single_tenant(loaded, args.tenant)
    tenant = Deciders(loaded, shared_encoder).tenants[tenant_name]
    if args.action == "list":
        for info in tenant.list_models():
            mark = "*" if info.active else " "
            metrics = ", ".join(f"{k}={v:.4f}" for k, v in info.metrics.items())
            print(f"{mark} {info.version}  {info.family:8s} {info.created_at}  {metrics}")
    elif args.action == "load":
        _print_json(asdict(tenant.load_version(args.version, args.force)))
    else:
        raise SystemExit(
            "rollback restores the version a running server served before; use "
            "--remote ADDR, or `models load CONFIG VERSION` on disk"
        )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    checkout = Path(__file__).resolve().parents[1]
    root = next((r for r in (checkout, Path.cwd()) if (r / "bench" / "run.py").is_file()), None)
    if root is None:
        raise SystemExit("plexus bench runs from a checkout (it needs bench/)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from bench import run as bench_run

    return bench_run.main(args.bench_args)


def cmd_demo(args: argparse.Namespace) -> int:
    from router.demo import run_demo

    run_demo(load_config(args.config))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plexus", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve the gRPC API until SIGTERM/SIGINT")
    p.add_argument("config", type=Path)
    p.add_argument("--address", help="HOST:PORT to listen on (overrides server.address)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("train", help="train routing models and store them as new versions")
    p.add_argument("config", type=Path)
    p.add_argument("--tenant", help="train only this tenant (default: all)")
    p.add_argument("--data", type=Path, help="extra labelled examples (JSONL or CSV text,label)")
    p.add_argument("--family", choices=["fast", "accurate"], help="override model.family")
    p.add_argument("--seed", type=int, help="override model.seed")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("route", help="route one text, in-process or over gRPC")
    p.add_argument("config", type=Path, nargs="?")
    p.add_argument("--tenant")
    p.add_argument("--app", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--tier", default="")
    p.add_argument("--meta", nargs=2, action="append", metavar=("KEY", "VALUE"))
    p.add_argument("--remote", metavar="ADDR", help="call a running server at HOST:PORT")
    p.add_argument("--api-key", help="API key for --remote (or PLEXUS_API_KEY)")
    p.set_defaults(func=cmd_route)

    p = sub.add_parser("models", help="list, load or roll back routing model versions")
    p.add_argument("action", choices=["list", "load", "rollback"])
    p.add_argument("config", type=Path, nargs="?")
    p.add_argument("version", nargs="?", help="version to load (default: newest)")
    p.add_argument("--tenant")
    p.add_argument("--force", action="store_true", help="load even if held-out accuracy drops")
    p.add_argument("--remote", metavar="ADDR", help="act on a running server at HOST:PORT")
    p.add_argument("--api-key", help="admin API key for --remote (or PLEXUS_API_KEY)")
    p.set_defaults(func=cmd_models)

    # The suites declare their own flags (bench/run.py): everything after `bench` goes there.
    p = sub.add_parser(
        "bench", help="benchmark suites (run from a checkout)", add_help=False, prefix_chars="\0"
    )
    p.add_argument("bench_args", nargs="*", metavar="SUITE [FLAGS]")
    p.set_defaults(func=cmd_bench)

    add_ingest_parser(sub)

    p = sub.add_parser("demo", help="the retail demo: train, ingest, serve, route and stitch")
    p.add_argument("--config", type=Path, default=DEMO_CONFIG)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse binds every positional at the first one, so `ingest CONFIG --tenant T PATH...`
    # leaves the PATHs over: they belong to `paths`.
    if args.command == "ingest" and not any(e.startswith("-") for e in extra):
        args.paths += [Path(e) for e in extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ConfigError, PlexusError, ValueError, LookupError, OSError) as exc:
        print(f"plexus: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
