"""The routing featurizer: normalise text, then hash word and character n-grams into ids.

The native module (``router._native.featurizer``) is chosen once at import, unless the shared
switch ``router._native.NO_EXTENSIONS`` (``PLEXUS_NO_EXTENSIONS=1``) forces the pure-Python
reference, which gives identical ids; without the built extension the reference is used too.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from router._native import NO_EXTENSIONS
from router.routing.featurizer_ref import ReferenceHashedNgrams


class _HashedNgrams(Protocol):
    @property
    def pad_id(self) -> int: ...

    def featurize_normalized(self, text: str) -> np.ndarray: ...

    def featurize_batch_normalized(self, texts: Sequence[str]) -> np.ndarray: ...


def _native_class() -> type[_HashedNgrams] | None:
    if NO_EXTENSIONS:
        return None
    try:
        from router._native.featurizer import HashedNgrams
    except ImportError:  # pragma: no cover - only when the package was not built
        return None
    return HashedNgrams


NativeHashedNgrams = _native_class()
USING_NATIVE = NativeHashedNgrams is not None


def normalize(text: str) -> str:
    """Unicode NFKC, then casefold. Control characters are dropped by the tokenizer."""
    return unicodedata.normalize("NFKC", text).casefold()


@dataclass(frozen=True)
class FeaturizerParams:
    """Everything that decides the ids; stored in every model file."""

    buckets_log2: int = 18
    seed: int = 0
    char_ngram_min: int = 2  # 2..5 beat 3..5 and 1..5 on CLINC150's validation split
    char_ngram_max: int = 5
    word_bigrams: bool = True

    @property
    def buckets(self) -> int:
        return 1 << self.buckets_log2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeaturizerParams:
        return cls(
            buckets_log2=int(data["buckets_log2"]),
            seed=int(data["seed"]),
            char_ngram_min=int(data["char_ngram_min"]),
            char_ngram_max=int(data["char_ngram_max"]),
            word_bigrams=bool(data["word_bigrams"]),
        )


class Featurizer:
    """``featurize(text) -> int64 ids`` in ``[0, buckets)``; ``buckets`` itself is padding."""

    def __init__(self, params: FeaturizerParams | None = None, *, native: bool | None = None):
        self.params = params or FeaturizerParams()
        use_native = USING_NATIVE if native is None else native
        if use_native and NativeHashedNgrams is None:
            raise RuntimeError("the native featurizer is not built")
        impl_class = NativeHashedNgrams if use_native else ReferenceHashedNgrams
        self.native = bool(use_native)
        self._impl: _HashedNgrams = impl_class(**self.params.to_dict())

    @property
    def pad_id(self) -> int:
        return self.params.buckets

    def featurize(self, text: str) -> np.ndarray:
        return self._impl.featurize_normalized(normalize(text))

    def featurize_batch(self, texts: Sequence[str]) -> np.ndarray:
        """A ``[len(texts), longest]`` int64 matrix, rows padded with ``pad_id``.

        One call into the featurizer for the whole batch, which natively writes the padded
        matrix in place: 512 texts of 20 words take 2.3 ms, against 2.8 ms for a featurize call
        and a row copy per text.
        """
        return self._impl.featurize_batch_normalized([normalize(text) for text in texts])
