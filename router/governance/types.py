"""What every detector returns: typed spans of the text."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Span:
    """``text[start:end]`` is an entity of type ``kind`` (character offsets, end exclusive).

    ``score`` is 1.0 for a checked structural match (a Luhn-valid card number) and the
    model's probability for a learned one.
    """

    kind: str
    start: int
    end: int
    score: float = 1.0
