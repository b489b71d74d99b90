"""Shared helpers for the benchmark suites: machine facts, percentiles, report files."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

PACKAGES = ("numpy", "onnxruntime", "grpcio", "scikit-learn")


def say(message: str) -> None:
    """Progress goes to stderr so stdout keeps only the final table."""
    print(f"  {message}", file=sys.stderr, flush=True)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _os_name() -> str:
    try:
        with open("/etc/os-release", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("PRETTY_NAME="):
                    return f"{line.split('=', 1)[1].strip().strip(chr(34))} ({platform.platform()})"
    except OSError:
        pass
    return platform.platform()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_facts() -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "memory_gib": _memory_gib(),
        "os": _os_name(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
    }


def machine_markdown(facts: dict[str, Any]) -> str:
    packages = ", ".join(f"{k} {v}" for k, v in facts["packages"].items())
    cores = f"{facts['cpu_cores']}"
    if facts.get("cpu_cores_usable") not in (None, facts["cpu_cores"]):
        cores += f" ({facts['cpu_cores_usable']} usable by this process)"
    return "\n".join(
        [
            f"- Date: {facts['date']}",
            f"- CPU: {facts['cpu_model']}, {cores} cores",
            f"- Memory: {facts['memory_gib']} GiB",
            f"- OS: {facts['os']}",
            f"- Python {facts['python']}; {packages}",
        ]
    )


def percentiles_us(samples_ns: Sequence[int] | np.ndarray) -> dict[str, float]:
    """p50 / p99 / p99.9 and mean of nanosecond samples, in microseconds."""
    values = np.asarray(samples_ns, dtype=np.float64) / 1000.0
    if values.size == 0:
        return {
            "p50": float("nan"),
            "p99": float("nan"),
            "p99_9": float("nan"),
            "mean": float("nan"),
        }
    p50, p99, p999 = np.percentile(values, [50, 99, 99.9])
    return {
        "p50": float(p50),
        "p99": float(p99),
        "p99_9": float(p999),
        "mean": float(values.mean()),
    }


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out_dir: Path, name: str, data: dict[str, Any], markdown: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    md_path = out_dir / f"{name}.md"
    json_path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md_path.write_text(markdown.rstrip() + "\n", encoding="utf-8")
    return [json_path, md_path]


def pyplot():  # type: ignore[no-untyped-def]
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def publish(
    out_dir: Path,
    name: str,
    report: dict[str, Any],
    markdown: str,
    plot: Callable[[dict[str, Any], Path], None],
) -> None:
    """Write NAME.json, NAME.md and NAME.png, print the Markdown, say where they went."""
    written = write_report(out_dir, name, report, markdown)
    png = out_dir / f"{name}.png"
    plot(report, png)
    written.append(png)
    print(markdown)
    say("wrote " + ", ".join(str(p) for p in written))


def split_load(workers: int, concurrency: int, requests: int) -> list[tuple[int, int]]:
    """(in-flight calls, requests) per client process for one concurrency level."""
    used = min(workers, concurrency)
    shares = [concurrency // used + (1 if i < concurrency % used else 0) for i in range(used)]
    counts = [requests * s // concurrency for s in shares]
    counts[0] += requests - sum(counts)
    return list(zip(shares, counts, strict=True))


class SpawnedClients:
    """Client processes that warm up on a job, report ready, and start together on "go".

    A worker receives a job, answers ``("ready", detail, warm-up errors)`` or
    ``("error", message, {})``, waits for "go", then answers ``("done", result)`` or
    ``("error", message)``; ``None`` ends it.
    """

    def __init__(self, worker: Callable[[Any], None], processes: int):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.workers = []
        for _ in range(processes):
            parent, child = context.Pipe()
            process = context.Process(target=worker, args=(child,), daemon=True)
            process.start()
            child.close()
            self.workers.append((process, parent))

    def execute(
        self,
        jobs: Sequence[Any],
        *,
        before_go: Callable[[], None] | None = None,
        tick: Callable[[], None] | None = None,
    ) -> tuple[list[Any], dict[str, int], list[Any]]:
        """Run one job per worker; (ready details, warm-up errors, results). Raises on failure."""
        import multiprocessing.connection

        for (_, conn), job in zip(self.workers, jobs, strict=False):
            conn.send(job)
        details: list[Any] = []
        warm_errors: dict[str, int] = {}
        waiting, failures = [], []
        for _, conn in self.workers[: len(jobs)]:
            status, detail, errors = conn.recv()
            if status == "error":  # that worker is idle again
                failures.append(detail)
                continue
            waiting.append(conn)
            details.append(detail)
            for key, value in errors.items():
                warm_errors[key] = warm_errors.get(key, 0) + value
        if before_go is not None:
            before_go()
        for conn in waiting:  # every start signal goes out at once
            conn.send("go")
        results, pending = [], list(waiting)
        while pending:
            for conn in multiprocessing.connection.wait(pending, timeout=0.25):
                message = conn.recv()
                pending.remove(conn)
                if message[0] == "done":
                    results.append(message[1])
                else:
                    failures.append(message[1])
            if tick is not None:
                tick()
        if failures:
            raise RuntimeError("the benchmark client failed: " + "; ".join(map(str, failures)))
        return details, warm_errors, results

    def close(self) -> None:
        for _, conn in self.workers:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(None)
        for process, conn in self.workers:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
            conn.close()


def train_fast_models(loaded: Any) -> dict[str, dict[str, Any]]:
    """Train every tenant's fast-family model into the config's model dir; a summary each."""
    from router.routing.tenant_training import train_tenant

    models = {}
    for tenant in sorted(loaded.config.tenants):
        say(f"training tenant {tenant!r} (fast family)")
        result = train_tenant(loaded, tenant, family="fast", progress=say)
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


def stop_when_parent_exits(loop: Any, stop: Any) -> None:
    """Set ``stop`` when standard input (a pipe from the parent benchmark) reaches EOF."""
    import os
    import stat
    import sys

    stdin = sys.stdin.fileno() if sys.stdin is not None else -1
    if stdin < 0 or not stat.S_ISFIFO(os.fstat(stdin).st_mode):
        return

    def stdin_readable() -> None:
        try:
            data = os.read(stdin, 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(stdin)
            stop.set()

    loop.add_reader(stdin, stdin_readable)
