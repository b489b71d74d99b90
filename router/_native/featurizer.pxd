# cython: language_level=3
# C-level interface of the hashed n-gram featurizer; the implementation is native/featurizer.pyx
# (Cython finds a module's .pxd by its package path, router/_native/, not beside the .pyx).
#
# Another extension can cimport these to featurize without Python calls. Every function runs
# without the GIL and keeps no state between calls, so any number of threads may use them at
# once as long as each brings its own Scratch.

from libc.stdint cimport int64_t, uint32_t


cdef struct FeaturizerParams:
    uint32_t seed
    uint32_t mask          # buckets - 1; buckets is a power of two
    int char_ngram_min
    int char_ngram_max
    bint word_bigrams


cdef struct Scratch:
    # All working memory of one call, carved out of one allocation (``block``).
    void* block
    Py_UCS4* codes           # the input text(s) as UCS4 code points, back to back
    Py_ssize_t* offsets      # text i is codes[offsets[i]:offsets[i + 1]]
    Py_ssize_t* counts       # ids per text
    Py_UCS4* letters         # the words of one text as \x02 word \x03, back to back
    Py_ssize_t* starts       # index in letters of each word's first letter
    Py_ssize_t* lengths      # letters in each word
    uint32_t* word_hashes    # each word's full 32-bit hash (bigrams hash pairs of them)


cdef bint scratch_init(Scratch* scratch, Py_ssize_t n_texts, Py_ssize_t total_codes,
                       Py_ssize_t longest) noexcept nogil
cdef void scratch_release(Scratch* scratch) noexcept nogil

cdef Py_ssize_t split_words(const Py_UCS4* text, Py_ssize_t length,
                            Scratch* scratch) noexcept nogil
cdef Py_ssize_t count_ids(const Scratch* scratch, Py_ssize_t n_words,
                          const FeaturizerParams* params) noexcept nogil
cdef Py_ssize_t fill_ids(const Scratch* scratch, Py_ssize_t n_words,
                         const FeaturizerParams* params, int64_t* out) noexcept nogil


cdef class HashedNgrams:
    cdef FeaturizerParams params
    cdef readonly int buckets_log2
    cdef readonly uint32_t seed
    cdef readonly int char_ngram_min
    cdef readonly int char_ngram_max
    cdef readonly bint word_bigrams
