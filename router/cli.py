"""The plexus command: serve, train, route, models, collections, keys, mirror, ingest, export,
import, bench, demo.

Every error is one line on stderr, "plexus: error: WHAT; WHAT TO DO"; -v (before or after the
command) adds the detail: the traceback and INFO logs. The exit status names the class:

  0    success
  1    internal error (a bug); `ingest` when every file given was skipped
  2    usage or configuration error
  3    not found: app, model version, collection, file
  4    authentication or permission
  5    unavailable: no server answers at --remote, or none within --timeout
  6    invalid argument: empty or too long text, a bad data file or SQL script
  7    failed precondition: a swap refused on held-out accuracy, nothing to roll back
  8    serve cannot listen: the address is in use or not one of this machine's
  130  interrupted
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import socket
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

from router.bundle_cli import add_bundle_parsers, add_serve_bundle_arguments, serve_bundle
from router.config import ConfigError, LoadedConfig, load_config
from router.context.ingest_cli import add_ingest_parser, add_mirror_parser
from router.errors import PlexusError
from router.observe.audit_cli import add_audit_parser
from router.observe.drift_cli import add_drift_parser
from router.policy.cli import add_policy_parser, add_usage_parser

EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_PERMISSION = 4
EXIT_UNAVAILABLE = 5
EXIT_INVALID = 6
EXIT_PRECONDITION = 7
EXIT_ADDRESS = 8
EXIT_INTERRUPTED = 130

STATUS_EXIT = {
    "NOT_FOUND": EXIT_NOT_FOUND,
    "UNAUTHENTICATED": EXIT_PERMISSION,
    "PERMISSION_DENIED": EXIT_PERMISSION,
    "UNAVAILABLE": EXIT_UNAVAILABLE,
    "DEADLINE_EXCEEDED": EXIT_UNAVAILABLE,
    "CANCELLED": EXIT_UNAVAILABLE,
    "INVALID_ARGUMENT": EXIT_INVALID,
    "OUT_OF_RANGE": EXIT_INVALID,
    "RESOURCE_EXHAUSTED": EXIT_INVALID,
    "FAILED_PRECONDITION": EXIT_PRECONDITION,
    "ABORTED": EXIT_PRECONDITION,
    "ALREADY_EXISTS": EXIT_PRECONDITION,
}
"""A gRPC status (remote) or a PlexusError's status (in process) -> the exit status."""

STATUS_ADVICE = {
    "UNAUTHENTICATED": "check --api-key (or PLEXUS_API_KEY)",
    "PERMISSION_DENIED": "use a key that may do this (Admin calls need an admin key: "
    "`plexus keys new --admin`)",
    "NOT_FOUND": "check the name (`plexus models list`, the config's apps and collections)",
    "INVALID_ARGUMENT": "fix the request",
    "OUT_OF_RANGE": "fix the request",
    "RESOURCE_EXHAUSTED": "send less (see server.max_message_bytes and server.max_batch)",
    "FAILED_PRECONDITION": "the server cannot do this in its current state (see the reason)",
    "CANCELLED": "the server may be shutting down; retry",
}


class CliError(Exception):
    """An error the command reports in one line, with its exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def one_line(message: str) -> str:
    """A multi-line message (a configuration with several errors) as one line."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return ""
    head, rest = lines[0], lines[1:]
    if not rest:
        return head
    return f"{head} {'; '.join(rest)}" if head.endswith(":") else "; ".join(lines)


