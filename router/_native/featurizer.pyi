from collections.abc import Sequence

import numpy as np

class HashedNgrams:
    buckets_log2: int
    seed: int
    char_ngram_min: int
    char_ngram_max: int
    word_bigrams: bool
    def __init__(
        self,
        buckets_log2: int = 18,
        seed: int = 0,
        char_ngram_min: int = 3,
        char_ngram_max: int = 5,
        word_bigrams: bool = True,
    ) -> None: ...
    @property
    def pad_id(self) -> int: ...
    def featurize_normalized(self, text: str) -> np.ndarray: ...
    def featurize_batch_normalized(self, texts: Sequence[str]) -> np.ndarray: ...
