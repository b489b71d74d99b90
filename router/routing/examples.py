"""Labelled examples: texts with their route (or out-of-scope) labels, read from JSONL or CSV."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.files import jsonl_objects

DEFAULT_OOS_LABEL = "oos"


class DatasetError(ValueError):
    """A labelled data file that cannot be read; the message names file and line."""


@dataclass
class Examples:
    texts: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def __add__(self, other: Examples) -> Examples:
        return Examples(self.texts + other.texts, self.labels + other.labels)

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for text, label in zip(self.texts, self.labels, strict=True):
            digest.update(json.dumps([text, label], ensure_ascii=False).encode("utf-8"))
            digest.update(b"\n")
        return digest.hexdigest()

    def to_jsonl(self) -> str:
        return "".join(
            json.dumps({"text": t, "label": lab}, ensure_ascii=False) + "\n"
            for t, lab in zip(self.texts, self.labels, strict=True)
        )


def read_examples(path: Path) -> Examples:
    """Read ``{"text", "label"}`` JSONL, or CSV with a ``text,label`` header."""
    texts: list[str] = []
    labels: list[str] = []
    try:
        handle = path.open(encoding="utf-8", newline="")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror}") from None
    with handle:
        rows: Iterator[tuple[int, dict[str, Any]]]
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
                raise DatasetError(f"{path}: line 1: expected a header with 'text' and 'label'")
            rows = ((reader.line_num, row) for row in reader)
        else:
            rows = jsonl_objects(handle, lambda message: DatasetError(f"{path}: {message}"))
        for line, row in rows:
            text, label = row.get("text"), row.get("label")
            if not isinstance(text, str) or not text.strip():
                raise DatasetError(f"{path}: line {line}: 'text' must be a non-empty string")
            if not isinstance(label, str) or not label:
                raise DatasetError(f"{path}: line {line}: 'label' must be a non-empty string")
            texts.append(text)
            labels.append(label)
    if not texts:
        raise DatasetError(f"{path}: no examples")
    return Examples(texts, labels)