def _say(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def _timed_progress() -> Any:
    started = time.perf_counter()

    def say(message: str) -> None:
        _say(f"{time.perf_counter() - started:6.1f} s  {message}")

    return say


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _single_tenant(loaded: LoadedConfig, tenant: str | None) -> str:
    if tenant:
        loaded.tenant(tenant)
        return tenant
    names = sorted(loaded.config.tenants)
    if len(names) != 1:
        raise ConfigError(f"{loaded.path}: several tenants {names}; choose one with --tenant")
    return names[0]


# --------------------------------------------------------------------------------------------
# talking to a running server


def _remote_client(args: argparse.Namespace) -> Any:
    from router.client import PlexusClient

    api_key = args.api_key or os.environ.get("PLEXUS_API_KEY")
    if not api_key:
        raise CliError("--remote needs an API key: pass --api-key KEY or set PLEXUS_API_KEY")
    return PlexusClient(
        args.remote,
        api_key,
        timeout=args.timeout,
        tls=args.tls,
        root_certificates=args.ca,
        certificate_chain=args.cert,
        private_key=args.key,
    )


def _remote_only(args: argparse.Namespace, what: str) -> None:
    """A verb that acts on a running server and needs no configuration file."""
    if not args.remote:
        raise CliError(f"{what} acts on a running server: pass --remote HOST:PORT --api-key KEY")


def _no_config_with_remote(args: argparse.Namespace) -> None:
    """With ``--remote`` the server's configuration applies and the key decides the tenant."""
    given = [str(args.config)] if getattr(args, "config", None) else []
    if getattr(args, "tenant", None):
        given.append(f"--tenant {args.tenant}")
    if given:
        raise CliError(
            f"with --remote the server's own configuration applies (the key decides the "
            f"tenant): drop {' '.join(given)}"
        )


def _client_error_message(exc: Any, args: argparse.Namespace) -> str:
    address = getattr(args, "remote", None) or "the server"
    if exc.code == "UNAVAILABLE":
        return (
            f"no Plexus server answers at {address}; start one with `plexus serve CONFIG` "
            f"or check --remote (and --tls)"
        )
    if exc.code == "DEADLINE_EXCEEDED":
        return (
            f"{address} did not answer within {args.timeout:g} s; the server is busy or "
            f"stuck: retry, or pass a longer --timeout"
        )
    message = one_line(exc.message) or "(no message)"
    advice = STATUS_ADVICE.get(exc.code, "this is a bug: run with -v and report the detail")
    func = getattr(args, "func", None)
    if exc.code == "FAILED_PRECONDITION" and func is cmd_models_load:
        advice = "pass --force to load it anyway"
    elif exc.code == "FAILED_PRECONDITION" and func is cmd_models_rollback:
        advice = (
            "load a version instead: plexus models load --remote HOST:PORT --api-key KEY VERSION"
        )
    return f"{exc.code} from {address}: {message}; {advice}"


# --------------------------------------------------------------------------------------------
# commands


def cmd_train(args: argparse.Namespace) -> int:
    from router.routing.tenant_training import train_tenant

    loaded = load_config(args.config)
    tenants = [args.tenant] if args.tenant else sorted(loaded.config.tenants)
    for tenant in tenants:
        print(f"training tenant {tenant!r}", file=sys.stderr, flush=True)
        result = train_tenant(
            loaded,
            tenant,
            data=args.data,
            family=args.family,
            seed=args.seed,
            progress=_timed_progress(),
            activate=args.activate,
        )
        card = result.trained.card
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in card.metrics.items())
        print(f"{tenant}: {result.version} ({card.family}) -> {result.path}")
        print(f"  held-out: {metrics}")
        print(f"  trained in {result.trained.seconds:.1f} s")
        print(f"  {_served_note(loaded, tenant, result.version, result.active, args.config)}")
    return 0


def _served_note(loaded: LoadedConfig, tenant: str, version: str, active: str, config: Path) -> str:
    """What serves the new version: ACTIVE, a pin in the configuration, or a load."""
    wanted = loaded.tenant(tenant).model.version
    load = f"plexus models load --remote ADDR --api-key ADMIN_KEY {version}"
    if wanted not in ("active", "latest"):
        return (
            f"{version} trained; model.version pins {wanted} in {config}: change it to "
            f"serve {version}, or `{load}`"
        )
    if wanted == "active" and active != version:
        return (
            f"{version} trained; ACTIVE stays {active} (pass --activate to serve it, or `{load}`)"
        )
    return f"{version} trained; a server started now serves it (a running one: `{load}`)"


