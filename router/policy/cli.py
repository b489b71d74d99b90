"""``plexus policy explain``: what a tenant's policy rules decide for one request, and why."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any


def _pairs(values: list[str] | None) -> dict[str, str]:
    from router.cli import CliError

    pairs: dict[str, str] = {}
    for value in values or ():
        key, sep, item = value.partition("=")
        if not sep or not key:
            raise CliError(f"--meta {value!r}: expected KEY=VALUE, e.g. tier=platinum")
        pairs[key] = item
    return pairs


def cmd_policy_explain(args: argparse.Namespace) -> int:
    from router.calls import Caller, RouteQuery
    from router.cli import CliError, _single_tenant
    from router.config import load_config
    from router.plexus import Plexus
    from router.stages.policy import policy_facts

    loaded = load_config(args.config)
    tenant = _single_tenant(loaded, args.tenant)
    config = loaded.config.tenants[tenant]
    if args.app not in config.apps:
        raise CliError(f"app {args.app!r} is not one of {sorted(config.apps)}")
    key = next((k for k in config.api_keys if k.name == args.key), None)
    if args.key and key is None:
        raise CliError(f"key {args.key!r} is not one of {[k.name for k in config.api_keys]}")
    caller = Caller(tenant, args.key or "cli", admin=False, apps=None)
    query = RouteQuery(args.app, args.text, _pairs(args.meta), args.tier)

    async def explain() -> dict[str, Any]:
        plexus = Plexus(loaded)
        try:
            state = await plexus.pipeline.prepare(caller, query)
            facts = policy_facts(state)
            outcome, traces = plexus.policy.rules[tenant].explain(facts)
            decision = state.decision
            assert decision is not None
            routed = {"route": decision.route, "confidence": round(decision.confidence, 4)}
            routed["abstained"] = decision.abstained
            error = None
            try:
                await plexus.policy.run(state)
            except Exception as exc:  # noqa: BLE001 - explained, not raised
                error = f"{getattr(exc, 'status', type(exc).__name__)}: {exc}"
            return {
                "decision": routed,
                "metadata": dict(facts.metadata),
                "findings": sorted(facts.findings),
                "rules": [{"rule": t.name, "matched": t.matched, "why": t.reason} for t in traces],
                "outcome": {
                    "applied": outcome.applied,
                    "route": decision.route,
                    "chain": list(state.chain),
                    "max_tokens": outcome.max_tokens,
                    "context_budget_tokens": state.budget_tokens,
                    "priority": decision.priority,
                    "refused": error,
                },
            }
        finally:
            await plexus.aclose()

    from router.cli import _print_json

    _print_json(asyncio.run(explain()))
    return 0


def _print_usage(rows: list[Any]) -> None:
    if not rows:
        print("no budgets configured (or none for this user)")
        return
    print(
        f"{'budget':<24} {'scope':<20} {'window':<11} {'used':>14} {'reserved':>12} {'limit':>14}"
    )
    for r in rows:
        digits = 0 if r.unit == "tokens" else 4
        print(
            f"{r.budget:<24} {r.per + '=' + r.scope:<20.20} {r.window:<11} "
            f"{r.used:>14,.{digits}f} {r.reserved:>12,.{digits}f} {r.limit:>14,.{digits}f}"
            f"  {r.unit}"
        )


def cmd_usage(args: argparse.Namespace) -> int:
    from router.cli import CliError, _no_config_with_remote, _remote_client, _single_tenant

    if args.remote:
        _no_config_with_remote(args)
        with _remote_client(args) as client:
            _print_usage(client.get_usage(args.user or ""))
        return 0
    if not args.config:
        raise CliError("give CONFIG (with a Redis state store), or --remote HOST:PORT")
    from router.config import load_config
    from router.policy.limits import Limits, read_usage
    from router.state import open_store

    loaded = load_config(args.config)
    tenant = _single_tenant(loaded, args.tenant)
    if loaded.config.server.state.kind != "redis":
        raise CliError(
            "this configuration keeps its counters inside the server (server.state: memory): "
            "ask the server with --remote HOST:PORT --api-key ADMIN_KEY"
        )

    async def read() -> list[Any]:
        store = open_store(loaded.config.server.state)
        try:
            return await read_usage(Limits(loaded.config.tenants, store), tenant, args.user)
        finally:
            await store.aclose()

    _print_usage(asyncio.run(read()))
    return 0


def add_usage_parser(
    sub: Any, parents: list[argparse.ArgumentParser], remote: argparse.ArgumentParser
) -> None:
    p = sub.add_parser(
        "usage",
        parents=[*parents, remote],
        help="budgets used, reserved and left in their current windows",
        description="From a running server: plexus usage --remote HOST:PORT --api-key "
        "ADMIN_KEY [--user U]. From the shared Redis store: plexus usage CONFIG [--tenant T].",
    )
    p.add_argument("config", type=Path, nargs="?", metavar="CONFIG")
    p.add_argument("--tenant", help="from CONFIG: the tenant (default: the only one)")
    p.add_argument("--user", help="also this user's per-user budgets")
    p.set_defaults(func=cmd_usage)


def add_policy_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    policy = sub.add_parser("policy", parents=parents, help="explain a tenant's policy rules")
    verbs = policy.add_subparsers(dest="verb", required=True, metavar="{explain}")
    p = verbs.add_parser(
        "explain",
        parents=parents,
        help="route one text in process and show which rules apply and why (no server)",
        description="plexus policy explain CONFIG --app APP --text TEXT [--meta tier=platinum] "
        "[--key NAME] [--tenant T]",
    )
    p.add_argument("config", type=Path)
    p.add_argument("--tenant", help="the tenant (default: the only one)")
    p.add_argument("--app", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--key", help="the API key's name the rules see (default: none)")
    p.add_argument("--tier", default="", help="the request's user tier")
    p.add_argument("--meta", action="append", metavar="KEY=VALUE", help="request metadata")
    p.set_defaults(func=cmd_policy_explain)
