# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The fast family's head, run natively: the twin of the ONNX graphs ``build_linear_onnx`` writes.

probs[b] = softmax(sum_j W[remap[ids[b, j]]] / sqrt(max(1, #{j: ids[b, j] < pad_id})) + bias)

``W`` is float32, or a file's int8 rows with their scales, summed as ``row * scale`` with each
product rounded to float32 (the extension is built with ``-ffp-contract=off``): the same
products the ONNX graph's ``Cast`` and ``Mul`` make, so the same sums as the rows multiplied
out, from a quarter of the memory. onnxruntime runs
the same graph in ~8 µs warm, but its per-call machinery costs several times that when the
caches are cold between requests on a busy server; this loop reads only the rows the request
touches. ``router.routing.linear_head_ref`` is the numpy reference. The C-level kernel is
declared in ``router/_native/linear_head.pxd``.
"""

from libc.math cimport exp, sqrt
from libc.stdint cimport int64_t
from libc.string cimport memset

import numpy as np


cdef extern from *:
    """
    /* One weight row added into the accumulator. The pointers never overlap (restrict), so
       the loop is vectorised; on x86-64 with glibc it is also compiled for AVX2 and the loader
       picks the variant the CPU runs (an ifunc), elsewhere the baseline build serves. Every
       variant adds element by element, so all give the same sums. A 151-label CLINC150 model
       over ~130 ids: ~7 µs with AVX2 against ~12 µs for the plain loop. */
    #if defined(__x86_64__) && defined(__GLIBC__) && (defined(__GNUC__) || defined(__clang__))
    #define PLEXUS_CLONES __attribute__((target_clones("avx2", "default")))
    #else
    #define PLEXUS_CLONES
    #endif
    PLEXUS_CLONES static void plexus_add_row(float *restrict acc, const float *restrict row,
                                             Py_ssize_t n) {
        for (Py_ssize_t c = 0; c < n; c++) acc[c] += row[c];
    }
    /* An int8 row times its scale, added: each product rounded to float32 before the sum
       (the extension is built with -ffp-contract=off, so no fused multiply-add), which is
       exactly what adding the row multiplied out in float32 gives. A quarter of the bytes of
       a float32 row to keep in the caches. */
    PLEXUS_CLONES static void plexus_add_scaled_row(float *restrict acc,
                                                    const signed char *restrict row,
                                                    float scale, Py_ssize_t n) {
        for (Py_ssize_t c = 0; c < n; c++) acc[c] += (float)row[c] * scale;
    }
    /* Between requests the remap table (2 MB for CLINC150's 2^18 buckets) and the rows are
       mostly out of the caches, and each id's row address waits on its remap entry: asked
       for all at once (every remap entry, then each row a few ids ahead), the loads overlap
       instead of waiting in turn. Hints only: they change no result. A CLINC150 decision's
       head, cold, on the machine of docs/benchmarks.md: p50 20-29 µs and p99 58-78 µs
       without, 15-16 µs and 45-48 µs with. */
    static inline void plexus_prefetch(const void *at) {
    #if defined(__GNUC__) || defined(__clang__)
        __builtin_prefetch(at, 0, 0);
    #endif
    }
    static inline void plexus_prefetch_lines(const void *start, Py_ssize_t bytes) {
        for (Py_ssize_t at = 0; at < bytes; at += 64) plexus_prefetch((const char *)start + at);
    }
    """
    void plexus_add_row(float* acc, const float* row, Py_ssize_t n) noexcept nogil
    void plexus_add_scaled_row(float* acc, const signed char* row, float scale,
                               Py_ssize_t n) noexcept nogil
    void plexus_prefetch(const void* at) noexcept nogil
    void plexus_prefetch_lines(const void* start, Py_ssize_t bytes) noexcept nogil


cdef enum:
    PREFETCH_AHEAD = 4  # ids


cdef inline void finish_row(float* acc, Py_ssize_t classes, double count,
                            const float* bias) noexcept nogil:
    """Scale the summed row by 1/sqrt(max(1, count)), add the bias, softmax in place."""
    cdef Py_ssize_t c
    cdef double norm = sqrt(count if count > 1.0 else 1.0), top = -1e300, total = 0.0
    for c in range(classes):
        acc[c] = <float> (acc[c] / norm + bias[c])
        if acc[c] > top:
            top = acc[c]
    for c in range(classes):
        acc[c] = <float> exp(acc[c] - top)
        total += acc[c]
    for c in range(classes):
        acc[c] = <float> (acc[c] / total)


cdef bint linear_head_kernel(const int64_t* ids, Py_ssize_t batch, Py_ssize_t length,
                             const int64_t* remap, const float* weights, Py_ssize_t rows,
                             Py_ssize_t classes, const float* bias, int64_t pad_id,
                             float* out, int64_t* bad) noexcept nogil:
    """Probabilities into ``out`` (``[batch, classes]``, C order) for padded ``ids``.

    ``remap`` has ``pad_id + 1`` entries; ``weights`` is ``[rows, classes]`` and ``bias``
    ``[classes]``, both C order. Returns False, with the offending id in ``bad``, when an id is
    outside ``[0, pad_id]`` or remaps outside the weights; ``out`` is then unspecified.
    """
    return head_kernel(ids, batch, length, remap, weights, NULL, NULL, rows, classes, bias,
                       pad_id, out, bad)


cdef bint scaled_head_kernel(const int64_t* ids, Py_ssize_t batch, Py_ssize_t length,
                             const int64_t* remap, const signed char* weights,
                             const float* scales, Py_ssize_t rows, Py_ssize_t classes,
                             const float* bias, int64_t pad_id, float* out,
                             int64_t* bad) noexcept nogil:
    """:func:`linear_head_kernel` over int8 rows ``weights`` with a float32 scale per row
    (``scales``, ``[rows]``): the same probabilities as over the rows multiplied out."""
    return head_kernel(ids, batch, length, remap, NULL, weights, scales, rows, classes, bias,
                       pad_id, out, bad)


cdef inline bint head_kernel(const int64_t* ids, Py_ssize_t batch, Py_ssize_t length,
                             const int64_t* remap, const float* weights,
                             const signed char* qweights, const float* scales, Py_ssize_t rows,
                             Py_ssize_t classes, const float* bias, int64_t pad_id,
                             float* out, int64_t* bad) noexcept nogil:
    cdef Py_ssize_t b, j
    cdef int64_t token, row
    cdef double count
    cdef float* acc
    cdef const int64_t* ids_row
    for b in range(batch):
        acc = out + b * classes  # accumulate in float32, as the ONNX graph does
        memset(acc, 0, classes * sizeof(float))
        ids_row = ids + b * length
        count = 0.0
        for j in range(length):  # ask for every remap entry first: the loads overlap
            token = ids_row[j]
            if 0 <= token <= pad_id:
                plexus_prefetch(remap + token)
        for j in range(length):
            if j + PREFETCH_AHEAD < length:
                token = ids_row[j + PREFETCH_AHEAD]
                if 0 <= token <= pad_id:
                    row = remap[token]
                    if 0 <= row < rows:
                        if qweights != NULL:
                            plexus_prefetch_lines(qweights + row * classes, classes)
                        else:
                            plexus_prefetch_lines(weights + row * classes, classes * 4)
            token = ids_row[j]
            if token < 0 or token > pad_id:
                bad[0] = token
                return False
            if token < pad_id:
                count = count + 1.0
            row = remap[token]
            if row < 0 or row >= rows:
                bad[0] = token
                return False
            if qweights != NULL:
                plexus_add_scaled_row(acc, qweights + row * classes, scales[row], classes)
            else:
                plexus_add_row(acc, weights + row * classes, classes)
        finish_row(acc, classes, count, bias)
    return True


cdef check_shapes(Py_ssize_t bias_len, Py_ssize_t classes, Py_ssize_t remap_len, int64_t pad_id):
    if bias_len != classes:
        raise ValueError(f"bias has {bias_len} entries for {classes} classes")
    if remap_len != pad_id + 1:
        raise ValueError(f"remap has {remap_len} entries; expected pad_id + 1 = {pad_id + 1}")


def linear_head_probs(ids, remap, weights, bias, int64_t pad_id, scales=None):
    """Probabilities ``[batch, classes]`` (float32) for padded ids ``[batch, length]``, over
    float32 ``weights``, or int8 ``weights`` with their ``scales``."""
    return LinearHead(remap, weights, bias, pad_id, scales).probs(ids)


cdef class LinearHead:
    """One model's head, checked once: ``probs(ids)`` is :func:`linear_head_probs` without
    re-reading the weights, bias and remap table on every call (about 1.5 µs of a decision).

    ``weights`` is float32 ``[rows, classes]``, or int8 with ``scales`` (float32 ``[rows]``):
    the rows multiplied out by their scales, summed as the int8 rows and their scales (the
    same sums, from a quarter of the memory). The arrays are referenced, not copied: they must
    not change while the head is in use.
    """

    cdef const int64_t[::1] remap
    cdef const float[:, ::1] weights
    cdef const signed char[:, ::1] qweights
    cdef const float[::1] scales
    cdef const float[::1] bias
    cdef readonly int64_t pad_id
    cdef Py_ssize_t rows, classes
    cdef bint scaled

    def __init__(self, const int64_t[::1] remap, weights, const float[::1] bias,
                 int64_t pad_id, scales=None):
        self.scaled = scales is not None
        if self.scaled:
            self.qweights = weights
            self.scales = scales
            self.rows, self.classes = self.qweights.shape[0], self.qweights.shape[1]
            if self.scales.shape[0] != self.rows:
                raise ValueError(f"{self.scales.shape[0]} scales for {self.rows} weight rows")
        else:
            self.weights = weights
            self.rows, self.classes = self.weights.shape[0], self.weights.shape[1]
        if self.rows == 0:
            raise ValueError("the head has no weight rows")
        check_shapes(bias.shape[0], self.classes, remap.shape[0], pad_id)
        self.remap = remap
        self.bias = bias
        self.pad_id = pad_id

    def probs(self, const int64_t[:, ::1] ids):
        """Probabilities ``[batch, classes]`` (float32) for padded ids ``[batch, length]``."""
        cdef Py_ssize_t batch = ids.shape[0], length = ids.shape[1]
        cdef int64_t bad = 0
        cdef bint ok
        out_array = np.empty((batch, self.classes), dtype=np.float32)
        cdef float[:, ::1] out = out_array
        if batch == 0:
            return out_array
        with nogil:
            if self.scaled:
                ok = scaled_head_kernel(&ids[0, 0], batch, length, &self.remap[0],
                                        &self.qweights[0, 0], &self.scales[0], self.rows,
                                        self.classes, &self.bias[0], self.pad_id, &out[0, 0],
                                        &bad)
            else:
                ok = linear_head_kernel(&ids[0, 0], batch, length, &self.remap[0],
                                        &self.weights[0, 0], self.rows, self.classes,
                                        &self.bias[0], self.pad_id, &out[0, 0], &bad)
        if not ok:
            raise ValueError(f"feature id {bad} is outside [0, {self.pad_id}]")
        return out_array