def cmd_route(args: argparse.Namespace) -> int:
    from router.client import Decision

    if args.remote:
        _no_config_with_remote(args)
        with _remote_client(args) as client:
            decision = client.route(args.app, args.text, dict(args.meta or []), args.tier)
        _print_json(asdict(decision))
        return 0
    from router.calls import Caller, RouteQuery
    from router.plexus import Plexus
    from router.server.convert import decision_to_proto

    if not args.config:
        raise CliError("give CONFIG for an in-process decision, or --remote HOST:PORT")
    loaded = load_config(args.config)
    tenant = _single_tenant(loaded, args.tenant)
    caller = Caller(tenant, "cli", admin=True, apps=None)
    query = RouteQuery(args.app, args.text, dict(args.meta or []), args.tier)

    async def decide() -> Any:
        plexus = Plexus(loaded)
        try:
            return await plexus.pipeline.route(caller, query)
        finally:
            await plexus.aclose()

    # One shape in process and over gRPC: the decision as the server would send it.
    decision = Decision.from_proto(decision_to_proto(asyncio.run(decide())))
    _print_json(asdict(decision))
    return 0


def check_address(address: str) -> None:
    """Fail fast, before anything slow is loaded, when ``address`` cannot be listened on."""
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise CliError(f"address {address!r}: expected HOST:PORT") from None
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise CliError(
            f"cannot listen on {address}: {exc.strerror}; pass --address HOST:PORT", EXIT_ADDRESS
        ) from None
    failures: list[OSError] = []
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise CliError(
                        f"address {address} is in use: pass --address or stop the other server",
                        EXIT_ADDRESS,
                    ) from None
                failures.append(exc)
    if failures and len(failures) == len(infos):
        raise CliError(
            f"cannot listen on {address}: {failures[0].strerror}; pass --address HOST:PORT",
            EXIT_ADDRESS,
        )


def _workers(requested: int | None, loaded: LoadedConfig) -> int:
    """How many serving processes: as asked, else one per core when the state is shared
    (Redis), else one. Several need the shared state: the in-process store is per process."""
    shared = loaded.config.server.state.kind != "memory"
    if requested is None:
        from router.server.workers import default_workers

        return default_workers() if shared else 1
    if requested < 1:
        raise CliError("--workers: at least 1")
    if requested > 1 and not shared:
        raise CliError(
            "--workers above 1 needs server.state.kind: redis: the workers share rate limits, "
            "budgets and hot swaps through it (the in-process store is one per process)"
        )
    return requested


def cmd_serve(args: argparse.Namespace) -> int:
    if getattr(args, "bundle", None) or not args.config:
        return serve_bundle(args, cmd_serve)
    loaded = load_config(args.config)
    server_config = loaded.config.server
    from router.observe.logs import configure_logging  # JSON or text, one line per request

    configure_logging(server_config.log_format, logging.getLogger().getEffectiveLevel())
    address = args.address or server_config.address
    http_address = args.http_address or server_config.http_address
    workers = _workers(args.workers, loaded)
    if not args.worker:  # workers share the ports their supervisor checked
        check_address(address)
        if http_address is not None:
            check_address(http_address)
    if workers > 1:
        from router.server.workers import concrete_address, serve_workers

        stop_within = server_config.drain_delay_seconds + server_config.grace_seconds + 10
        http = concrete_address(http_address) if http_address else None
        return serve_workers(args.config, workers, concrete_address(address), http, stop_within)
    from router.server.app import PlexusServer

    async def run() -> None:
        server = PlexusServer(
            loaded, address=address, http_address=http_address, reuse_port=args.worker
        )
        try:
            port = await server.start()
        except (RuntimeError, OSError) as exc:
            await server.plexus.aclose()
            if "bind" not in str(exc) and "cannot listen" not in str(exc):
                raise
            logging.getLogger("plexus.cli").info("start failed: %s", exc)
            raise CliError(
                f"cannot listen on {address} (in use, or not an address of this machine): "
                f"pass --address or stop the other server",
                EXIT_ADDRESS,
            ) from exc
        if server.http_port:  # first: "serving on" is the line that says everything is up
            host = (http_address or "").rpartition(":")[0]
            scheme = "https" if server_config.tls else "http"
            print(
                f"plexus OpenAI-compatible front door on {scheme}://{host}:{server.http_port}/v1",
                flush=True,
            )
        print(f"plexus serving on {server.address.rpartition(':')[0]}:{port}", flush=True)
        await server.serve_until_signalled()

    asyncio.run(run())
    return 0


