# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The fast family's head, run natively: the twin of the ONNX graph ``build_linear_onnx`` writes.

probs[b] = softmax(sum_j W[remap[ids[b, j]]] / sqrt(max(1, #{j: ids[b, j] < pad_id})) + bias)

onnxruntime runs the same graph in ~8 µs warm, but its per-call machinery costs several times
that when the caches are cold between requests on a busy server; this loop reads only the rows
the request touches. ``router.routing.linear_head_ref`` is the numpy reference. The C-level
kernel is declared in ``router/_native/linear_head.pxd``.
"""

from libc.math cimport exp, sqrt
from libc.stdint cimport int64_t
from libc.string cimport memset

import numpy as np


cdef bint linear_head_kernel(const int64_t* ids, Py_ssize_t batch, Py_ssize_t length,
                             const int64_t* remap, const float* weights, Py_ssize_t rows,
                             Py_ssize_t classes, const float* bias, int64_t pad_id,
                             float* out, int64_t* bad) noexcept nogil:
    """Probabilities into ``out`` (``[batch, classes]``, C order) for padded ``ids``.

    ``remap`` has ``pad_id + 1`` entries; ``weights`` is ``[rows, classes]`` and ``bias``
    ``[classes]``, both C order. Returns False, with the offending id in ``bad``, when an id is
    outside ``[0, pad_id]`` or remaps outside the weights; ``out`` is then unspecified.
    """
    cdef Py_ssize_t b, j, c
    cdef int64_t token, row
    cdef double count, norm, top, total
    cdef float* acc
    cdef const float* weight_row
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
            weight_row = weights + row * classes
            for c in range(classes):
                acc[c] += weight_row[c]
        norm = sqrt(count if count > 1.0 else 1.0)
        top = -1e300
        for c in range(classes):
            acc[c] = <float> (acc[c] / norm + bias[c])
            if acc[c] > top:
                top = acc[c]
        total = 0.0
        for c in range(classes):
            acc[c] = <float> exp(acc[c] - top)
            total += acc[c]
        for c in range(classes):
            acc[c] = <float> (acc[c] / total)
    return True


def linear_head_probs(const int64_t[:, ::1] ids, const int64_t[::1] remap,
                      const float[:, ::1] weights, const float[::1] bias, int64_t pad_id):
    """Probabilities ``[batch, classes]`` (float32) for padded ids ``[batch, length]``."""
    cdef Py_ssize_t batch = ids.shape[0], length = ids.shape[1]
    cdef Py_ssize_t classes = weights.shape[1], rows = weights.shape[0]
    cdef int64_t bad = 0
    cdef bint ok
    if bias.shape[0] != classes:
        raise ValueError(f"bias has {bias.shape[0]} entries for {classes} classes")
    if remap.shape[0] != pad_id + 1:
        raise ValueError(f"remap has {remap.shape[0]} entries; expected pad_id + 1 = {pad_id + 1}")
    out_array = np.empty((batch, classes), dtype=np.float32)
    cdef float[:, ::1] out = out_array
    with nogil:
        ok = linear_head_kernel(&ids[0, 0], batch, length, &remap[0], &weights[0, 0], rows,
                                classes, &bias[0], pad_id, &out[0, 0], &bad)
    if not ok:
        raise ValueError(f"feature id {bad} is outside [0, {pad_id}]")
    return out_array
