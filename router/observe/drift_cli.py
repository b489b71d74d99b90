"""``plexus drift``: a running server's drift readings for the caller's tenant (``Admin.GetDrift``).

Drift lives in the serving process (each replica keeps its own windows), so the command always
asks a server: ``plexus drift --remote HOST:PORT --api-key ADMIN_KEY [--json]``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

DESCRIPTION = """\
Per model version of the caller's tenant, as the server at --remote sees it: the requests it
decided, the window size, the windows tested and alarmed, and for the last tested window and
the sliding view (the last window of requests) each statistic with its threshold and verdict:

  labels      Jensen-Shannon divergence (bits) of the answered requests' route mix
  confidence  Kolmogorov-Smirnov distance of the decisions' confidences
  abstention  |observed - expected| abstention rate

all against the model's decisions on its own held-out set (docs/operations.md, "Drift").
"""


def add_drift_parser(
    sub: Any, parents: Sequence[argparse.ArgumentParser], remote: argparse.ArgumentParser
) -> None:
    """Add ``drift`` to the ``plexus`` sub-commands."""
    p = sub.add_parser(
        "drift",
        parents=[*parents, remote],
        help="model drift per model version, from a running server (admin key)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print the readings as JSON")
    p.set_defaults(func=cmd_drift)


def cmd_drift(args: argparse.Namespace) -> int:
    from router.cli import _print_json, _remote_client, _remote_only

    _remote_only(args, "drift")
    with _remote_client(args) as client:
        models = client.get_drift()
    if args.json:
        _print_json([dataclasses.asdict(m) for m in models])
    else:
        print(format_drift(models), end="")
    return 0


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.3g}"


def format_drift(models: Sequence[Any]) -> str:
    """The readings (``router.client.ModelDrift``) as the text ``plexus drift`` prints."""
    if not models:
        return "no drift readings: drift is off for this tenant (drift.enabled: false)\n"
    lines = []
    for m in models:
        state = "active" if m.active else "not serving"
        alarm = "ALARM" if m.alarm else "no alarm"
        lines.append(
            f"model {m.model_version} ({state}): {m.requests:,} requests, window {m.window:,}, "
            f"{m.windows:,} windows tested ({m.alarmed_windows:,} alarmed), {alarm}"
        )
        rows = f"{m.reference_rows:,} held-out rows" if m.reference_rows else ""
        lines.append(f"  reference: {m.reference}" + (f" ({rows})" if rows else ""))
        if m.alarmed_windows:
            counts = ", ".join(f"{k} {v:,}" for k, v in sorted(m.alarms.items()) if v)
            lines.append(f"  windows alarmed by: {counts}")
        views = [("last window", m.last_window), ("sliding", m.sliding)]
        lines.append(
            f"  {'view':<12} {'requests':>8}  {'statistic':<11} {'value':>9} {'threshold':>9}  "
            f"{'alarm':<5}  detail"
        )
        for name, view in views:
            if view is None:
                note = "none tested yet" if name == "last window" else "no reference"
                lines.append(f"  {name:<12} {'':>8}  {note}")
                continue
            if not view.statistics:
                lines.append(f"  {name:<12} {view.requests:>8,}  {view.note}")
                continue
            for i, s in enumerate(view.statistics):
                label, count = (name, f"{view.requests:,}") if i == 0 else ("", "")
                lines.append(
                    f"  {label:<12} {count:>8}  {s.name:<11} {_number(s.value):>9} "
                    f"{_number(s.threshold):>9}  {'yes' if s.alarm else 'no':<5}  {s.detail}"
                )
            if view.note:
                lines.append(f"  {'':<12} {'':>8}  ({view.note})")
    return "\n".join(lines) + "\n"
