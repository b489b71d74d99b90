"""Files: durable writes, JSON Lines rows, and the names of numbered versions.

A durable write makes a file appear whole under its name, or not at all. Model registries and
collections both name their versions ``v0001``, ``v0002``, ...
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

Progress = Callable[[str], None]
"""Where an offline job (training, ingestion) reports what it is doing, one line at a time."""

VERSION_PATTERN = re.compile(r"v(\d{4,9})")
"""``v0001`` ... ``v999999999``: never a name too long for the file system."""


def fsync_dir(directory: Path) -> None:
    """Make a rename or creation inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


STALE_TEMPORARY_SECONDS = 600.0
"""A temporary file this old belongs to a write that was killed (writes take seconds)."""


def sweep_stale_temporaries(directory: Path) -> list[Path]:
    """Remove ``atomic_write``'s temporary files left in ``directory`` by killed writers."""
    removed = []
    cutoff = time.time() - STALE_TEMPORARY_SECONDS
    for leftover in directory.glob(".*.tmp"):
        try:
            if leftover.is_file() and leftover.stat().st_mtime < cutoff:
                leftover.unlink()
                removed.append(leftover)
        except OSError:  # another process swept it first, or it is not ours to remove
            continue
    return removed


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync it, rename it into place.

    A writer killed mid-write leaves its temporary file behind; the next write into the same
    folder removes such leftovers once they are stale.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def jsonl_objects(
    lines: Iterable[str], error: Callable[[str], Exception]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of JSON Lines text, numbered from 1.

    A line that is not JSON, or not a JSON object, raises ``error(message)``; the message
    starts with ``line N:``.
    """
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"line {number}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise error(f"line {number}: expected a JSON object")
        yield number, row


def version_number(name: str) -> int | None:
    """``7`` for ``v0007``; None for anything that is not a version name."""
    match = VERSION_PATTERN.fullmatch(name)
    return int(match.group(1)) if match else None


def sorted_versions(names: Iterable[str]) -> list[str]:
    """The version names among ``names``, oldest first."""
    numbered = [(number, name) for name in names if (number := version_number(name)) is not None]
    return [name for _, name in sorted(numbered)]


def next_version(existing: Iterable[str]) -> str:
    """The version name after the newest of ``existing`` (``v0001`` when there is none)."""
    numbers = [n for n in map(version_number, existing) if n is not None]
    return f"v{max(numbers, default=0) + 1:04d}"
