"""Entry point for ``plexus bench``: dispatches to the suite named by ``args.suite``."""

from __future__ import annotations

import argparse
import sys


def main(args: argparse.Namespace) -> int:
    try:
        if args.suite == "latency":
            from bench import latency

            return latency.main(args)
        if args.suite == "decision":
            from bench import decision

            return decision.main(args)
        if args.suite == "accuracy":
            from bench import accuracy

            return accuracy.main(args)
        if args.suite == "retrieval":
            from bench import retrieval

            return retrieval.main(args)
        if args.suite == "orchestrate":
            from bench import orchestrate

            return orchestrate.main(args)
    except RuntimeError as exc:
        print(f"plexus bench {args.suite}: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"plexus bench: unknown suite {args.suite!r} "
        "(have: latency, decision, accuracy, retrieval, orchestrate)",
        file=sys.stderr,
    )
    return 2
