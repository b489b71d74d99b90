"""Assembling context: merge the sources' pieces, drop near-duplicates, order, fit a token
budget counted with the encoder's tokenizer, and render a prompt whose every piece is cited."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

from router.context.packets import ContextPiece

KIND_ORDER = {"static": 0, "sql": 1, "packet": 2, "collection": 3}
"""Configured facts first (static text, then exact SQL rows), then retrieved text by score."""

MIN_TRUNCATED_TOKENS = 24
_WORDS = re.compile(r"\w+")


@dataclass(frozen=True)
class PlacedPiece:
    piece: ContextPiece
    number: int  # the [n] it is cited as
    tokens: int
    truncated: bool


@dataclass(frozen=True)
class Assembly:
    prompt: str
    placed: tuple[PlacedPiece, ...]
    tokens_used: int
    budget_tokens: int
    duplicates_dropped: int
    over_budget_dropped: int


@functools.lru_cache(maxsize=65_536)
def shingles(text: str) -> frozenset[str]:
    """Word 3-grams of the casefolded text (cached: chunks recur across questions)."""
    words = _WORDS.findall(text.casefold())
    if len(words) < 3:
        return frozenset(words)
    return frozenset(" ".join(words[i : i + 3]) for i in range(len(words) - 2))


def similarity(a: frozenset[str], b: frozenset[str]) -> float:
    if not a or not b:
        return 1.0 if a == b else 0.0
    return len(a & b) / len(a | b)


def drop_near_duplicates(
    pieces: Sequence[ContextPiece], threshold: float
) -> tuple[list[ContextPiece], int]:
    """Keep pieces in the given order unless one already kept is at least this similar."""
    kept: list[ContextPiece] = []
    kept_shingles: list[frozenset[str]] = []
    for piece in pieces:
        current = shingles(piece.text)
        if any(similarity(current, other) >= threshold for other in kept_shingles):
            continue
        kept.append(piece)
        kept_shingles.append(current)
    return kept, len(pieces) - len(kept)


def order_pieces(pieces: Sequence[ContextPiece]) -> list[ContextPiece]:
    return sorted(pieces, key=lambda p: (KIND_ORDER.get(p.kind, 9), -p.score))


def render_piece(number: int, piece: ContextPiece, text: str) -> str:
    return f"[{number}] ({piece.citation})\n{text}"


class Assembler:
    """Fits pieces into a token budget and renders the prompt; one per tokenizer.

    Token counts are cached by text: the same chunks come back for many questions, and
    tokenizing a 700-character chunk costs ~170 µs.
    """

    def __init__(self, tokenizer: Tokenizer, cache_size: int = 65_536):
        self.tokenizer = tokenizer
        self.count = functools.lru_cache(maxsize=cache_size)(self._count)

    def _count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def truncate(self, text: str, tokens: int) -> str:
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        if len(encoding.ids) <= tokens:
            return text
        end = encoding.offsets[tokens - 1][1]
        return text[:end].rstrip() + " …"

    def assemble(
        self,
        question: str,
        pieces: Sequence[ContextPiece],
        *,
        template: str,
        budget_tokens: int,
        diversity: float,
    ) -> Assembly:
        ordered = order_pieces(pieces)
        unique, duplicates = drop_near_duplicates(ordered, diversity)
        frame = template.format(context="", question=question)
        frame_tokens = self.count(frame)
        remaining = budget_tokens - frame_tokens
        placed: list[PlacedPiece] = []
        rendered: list[str] = []
        dropped = 0
        for piece in unique:
            number = len(placed) + 1
            header_tokens = self.count(render_piece(number, piece, ""))
            text_tokens = self.count(piece.text)
            if header_tokens + text_tokens <= remaining:
                text, truncated, used = piece.text, False, header_tokens + text_tokens
            elif remaining - header_tokens >= MIN_TRUNCATED_TOKENS:
                text = self.truncate(piece.text, remaining - header_tokens - 1)
                truncated, used = True, header_tokens + self.count(text)
            else:
                dropped += 1
                continue
            remaining -= used
            placed.append(PlacedPiece(piece, number, used, truncated))
            rendered.append(render_piece(number, piece, text))
        prompt = template.format(context="\n\n".join(rendered), question=question)
        return Assembly(
            prompt=prompt,
            placed=tuple(placed),
            # pieces are joined by blank lines, so their tokens add up
            tokens_used=frame_tokens + sum(p.tokens for p in placed),
            budget_tokens=budget_tokens,
            duplicates_dropped=duplicates,
            over_budget_dropped=dropped,
        )
