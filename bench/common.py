"""What several suites share: the demo config, a working copy of a config, argument types.

:func:`workspace` writes a copy of a config into a temporary directory (models and data there,
optionally every backend pointed at one OpenAI-compatible URL), trains the fast model, builds
the SQL mirrors from ``NAME.sql`` next to the config and ingests ``knowledge/``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench import api
from bench.report import say

CHECKOUT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = CHECKOUT / "examples" / "retail" / "plexus.yaml"
"""The retail demo, found from the checkout, so a suite runs from any working directory."""
DEMO_KEY = "retail-demo-key"
TENANT = "retail"
DEFAULT_OUT = Path("bench/results")
KNOWLEDGE_SETS = {"policies": (".md", ".html", ".txt"), "products": (".jsonl",)}


def api_key() -> str:
    """The key the clients send: ``PLEXUS_API_KEY``, else the retail demo's."""
    return os.environ.get("PLEXUS_API_KEY", DEMO_KEY)


# ----------------------------------------------------------------------------- arguments


def _at_least(minimum: float, kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive = _at_least(1, int)
non_negative = _at_least(0, int)
non_negative_float = _at_least(0, float)


def add_out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="folder for NAME.json, NAME.md, NAME.png"
    )


def add_client(parser: argparse.ArgumentParser, requests: int) -> None:
    """--config, --requests, --concurrency and --processes of the client-driven suites."""
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG)
    parser.add_argument(
        "--requests", type=positive, default=requests, help="requests per concurrency level"
    )
    parser.add_argument("--concurrency", type=positive, nargs="+", default=[1, 16, 64])
    parser.add_argument("--processes", type=positive, default=2, help="client processes")
    parser.add_argument(
        "--no-audit",
        dest="audit",
        action="store_false",
        help="switch every tenant's audit trail off (it is on by default: a durable record, "
        "so an fdatasync, before each answer)",
    )


def audit_note(settings: dict[str, Any]) -> str:
    """The report line saying whether the servers ran with their audit trail."""
    if settings.get("audit", True):
        return "Audit trail: on (the default: each answer waits for its durable record)."
    return "Audit trail: off (`--no-audit`)."


# ----------------------------------------------------------------------------- workspace


@dataclass
class Workspace:
    config: Path  # the copy
    loaded: Any  # its LoadedConfig
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    collections: dict[str, dict[str, Any]] = field(default_factory=dict)


def train_fast_models(loaded: Any) -> dict[str, dict[str, Any]]:
    """Train every tenant's fast-family model into the config's model dir; a summary each."""
    models = {}
    for tenant in sorted(loaded.config.tenants):
        say(f"training tenant {tenant!r} (fast family)")
        result = api.train_tenant(loaded, tenant, family="fast", progress=say)
        card = result.trained.card
        models[tenant] = {
            "version": result.version,
            "family": card.family,
            "labels": len(card.labels),
            "threshold": card.threshold,
            "train_seconds": round(result.trained.seconds, 2),
            "heldout_inscope_accuracy": card.metrics.get("inscope_accuracy"),
        }
    return models


def _openai_backend(backend: dict[str, Any], url: str) -> dict[str, Any]:
    dropped = ("kind", "url", "model", "api_key_env", "retry", "breaker")
    kept = {k: v for k, v in backend.items() if k not in dropped}
    return {"kind": "openai", "url": url, "model": "instant", **kept}


def workspace(
    config_path: Path,
    workdir: Path,
    *,
    backend_url: str | None = None,
    data: bool = False,
    audit: bool = True,
) -> Workspace:
    """A copy of the config living in ``workdir`` with its fast models trained.

    ``backend_url``: every backend becomes kind ``openai`` at that URL (model ``instant``,
    default retries and breaker). ``data``: the SQL mirrors are built from ``NAME.sql`` next
    to the config and the ``policies`` (.md/.html/.txt) and ``products`` (.jsonl) collections
    of the retail tenant are ingested from ``knowledge/``. ``audit``: False switches every
    tenant's audit trail off.
    """
    original = api.load_config(config_path)
    source_dir = original.base_dir
    raw = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
    server = raw.setdefault("server", {})
    server.update(
        model_dir=str(workdir / "models"), data_dir=str(workdir / "data"), address="127.0.0.1:0"
    )
    mirrors: dict[str, Path] = {}
    for tenant in raw["tenants"].values():
        model = tenant["model"]
        model["family"], model["version"] = "fast", "active"
        if not audit:
            tenant["audit"] = {"enabled": False}
        if model.get("data"):
            model["data"] = str(original.resolve(Path(model["data"])))
        for name, mirror in (tenant.get("sql_mirrors") or {}).items():
            mirrors[name] = workdir / "data" / f"{name}.db"
            mirror["url"] = f"sqlite:///{mirrors[name]}"
        if backend_url is not None:
            for name, backend in (tenant.get("backends") or {}).items():
                tenant["backends"][name] = _openai_backend(backend, backend_url)
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    copy = workdir / "plexus.yaml"
    copy.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    loaded = api.load_config(copy)
    space = Workspace(copy, loaded, train_fast_models(loaded))
    if not data:
        return space
    for name, database in mirrors.items():
        script = source_dir / f"{name}.sql"
        if not script.is_file():
            raise RuntimeError(f"no {script} to build the SQL mirror {name!r} from")
        with contextlib.closing(sqlite3.connect(database)) as db, db:
            db.executescript(script.read_text(encoding="utf-8"))
    knowledge = source_dir / "knowledge"
    for name, suffixes in KNOWLEDGE_SETS.items():
        paths = sorted(p for p in knowledge.glob("*") if p.suffix.lower() in suffixes)
        if TENANT not in loaded.config.tenants or not paths:
            continue
        if name not in loaded.config.tenants[TENANT].collections:
            continue
        say(f"ingesting {name!r} from {len(paths)} files")
        report = api.ingest(loaded, TENANT, name, paths)
        space.collections[name] = {
            "files": [p.name for p in paths],
            "chunks": report.total_chunks,
            "version": report.version,
        }
    return space
