"""Pure-Python reference of the native hashed n-gram featurizer (``native/featurizer.pyx``).

Slow and obvious on purpose: property tests check that the native featurizer gives exactly
these ids. Hashing uses the ``mmh3`` library (MurmurHash3 x86 32-bit over UTF-32LE code units),
an implementation independent of the one the native module links.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import mmh3
import numpy as np

BEGIN_OF_WORD = "\x02"
END_OF_WORD = "\x03"


def _is_word_char(ch: str) -> bool:
    return ch.isalnum()


def _is_dropped(ch: str) -> bool:
    return not (ch.isalnum() or ch.isspace() or ch.isprintable())


def split_words(normalized: str) -> list[str]:
    """Words of normalised text: runs of alphanumerics; control/format characters vanish."""
    words: list[str] = []
    current: list[str] = []
    for ch in normalized:
        if _is_word_char(ch):
            current.append(ch)
        elif _is_dropped(ch):
            continue
        elif current:
            words.append("".join(current))
            current = []
    if current:
        words.append("".join(current))
    return words


def _hash(text: str, seed: int) -> int:
    return mmh3.hash(text.encode("utf-32-le", "surrogatepass"), seed, signed=False)


class ReferenceHashedNgrams:
    """Same constructor, ``pad_id`` and featurize methods as the native ``HashedNgrams``."""

    def __init__(
        self,
        buckets_log2: int = 18,
        seed: int = 0,
        char_ngram_min: int = 3,
        char_ngram_max: int = 5,
        word_bigrams: bool = True,
    ) -> None:
        if not 1 <= buckets_log2 <= 31:
            raise ValueError(f"buckets_log2 must be in 1..31, got {buckets_log2}")
        if not 1 <= char_ngram_min <= char_ngram_max <= 16:
            raise ValueError(
                f"need 1 <= char_ngram_min <= char_ngram_max <= 16, got "
                f"{char_ngram_min}..{char_ngram_max}"
            )
        self.buckets_log2 = buckets_log2
        self.seed = seed
        self.char_ngram_min = char_ngram_min
        self.char_ngram_max = char_ngram_max
        self.word_bigrams = word_bigrams

    @property
    def pad_id(self) -> int:
        """The id that pads batch rows: ``2**buckets_log2``, one past the last bucket."""
        return 1 << self.buckets_log2

    def featurize_normalized(self, text: str) -> np.ndarray:
        mask = (1 << self.buckets_log2) - 1
        seed = self.seed & 0xFFFFFFFF
        words = split_words(text)
        word_hashes = [_hash(word, seed) for word in words]
        ids = [h & mask for h in word_hashes]
        if self.word_bigrams:
            bigram_seed = (seed + 1) & 0xFFFFFFFF
            for left, right in zip(word_hashes, word_hashes[1:], strict=False):
                pair = struct.pack("<II", left, right)
                ids.append(mmh3.hash(pair, bigram_seed, signed=False) & mask)
        char_seed = (seed + 2) & 0xFFFFFFFF
        for word in words:
            padded = BEGIN_OF_WORD + word + END_OF_WORD
            for n in range(self.char_ngram_min, self.char_ngram_max + 1):
                for i in range(len(padded) - n + 1):
                    ids.append(_hash(padded[i : i + n], char_seed) & mask)
        return np.asarray(ids, dtype=np.int64)

    def featurize_batch_normalized(self, texts: Sequence[str]) -> np.ndarray:
        """``featurize_normalized`` of each text, one row each, right-padded with ``pad_id``.

        The matrix is as wide as the longest row, and at least one column wide.
        """
        rows = [self.featurize_normalized(text) for text in texts]
        width = max((len(row) for row in rows), default=0) or 1
        out = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out
