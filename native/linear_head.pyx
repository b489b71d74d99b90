# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The fast family's head, run natively: the twin of the ONNX graphs ``build_linear_onnx`` writes.

probs[b] = softmax(sum_j W[remap[ids[b, j]]] / sqrt(max(1, #{j: ids[b, j] < pad_id})) + bias)

``W`` is float32 (a file's int8 rows are multiplied out by their scales when the model is
loaded, the same float32 products the ONNX graph's ``Cast`` and ``Mul`` make). onnxruntime runs
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
    """
    void plexus_add_row(float* acc, const float* row, Py_ssize_t n) noexcept nogil


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
        for j in range(length):
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
            plexus_add_row(acc, weights + row * classes, classes)
        finish_row(acc, classes, count, bias)
    return True


cdef check_shapes(Py_ssize_t bias_len, Py_ssize_t classes, Py_ssize_t remap_len, int64_t pad_id):
    if bias_len != classes:
        raise ValueError(f"bias has {bias_len} entries for {classes} classes")
    if remap_len != pad_id + 1:
        raise ValueError(f"remap has {remap_len} entries; expected pad_id + 1 = {pad_id + 1}")


def linear_head_probs(const int64_t[:, ::1] ids, const int64_t[::1] remap,
                      const float[:, ::1] weights, const float[::1] bias, int64_t pad_id):
    """Probabilities ``[batch, classes]`` (float32) for padded ids ``[batch, length]``."""
    cdef Py_ssize_t batch = ids.shape[0], length = ids.shape[1]
    cdef Py_ssize_t classes = weights.shape[1], rows = weights.shape[0]
    cdef int64_t bad = 0
    cdef bint ok
    check_shapes(bias.shape[0], classes, remap.shape[0], pad_id)
    out_array = np.empty((batch, classes), dtype=np.float32)
    cdef float[:, ::1] out = out_array
    with nogil:
        ok = linear_head_kernel(&ids[0, 0], batch, length, &remap[0], &weights[0, 0], rows,
                                classes, &bias[0], pad_id, &out[0, 0], &bad)
    if not ok:
        raise ValueError(f"feature id {bad} is outside [0, {pad_id}]")
    return out_array


cdef class LinearHead:
    """One model's head, checked once: ``probs(ids)`` is :func:`linear_head_probs` without
    re-reading the weights, bias and remap table on every call (about 1.5 µs of a decision).

    The arrays are referenced, not copied: they must not change while the head is in use.
    """

    cdef const int64_t[::1] remap
    cdef const float[:, ::1] weights
    cdef const float[::1] bias
    cdef readonly int64_t pad_id
    cdef Py_ssize_t rows, classes

    def __init__(self, const int64_t[::1] remap, const float[:, ::1] weights,
                 const float[::1] bias, int64_t pad_id):
        if weights.shape[0] == 0:
            raise ValueError("the head has no weight rows")
        check_shapes(bias.shape[0], weights.shape[1], remap.shape[0], pad_id)
        self.remap = remap
        self.weights = weights
        self.bias = bias
        self.pad_id = pad_id
        self.rows = weights.shape[0]
        self.classes = weights.shape[1]

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
            ok = linear_head_kernel(&ids[0, 0], batch, length, &self.remap[0],
                                    &self.weights[0, 0], self.rows, self.classes,
                                    &self.bias[0], self.pad_id, &out[0, 0], &bad)
        if not ok:
            raise ValueError(f"feature id {bad} is outside [0, {self.pad_id}]")
        return out_array
