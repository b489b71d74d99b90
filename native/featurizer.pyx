# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Hashed n-gram featurizer: the native twin of ``router.routing.featurizer_ref``.

The text arrives already NFKC-normalised and casefolded (``router.routing.featurizer.normalize``
does that with CPython's own tables). Here, without the GIL, each code point is classified:
alphanumerics build words, control/format characters are dropped without breaking a word, and
everything else separates words. Each word, each pair of adjacent words and each character
n-gram of ``\\x02word\\x03`` is hashed with MurmurHash3 (x86, 32 bit) over its UTF-32 code
units and masked into ``2**k`` buckets. Ids come out in a fixed order: word unigrams, word
bigrams, then character n-grams word by word, shortest n first.
"""

from cpython.mem cimport PyMem_Free
from libc.stdlib cimport free, malloc
from libc.stdint cimport int64_t, uint32_t
from murmurhash.mrmr cimport hash32

import numpy as np

cimport numpy as cnp

cnp.import_array()


cdef struct FeaturizerParams:
    uint32_t seed
    uint32_t mask          # buckets - 1; buckets is a power of two
    int char_ngram_min
    int char_ngram_max
    bint word_bigrams

cdef extern from "Python.h":
    Py_UCS4* PyUnicode_AsUCS4Copy(object text) except NULL
    bint Py_UNICODE_ISALNUM(Py_UCS4 ch) nogil
    bint Py_UNICODE_ISSPACE(Py_UCS4 ch) nogil
    bint Py_UNICODE_ISPRINTABLE(Py_UCS4 ch) nogil

cdef enum CharClass:
    WORD = 0
    SEPARATOR = 1
    DROPPED = 2

cdef enum:
    BOW = 0x02  # marks the beginning of a word in character n-grams
    EOW = 0x03  # marks the end of a word


cdef inline CharClass classify(Py_UCS4 ch) noexcept nogil:
    if Py_UNICODE_ISALNUM(ch):
        return WORD
    if Py_UNICODE_ISSPACE(ch) or Py_UNICODE_ISPRINTABLE(ch):
        return SEPARATOR
    return DROPPED


cdef Py_ssize_t split_words(const Py_UCS4* text, Py_ssize_t length, Py_UCS4* letters,
                            Py_ssize_t* starts, Py_ssize_t* lengths) noexcept nogil:
    """Copy word characters into ``letters``; return the number of words found."""
    cdef Py_ssize_t i, n_letters = 0, n_words = 0, word_start = 0
    cdef bint in_word = False
    cdef CharClass cls
    for i in range(length):
        cls = classify(text[i])
        if cls == WORD:
            if not in_word:
                in_word = True
                word_start = n_letters
            letters[n_letters] = text[i]
            n_letters += 1
        elif cls == SEPARATOR and in_word:
            in_word = False
            starts[n_words] = word_start
            lengths[n_words] = n_letters - word_start
            n_words += 1
    if in_word:
        starts[n_words] = word_start
        lengths[n_words] = n_letters - word_start
        n_words += 1
    return n_words


cdef inline Py_ssize_t ngrams_in_word(Py_ssize_t word_length, const FeaturizerParams* params) noexcept nogil:
    cdef Py_ssize_t padded = word_length + 2, total = 0
    cdef int n
    for n in range(params.char_ngram_min, params.char_ngram_max + 1):
        if padded >= n:
            total += padded - n + 1
    return total


cdef Py_ssize_t count_or_fill(const Py_UCS4* text, Py_ssize_t length,
                              const FeaturizerParams* params, int64_t* out) noexcept nogil:
    """Count the ids (``out`` NULL) or write them; return the count, or -1 if out of memory."""
    cdef Py_UCS4* letters = <Py_UCS4*> malloc((length + 2) * sizeof(Py_UCS4))
    cdef Py_ssize_t* starts = <Py_ssize_t*> malloc((length + 1) * sizeof(Py_ssize_t))
    cdef Py_ssize_t* lengths = <Py_ssize_t*> malloc((length + 1) * sizeof(Py_ssize_t))
    cdef uint32_t* word_hashes = <uint32_t*> malloc((length + 1) * sizeof(uint32_t))
    cdef Py_UCS4* padded = <Py_UCS4*> malloc((length + 2) * sizeof(Py_UCS4))
    cdef Py_ssize_t n_words, w, i, L, k = 0
    cdef uint32_t pair[2]
    cdef int n
    if letters == NULL or starts == NULL or lengths == NULL or word_hashes == NULL or padded == NULL:
        k = -1
    else:
        n_words = split_words(text, length, letters, starts, lengths)
        if out == NULL:
            k = n_words
            if params.word_bigrams and n_words > 1:
                k += n_words - 1
            for w in range(n_words):
                k += ngrams_in_word(lengths[w], params)
        else:
            for w in range(n_words):
                word_hashes[w] = hash32(<void*> &letters[starts[w]],
                                        <int> (lengths[w] * sizeof(Py_UCS4)), params.seed)
                out[k] = word_hashes[w] & params.mask
                k += 1
            if params.word_bigrams:
                for w in range(1, n_words):
                    pair[0] = word_hashes[w - 1]
                    pair[1] = word_hashes[w]
                    out[k] = hash32(<void*> pair, <int> sizeof(pair), params.seed + 1) & params.mask
                    k += 1
            for w in range(n_words):
                L = lengths[w]
                padded[0] = BOW
                for i in range(L):
                    padded[i + 1] = letters[starts[w] + i]
                padded[L + 1] = EOW
                for n in range(params.char_ngram_min, params.char_ngram_max + 1):
                    for i in range(L + 2 - n + 1):
                        out[k] = hash32(<void*> &padded[i], <int> (n * sizeof(Py_UCS4)),
                                        params.seed + 2) & params.mask
                        k += 1
    free(letters)
    free(starts)
    free(lengths)
    free(word_hashes)
    free(padded)
    return k


cdef class HashedNgrams:
    """Featurizer over normalised text; ``featurize(text) -> int64 ids``."""

    cdef FeaturizerParams params
    cdef readonly int buckets_log2
    cdef readonly uint32_t seed
    cdef readonly int char_ngram_min
    cdef readonly int char_ngram_max
    cdef readonly bint word_bigrams

    def __init__(self, int buckets_log2=18, uint32_t seed=0, int char_ngram_min=3,
                 int char_ngram_max=5, bint word_bigrams=True):
        if not 1 <= buckets_log2 <= 31:
            raise ValueError(f"buckets_log2 must be in 1..31, got {buckets_log2}")
        if not 1 <= char_ngram_min <= char_ngram_max <= 16:
            raise ValueError(
                f"need 1 <= char_ngram_min <= char_ngram_max <= 16, got "
                f"{char_ngram_min}..{char_ngram_max}")
        self.buckets_log2 = buckets_log2
        self.seed = seed
        self.char_ngram_min = char_ngram_min
        self.char_ngram_max = char_ngram_max
        self.word_bigrams = word_bigrams
        self.params.seed = seed
        self.params.mask = (1u << buckets_log2) - 1u
        self.params.char_ngram_min = char_ngram_min
        self.params.char_ngram_max = char_ngram_max
        self.params.word_bigrams = word_bigrams

    def featurize_normalized(self, str text not None):
        """Ids for text that ``normalize`` has already prepared."""
        cdef Py_ssize_t length = len(text), count, written
        cdef Py_UCS4* codes = PyUnicode_AsUCS4Copy(text)
        cdef cnp.ndarray[cnp.int64_t, ndim=1] ids
        try:
            with nogil:
                count = count_or_fill(codes, length, &self.params, NULL)
            if count < 0:
                raise MemoryError()
            ids = np.empty(count, dtype=np.int64)
            with nogil:
                written = count_or_fill(codes, length, &self.params, <int64_t*> ids.data)
            if written != count:
                raise MemoryError()
            return ids
        finally:
            PyMem_Free(codes)
