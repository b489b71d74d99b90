"""Report rendering for every suite: machine facts, percentiles, tables, files, plots.

A suite builds one JSON-able dict (``machine`` = :func:`machine_facts`), renders it with
:func:`document` and :func:`table`, and hands both to :func:`publish`, which writes
``NAME.json``, ``NAME.md`` and (when matplotlib is installed) ``NAME.png``, prints the
Markdown to stdout and says where the files went on stderr.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

PACKAGES = (
    "plexus-router",
    "numpy",
    "onnxruntime",
    "grpcio",
    "protobuf",
    "scikit-learn",
    "faiss-cpu",
    "aiohttp",
)
NO_MATPLOTLIB = "plexus bench needs matplotlib for plots: pip install 'plexus-router[bench]'"

Getter = str | Callable[[Mapping[str, Any]], Any]
Plot = Callable[[dict[str, Any], Any], Any]  # (report, pyplot) -> figure


def say(message: str) -> None:
    """Progress goes to stderr so stdout keeps only the final report."""
    print(f"  {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- machine


def _first_line(path: str, prefix: str, separator: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith(prefix.lower()):
                    return line.split(separator, 1)[1].strip()
    except (OSError, IndexError):
        pass
    return None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_facts() -> dict[str, Any]:
    """Date, CPU, cores, memory, OS, Python and the versions of the packages measured."""
    memory = _first_line("/proc/meminfo", "MemTotal:", ":")
    os_name = _first_line("/etc/os-release", "PRETTY_NAME=", "=")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_model": _first_line("/proc/cpuinfo", "model name", ":")
        or platform.processor()
        or "unknown",
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "memory_gib": round(int(memory.split()[0]) / 2**20, 1) if memory else None,
        "os": f"{os_name.strip(chr(34))} ({platform.platform()})"
        if os_name
        else platform.platform(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
    }


def machine_markdown(facts: Mapping[str, Any]) -> str:
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


def machine_title(report: Mapping[str, Any], what: str) -> str:
    machine = report["machine"]
    return f"{what}, {machine['cpu_model']}, {machine['cpu_cores']} cores"


# ----------------------------------------------------------------------------- numbers


def percentiles_us(samples_ns: Sequence[int] | np.ndarray, scale: float = 1e3) -> dict[str, float]:
    """p50 / p99 / p99.9 and mean of nanosecond samples, in µs (``scale=1e6``: in ms)."""
    values = np.asarray(samples_ns, dtype=np.float64) / scale
    if values.size == 0:
        return dict.fromkeys(("p50", "p99", "p99_9", "mean"), float("nan"))
    p50, p99, p999 = np.percentile(values, [50, 99, 99.9])
    return {
        "p50": float(p50),
        "p99": float(p99),
        "p99_9": float(p999),
        "mean": float(values.mean()),
    }


def percentiles_ms(samples_ns: Sequence[int] | np.ndarray) -> dict[str, float]:
    return percentiles_us(samples_ns, scale=1e6)


def fmt(value: Any, digits: int = 0) -> str:
    """A number with thousands separators; "n/a" for None and NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _get(row: Mapping[str, Any], key: str) -> Any:
    value: Any = row
    for part in key.split("."):
        value = None if value is None else value.get(part)
    return value


def num(key: str, digits: int = 0) -> Callable[[Mapping[str, Any]], str]:
    """A column getter: ``row[key]`` (dots reach into nested dicts) through :func:`fmt`."""
    return lambda row: fmt(_get(row, key), digits)


def percent(key: str) -> Callable[[Mapping[str, Any]], str]:
    return lambda row: pct(_get(row, key))


# ----------------------------------------------------------------------------- Markdown


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, Getter]]) -> str:
    """A Markdown table of ``rows``: each column a header and a key (dotted) or a function."""
    return markdown_table(
        [header for header, _ in columns],
        [[_get(row, g) if isinstance(g, str) else g(row) for _, g in columns] for row in rows],
    )


def fence(text: str) -> str:
    """``text`` in a code fence longer than any backtick run inside it."""
    longest = run = 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    marks = "`" * max(3, longest + 1)
    return f"{marks}\n{text.rstrip()}\n{marks}"


def document(
    title: str,
    report: Mapping[str, Any],
    notes: Sequence[str],
    sections: Sequence[tuple[str, str]],
    footer: str = "",
) -> str:
    """Title, the machine, the notes as a list, then ``## heading`` + body per section."""
    parts = [f"# {title}", machine_markdown(report["machine"])]
    if notes:
        parts.append("\n".join(f"- {note}" for note in notes))
    parts += [f"## {heading}\n\n{body.strip()}" for heading, body in sections]
    if footer:
        parts.append(footer)
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- files


def write_report(out_dir: Path, name: str, data: dict[str, Any], markdown: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md_path.write_text(markdown.rstrip() + "\n", encoding="utf-8")
    return [json_path, md_path]


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed); ImportError without it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(plot: Plot, report: dict[str, Any], path: Path) -> bool:
    """Draw ``plot(report, pyplot)`` into ``path``; without matplotlib say so and skip it."""
    try:
        plt = pyplot()
    except ImportError:
        say(NO_MATPLOTLIB)
        path.unlink(missing_ok=True)  # not an older run's plot beside this run's numbers
        return False
    fig = plot(report, plt)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def publish(
    out_dir: Path, name: str, report: dict[str, Any], markdown: str, plot: Plot | None = None
) -> list[Path]:
    """Write NAME.json, NAME.md and NAME.png, print the Markdown, say where they went."""
    out_dir = Path(out_dir)
    written = write_report(out_dir, name, report, markdown)
    if plot is not None and save_plot(plot, report, out_dir / f"{name}.png"):
        written.append(out_dir / f"{name}.png")
    print(markdown)
    say("wrote " + ", ".join(str(p) for p in written))
    return written