def _print_models(infos: list[Any]) -> None:
    for info in infos:
        mark = "*" if info.active else " "
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in info.metrics.items())
        print(f"{mark} {info.version}  {info.family:8s} {info.created_at}  {metrics}")


def _disk_tenant(args: argparse.Namespace) -> Any:
    from router.routing.decider import Deciders
    from router.routing.encoder import shared_encoder

    loaded = load_config(args.config)
    name = _single_tenant(loaded, args.tenant)
    return Deciders(loaded, shared_encoder).tenants[name]


def cmd_models_list(args: argparse.Namespace) -> int:
    if args.remote:
        _no_config_with_remote(args)
        with _remote_client(args) as client:
            _print_models(client.list_models())
        return 0
    if not args.config:
        raise CliError("give CONFIG to list the models on disk, or --remote HOST:PORT")
    _print_models(_disk_tenant(args).list_models())
    return 0


def cmd_models_load(args: argparse.Namespace) -> int:
    positionals = [p for p in (args.config, args.version) if p is not None]
    if args.remote:
        if len(positionals) > 1 or args.tenant:
            raise CliError(
                "with --remote give only the VERSION: plexus models load --remote HOST:PORT "
                "--api-key KEY v0002 (the key decides the tenant)"
            )
        version = positionals[0] if positionals else ""
        with _remote_client(args) as client:
            status = client.load_model(version, args.force)
        _print_json(asdict(status))
        return 0
    if not positionals:
        raise CliError("give CONFIG [VERSION] to load on disk, or --remote HOST:PORT VERSION")
    args.config, version = Path(positionals[0]), (positionals[1] if len(positionals) > 1 else None)
    _print_json(asdict(_disk_tenant(args).load_version(version, args.force)))
    return 0


def cmd_models_rollback(args: argparse.Namespace) -> int:
    if not args.remote:
        raise CliError(
            "rollback restores the version a running server served before: pass --remote "
            "HOST:PORT --api-key KEY (on disk, `plexus models load CONFIG VERSION` sets ACTIVE)"
        )
    _no_config_with_remote(args)
    with _remote_client(args) as client:
        _print_json(asdict(client.rollback()))
    return 0


def cmd_collections_reload(args: argparse.Namespace) -> int:
    _remote_only(args, "collections reload")
    with _remote_client(args) as client:
        _print_json(asdict(client.reload_collection(args.collection)))
    return 0


def cmd_keys_new(args: argparse.Namespace) -> int:
    import re
    import secrets

    from router.config import NAME_PATTERN, hash_api_key

    key = secrets.token_urlsafe(32)
    digest = hash_api_key(key)
    name = args.name or f"key-{digest[:8]}"
    apps = [a.strip() for a in (args.apps or "").split(",") if a.strip()]
    for value, what in [(name, "--name"), *((a, "--apps") for a in apps)]:
        if not re.fullmatch(NAME_PATTERN, value):
            raise CliError(f"{what} {value!r}: expected letters, digits, '_', '.', '-'")
    entry = f"name: {name}, sha256: {digest}"
    if args.admin:
        entry += ", admin: true"
    if apps:
        entry += f", apps: [{', '.join(apps)}]"
    print("# the key: hand it to its user now; only its hash goes in the configuration")
    print(key)
    print("# add this entry to the tenant's api_keys:")
    print(f"- {{{entry}}}")
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
    from router.demo import DEFAULT_WORKDIR, prepare_workdir, run_demo

    if args.config and args.workdir:
        raise CliError("give --config (run in place) or --workdir (a copy), not both")
    config = args.config or prepare_workdir(args.workdir or DEFAULT_WORKDIR)
    run_demo(load_config(config))
    return 0


# --------------------------------------------------------------------------------------------
# the parser


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line too, pointing at the command's --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the detail of an error (traceback) and log at INFO level",
    )
    return common


def _remote() -> argparse.ArgumentParser:
    remote = argparse.ArgumentParser(add_help=False)
    group = remote.add_argument_group("a running server")
    group.add_argument("--remote", metavar="HOST:PORT", help="call a running server")
    group.add_argument("--api-key", help="API key for --remote (default: $PLEXUS_API_KEY)")
    group.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS", help="per call (default 10)"
    )
    group.add_argument("--tls", action="store_true", help="use TLS (the system's root CAs)")
    group.add_argument("--ca", type=Path, metavar="PEM", help="trust this CA (implies --tls)")
    group.add_argument("--cert", type=Path, metavar="PEM", help="client certificate (mTLS)")
    group.add_argument("--key", type=Path, metavar="PEM", help="client private key (mTLS)")
    return remote


