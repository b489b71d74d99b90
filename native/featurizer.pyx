# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Hashed n-gram featurizer: the native twin of ``router.routing.featurizer_ref``.

The text arrives already NFKC-normalised and casefolded (``router.routing.featurizer.normalize``
does that with CPython's own tables). Here, without the GIL, each code point is classified:
alphanumerics build words, control/format characters are dropped without breaking a word, and
everything else separates words. Each word, each pair of adjacent words and each character
n-gram of ``\\x02word\\x03`` is hashed with MurmurHash3 (x86, 32 bit) over its UTF-32 code
units and masked into ``2**k`` buckets. Ids come out in a fixed order: word unigrams, word
bigrams, then character n-grams word by word, shortest n first.

The C-level declarations are in ``router/_native/featurizer.pxd``. Each call makes exactly one
allocation for all its working memory (``Scratch``) and frees it before returning; nothing is
shared between calls, so threads may featurize concurrently with the GIL released.
"""

from cpython.unicode cimport PyUnicode_AsUCS4, PyUnicode_GET_LENGTH
from libc.stdint cimport int64_t, uint32_t
from libc.stdlib cimport free, malloc
from murmurhash.mrmr cimport hash32

import numpy as np

cimport numpy as cnp

cnp.import_array()


cdef extern from "Python.h":
    bint Py_UNICODE_ISALNUM(Py_UCS4 ch) nogil
    bint Py_UNICODE_ISSPACE(Py_UCS4 ch) nogil
    bint Py_UNICODE_ISPRINTABLE(Py_UCS4 ch) nogil
    const Py_ssize_t PY_SSIZE_T_MAX

cdef enum CharClass:
    WORD = 0
    SEPARATOR = 1
    DROPPED = 2

cdef enum:
    BOW = 0x02  # marks the beginning of a word in character n-grams
    EOW = 0x03  # marks the end of a word


cdef CharClass classify_any(Py_UCS4 ch) noexcept nogil:
    if Py_UNICODE_ISALNUM(ch):
        return WORD
    if Py_UNICODE_ISSPACE(ch) or Py_UNICODE_ISPRINTABLE(ch):
        return SEPARATOR
    return DROPPED


# Py_UNICODE_ISALNUM is up to four calls into CPython's tables for a non-alphanumeric code
# point; ASCII, most of a typical query, is looked up in a table filled from the same calls
# (a batch of 512 texts of 20 ASCII words: 2.3 ms with the table, 2.8 ms without).
cdef unsigned char ASCII_CLASS[128]


cdef void fill_ascii_classes() noexcept nogil:
    cdef Py_UCS4 ch
    for ch in range(128):
        ASCII_CLASS[ch] = <unsigned char> classify_any(ch)


fill_ascii_classes()


cdef inline CharClass classify(Py_UCS4 ch) noexcept nogil:
    if ch < 128:
        return <CharClass> ASCII_CLASS[ch]
    return classify_any(ch)


cdef inline Py_ssize_t max_words(Py_ssize_t length) noexcept nogil:
    # every word has a letter and a separator stands between two words
    return (length + 1) // 2


cdef bint scratch_init(Scratch* scratch, Py_ssize_t n_texts, Py_ssize_t total_codes,
                       Py_ssize_t longest) noexcept nogil:
    """One allocation for ``n_texts`` texts of ``total_codes`` code points, none longer than
    ``longest``; False when out of memory (``scratch`` then owns nothing)."""
    cdef Py_ssize_t limit = PY_SSIZE_T_MAX // 64  # keeps every size below from overflowing
    cdef Py_ssize_t words, size
    cdef char* block
    scratch.block = NULL
    if n_texts < 0 or total_codes < 0 or longest < 0:
        return False
    if n_texts > limit or total_codes > limit or longest > limit:
        return False
    words = max_words(longest)
    # 8-byte members first, so that each member is aligned without padding
    size = ((n_texts + 1) + n_texts + 2 * words) * <Py_ssize_t> sizeof(Py_ssize_t)
    size += words * <Py_ssize_t> sizeof(uint32_t)
    size += (total_codes + longest + 2 * words) * <Py_ssize_t> sizeof(Py_UCS4)
    block = <char*> malloc(<size_t> size if size > 0 else 1)
    if block == NULL:
        return False
    scratch.block = block
    scratch.offsets = <Py_ssize_t*> block
    scratch.counts = scratch.offsets + (n_texts + 1)
    scratch.starts = scratch.counts + n_texts
    scratch.lengths = scratch.starts + words
    scratch.word_hashes = <uint32_t*> (scratch.lengths + words)
    scratch.codes = <Py_UCS4*> (scratch.word_hashes + words)
    scratch.letters = scratch.codes + total_codes
    return True


cdef void scratch_release(Scratch* scratch) noexcept nogil:
    free(scratch.block)
    scratch.block = NULL


cdef Py_ssize_t split_words(const Py_UCS4* text, Py_ssize_t length,
                            Scratch* scratch) noexcept nogil:
    """Lay the words of ``text`` out in ``scratch.letters``; return how many there are.

    ``scratch`` must have been sized for at least ``length`` code points.
    """
    cdef Py_UCS4* letters = scratch.letters
    cdef Py_ssize_t* starts = scratch.starts
    cdef Py_ssize_t* lengths = scratch.lengths
    cdef Py_ssize_t i, n_letters = 0, n_words = 0
    cdef bint in_word = False
    cdef CharClass cls
    cdef Py_UCS4 ch
    for i in range(length):
        ch = text[i]
        cls = classify(ch)
        if cls == WORD:
            if not in_word:
                in_word = True
                letters[n_letters] = BOW
                n_letters += 1
                starts[n_words] = n_letters
            letters[n_letters] = ch
            n_letters += 1
        elif cls == SEPARATOR and in_word:
            in_word = False
            lengths[n_words] = n_letters - starts[n_words]
            letters[n_letters] = EOW
            n_letters += 1
            n_words += 1
    if in_word:
        lengths[n_words] = n_letters - starts[n_words]
        letters[n_letters] = EOW
        n_words += 1
    return n_words


cdef inline Py_ssize_t ngrams_in_word(Py_ssize_t word_length,
                                      const FeaturizerParams* params) noexcept nogil:
    cdef Py_ssize_t padded = word_length + 2, total = 0
    cdef int n
    for n in range(params.char_ngram_min, params.char_ngram_max + 1):
        if padded >= n:
            total += padded - n + 1
    return total


cdef Py_ssize_t count_ids(const Scratch* scratch, Py_ssize_t n_words,
                          const FeaturizerParams* params) noexcept nogil:
    """How many ids ``fill_ids`` writes for the words ``split_words`` laid out."""
    cdef Py_ssize_t w, total = n_words
    if params.word_bigrams and n_words > 1:
        total += n_words - 1
    for w in range(n_words):
        total += ngrams_in_word(scratch.lengths[w], params)
    return total


cdef Py_ssize_t fill_ids(const Scratch* scratch, Py_ssize_t n_words,
                         const FeaturizerParams* params, int64_t* out) noexcept nogil:
    """Write the ids of the words ``split_words`` laid out; return how many were written."""
    cdef const Py_UCS4* letters = scratch.letters
    cdef const Py_ssize_t* starts = scratch.starts
    cdef const Py_ssize_t* lengths = scratch.lengths
    cdef uint32_t* word_hashes = scratch.word_hashes
    cdef uint32_t mask = params.mask
    cdef uint32_t pair[2]
    cdef uint32_t bigram_seed = params.seed + 1u, char_seed = params.seed + 2u
    cdef Py_ssize_t w, i, padded, k = 0
    cdef const Py_UCS4* word
    cdef int n
    for w in range(n_words):
        word_hashes[w] = hash32(<void*> &letters[starts[w]],
                                <int> (lengths[w] * <Py_ssize_t> sizeof(Py_UCS4)), params.seed)
        out[k] = word_hashes[w] & mask
        k += 1
    if params.word_bigrams:
        for w in range(1, n_words):
            pair[0] = word_hashes[w - 1]
            pair[1] = word_hashes[w]
            out[k] = hash32(<void*> pair, <int> sizeof(pair), bigram_seed) & mask
            k += 1
    for w in range(n_words):
        word = &letters[starts[w] - 1]  # the BOW marker: the word is padded in place
        padded = lengths[w] + 2
        for n in range(params.char_ngram_min, params.char_ngram_max + 1):
            for i in range(padded - n + 1):
                out[k] = hash32(<void*> &word[i], <int> (n * sizeof(Py_UCS4)), char_seed) & mask
                k += 1
    return k


cdef class HashedNgrams:
    """Featurizer over normalised text; ``featurize_normalized(text) -> int64 ids``."""

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

    @property
    def pad_id(self):
        """The id that pads batch rows: ``2**buckets_log2``, one past the last bucket."""
        return 1 << self.buckets_log2

    def featurize_normalized(self, text):
        """Ids for text that ``normalize`` has already prepared."""
        cdef Py_ssize_t length, n_words, count
        cdef Scratch scratch
        cdef cnp.ndarray ids
        if not isinstance(text, str):
            raise TypeError(f"text is {type(text).__name__}, not str")
        length = PyUnicode_GET_LENGTH(text)
        if not scratch_init(&scratch, 1, length, length):
            raise MemoryError()
        try:
            if length:
                PyUnicode_AsUCS4(text, scratch.codes, length, 0)
            with nogil:
                n_words = split_words(scratch.codes, length, &scratch)
                count = count_ids(&scratch, n_words, &self.params)
            ids = np.empty(count, dtype=np.int64)
            with nogil:
                fill_ids(&scratch, n_words, &self.params, <int64_t*> cnp.PyArray_DATA(ids))
            return ids
        finally:
            scratch_release(&scratch)

    def featurize_batch_normalized(self, texts):
        """Ids of normalised ``texts`` as one ``[len(texts), longest]`` int64 matrix.

        Row ``i`` is ``featurize_normalized(texts[i])`` followed by ``pad_id`` up to the width
        of the longest row (at least one column).
        """
        cdef list items = list(texts)  # our own references: the texts outlive the nogil loops
        cdef Py_ssize_t n = len(items), i, j, length, total = 0, longest = 0, width = 1
        cdef Py_ssize_t n_words, start, end
        cdef int64_t pad = (<int64_t> 1) << self.buckets_log2
        cdef int64_t* row
        cdef int64_t* base
        cdef Scratch scratch
        cdef cnp.ndarray out
        for i in range(n):
            if not isinstance(items[i], str):
                raise TypeError(f"texts[{i}] is {type(items[i]).__name__}, not str")
            length = PyUnicode_GET_LENGTH(items[i])
            total += length
            if length > longest:
                longest = length
        if not scratch_init(&scratch, n, total, longest):
            raise MemoryError()
        try:
            scratch.offsets[0] = 0
            for i in range(n):
                length = PyUnicode_GET_LENGTH(items[i])
                if length:
                    PyUnicode_AsUCS4(items[i], scratch.codes + scratch.offsets[i], length, 0)
                scratch.offsets[i + 1] = scratch.offsets[i] + length
            with nogil:
                for i in range(n):
                    start = scratch.offsets[i]
                    end = scratch.offsets[i + 1]
                    n_words = split_words(scratch.codes + start, end - start, &scratch)
                    scratch.counts[i] = count_ids(&scratch, n_words, &self.params)
                    if scratch.counts[i] > width:
                        width = scratch.counts[i]
            out = np.empty((n, width), dtype=np.int64)
            base = <int64_t*> cnp.PyArray_DATA(out)
            with nogil:
                for i in range(n):
                    start = scratch.offsets[i]
                    end = scratch.offsets[i + 1]
                    row = base + i * width
                    n_words = split_words(scratch.codes + start, end - start, &scratch)
                    fill_ids(&scratch, n_words, &self.params, row)
                    for j in range(scratch.counts[i], width):
                        row[j] = pad
            return out
        finally:
            scratch_release(&scratch)
