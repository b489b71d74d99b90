"""The bench runner: ``plexus bench SUITE [flags]`` (or ``python -m bench SUITE [flags]``).

Each suite is the module ``bench.SUITE`` with ``HELP`` (a one-line summary), its docstring (the
``--help`` text), ``add_arguments(parser)`` for its flags and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUITES = (
    "latency",
    "peers",
    "decision",
    "accuracy",
    "retrieval",
    "orchestrate",
    "governance",
    "policy",
    "audit",
    "observe",
)


def build_parser(prog: str = "plexus bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark suites; each writes NAME.json, NAME.md and NAME.png into --out "
        "and prints the Markdown report (progress goes to stderr).",
    )
    sub = parser.add_subparsers(dest="suite", metavar="SUITE", required=True)
    for name in SUITES:
        module = importlib.import_module(f"bench.{name}")
        suite = sub.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(suite)
        suite.set_defaults(run=module.main)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "plexus bench") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return int(args.run(args))
    except RuntimeError as exc:
        print(f"{prog} {args.suite}: error: {exc}", file=sys.stderr)
        return 1