def build_parser() -> argparse.ArgumentParser:
    common, remote = _common(), _remote()
    parser = _Parser(
        prog="plexus",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show error details and log at INFO level"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", parents=[common], help="serve the gRPC API until SIGTERM/SIGINT")
    p.add_argument("config", type=Path, nargs="?", help="the configuration (or --bundle FILE)")
    p.add_argument("--address", help="HOST:PORT to listen on (overrides server.address)")
    p.add_argument("--http-address", help="HOST:PORT of the OpenAI-compatible front door")
    p.add_argument(
        "--workers",
        type=int,
        help="serving processes sharing the ports (default: one per core with a Redis "
        "server.state, else 1)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    add_serve_bundle_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "train", parents=[common], help="train routing models and store them as new versions"
    )
    p.add_argument("config", type=Path)
    p.add_argument("--tenant", help="train only this tenant (default: all)")
    p.add_argument("--data", type=Path, help="extra labelled examples (JSONL or CSV text,label)")
    p.add_argument("--family", choices=["fast", "accurate"], help="override model.family")
    p.add_argument("--seed", type=int, help="override model.seed")
    p.add_argument(
        "--activate",
        action="store_true",
        help="point ACTIVE at the new version (else ACTIVE stays where a load or rollback left it)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "route", parents=[common, remote], help="route one text, in process or over gRPC"
    )
    p.add_argument("config", type=Path, nargs="?", help="in process: the configuration")
    p.add_argument("--tenant", help="in process: the tenant (default: the only one)")
    p.add_argument("--app", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--tier", default="")
    p.add_argument("--meta", nargs=2, action="append", metavar=("KEY", "VALUE"))
    p.set_defaults(func=cmd_route, _slots=("config",))

    models = sub.add_parser(
        "models", parents=[common], help="list, load or roll back routing model versions"
    )
    verbs = models.add_subparsers(dest="verb", required=True, metavar="{list,load,rollback}")
    p = verbs.add_parser(
        "list",
        parents=[common, remote],
        help="the versions of a tenant's model (* = active)",
        description="On disk: plexus models list CONFIG [--tenant T]. On a running server: "
        "plexus models list --remote HOST:PORT --api-key ADMIN_KEY.",
    )
    p.add_argument("config", type=Path, nargs="?", metavar="CONFIG")
    p.add_argument("--tenant")
    p.set_defaults(func=cmd_models_list, _slots=("config",))
    p = verbs.add_parser(
        "load",
        parents=[common, remote],
        help="load a version (default: the newest) and make it ACTIVE",
        description="On a running server (hot swap, checked on held-out data): plexus models "
        "load --remote HOST:PORT --api-key ADMIN_KEY v0002 [--force]. On disk (sets ACTIVE "
        "for the next start): plexus models load CONFIG v0002 [--tenant T].",
    )
    p.add_argument("config", nargs="?", metavar="CONFIG", help="on disk only")
    p.add_argument("version", nargs="?", metavar="VERSION", help="e.g. v0002 (default: newest)")
    p.add_argument("--tenant", help="on disk: the tenant (default: the only one)")
    p.add_argument("--force", action="store_true", help="load even if held-out accuracy drops")
    p.set_defaults(func=cmd_models_load, _slots=("config", "version"))
    p = verbs.add_parser(
        "rollback",
        parents=[common, remote],
        help="restore the version a running server served before",
        description="plexus models rollback --remote HOST:PORT --api-key ADMIN_KEY",
    )
    p.add_argument("config", nargs="?", metavar="CONFIG", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_models_rollback, _slots=("config",))

    collections = sub.add_parser(
        "collections", parents=[common], help="act on a running server's collections"
    )
    verbs = collections.add_subparsers(dest="verb", required=True, metavar="{reload}")
    p = verbs.add_parser(
        "reload",
        parents=[common, remote],
        help="serve the newest ingested version of a collection",
        description="plexus collections reload --remote HOST:PORT --api-key ADMIN_KEY "
        "COLLECTION (after `plexus ingest`).",
    )
    p.add_argument("collection", metavar="COLLECTION")
    p.set_defaults(func=cmd_collections_reload)

    keys = sub.add_parser("keys", parents=[common], help="make API keys")
    verbs = keys.add_subparsers(dest="verb", required=True, metavar="{new}")
    p = verbs.add_parser(
        "new",
        parents=[common],
        help="print a fresh random key and the configuration entry with its hash",
    )
    p.add_argument("--name", help="the key's name in logs (default: key-<hash prefix>)")
    p.add_argument("--admin", action="store_true", help="may call the Admin service")
    p.add_argument("--apps", metavar="A,B", help="may call only these apps")
    p.set_defaults(func=cmd_keys_new)

    add_mirror_parser(sub, parents=[common])
    add_audit_parser(sub, parents=[common])
    add_bundle_parsers(sub, parents=[common])
    add_policy_parser(sub, parents=[common])
    add_usage_parser(sub, [common], remote)
    add_drift_parser(sub, [common], remote)

    # The suites declare their own flags (bench/run.py): everything after `bench` goes there.
    p = sub.add_parser(
        "bench", help="benchmark suites (run from a checkout)", add_help=False, prefix_chars="\0"
    )
    p.add_argument("bench_args", nargs="*", metavar="SUITE [FLAGS]")
    p.set_defaults(func=cmd_bench)

    p = add_ingest_parser(sub, parents=[common])
    p.set_defaults(_slots=("paths",))

    p = sub.add_parser(
        "demo",
        parents=[common],
        help="the retail demo: train, ingest, serve, route and stitch",
        description="Copies the retail example into a working folder (default ./plexus-demo; "
        "an existing one is reused) and runs the demo there: it trains the routing model, "
        "loads the SQL mirror, ingests the knowledge base, serves on a free port and calls it.",
    )
    p.add_argument("--workdir", type=Path, help="the working folder (default: ./plexus-demo)")
    p.add_argument("--config", type=Path, help="run on this configuration in place instead")
    p.set_defaults(func=cmd_demo)
    return parser


def _fold_extra(
    parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]
) -> None:
    """argparse binds a command's optional positionals where the first positional appears, so
    in ``models load CONFIG --tenant T VERSION`` or ``ingest CONFIG --tenant T PATH...`` the
    later operands are left over: they fill the command's remaining positional slots."""
    slots = getattr(args, "_slots", ())
    for value in extra:
        if value.startswith("-") and value != "-":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        for slot in slots:
            current = getattr(args, slot)
            if isinstance(current, list):
                current.append(Path(value))
                break
            if current is None:
                setattr(args, slot, value)
                break
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, CliError):
        return exc.code
    if isinstance(exc, PlexusError):
        return STATUS_EXIT.get(exc.status, EXIT_INTERNAL)
    if isinstance(exc, ConfigError):
        return EXIT_USAGE
    if isinstance(exc, LookupError | FileNotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(exc, PermissionError):
        return EXIT_PERMISSION
    if isinstance(exc, ValueError):
        return EXIT_INVALID
    return EXIT_INTERNAL


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _fold_extra(parser, args, extra)
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from router.client import PlexusClientError

    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("plexus: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except PlexusClientError as exc:
        if verbose:
            traceback.print_exc()
            print(exc.debug, file=sys.stderr)
        print(f"plexus: error: {_client_error_message(exc, args)}", file=sys.stderr)
        return STATUS_EXIT.get(exc.code, EXIT_INTERNAL)
    except Exception as exc:
        if verbose:
            traceback.print_exc()
        code = _exit_code(exc)
        message = one_line(str(exc)) or type(exc).__name__
        if code == EXIT_INTERNAL and not isinstance(exc, CliError | PlexusError):
            message = f"{type(exc).__name__}: {message}; run with -v for the detail"
        print(f"plexus: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    # As ``python -m router.cli``, this file runs as ``__main__``, a second copy of the module:
    # run the package's own, whose error classes are the ones the commands raise.
    from router.cli import main as package_main

    sys.exit(package_main())
