# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The fast family's head, run natively: the twin of the ONNX graph ``build_linear_onnx`` writes.

probs[b] = softmax(sum_j W[remap[ids[b, j]]] / sqrt(max(1, #{j: ids[b, j] < pad_id})) + bias)

onnxruntime runs the same graph in ~8 µs warm, but its per-call machinery costs several times
that when the caches are cold between requests on a busy server; this loop reads only the rows
the request touches. ``router.routing.linear_head_ref`` is the numpy reference.
"""

from libc.math cimport exp, sqrt
from libc.stdint cimport int64_t

import numpy as np


def linear_head_probs(const int64_t[:, ::1] ids, const int64_t[::1] remap,
                      const float[:, ::1] weights, const float[::1] bias, int64_t pad_id):
    """Probabilities ``[batch, classes]`` (float32) for padded ids ``[batch, length]``."""
    cdef Py_ssize_t batch = ids.shape[0], length = ids.shape[1]
    cdef Py_ssize_t classes = weights.shape[1], rows = weights.shape[0]
    cdef Py_ssize_t b, j, c
    cdef int64_t bad = 0
    cdef bint failed = False
    cdef int64_t token, row
    cdef double count, norm, top, total
    if bias.shape[0] != classes:
        raise ValueError(f"bias has {bias.shape[0]} entries for {classes} classes")
    if remap.shape[0] != pad_id + 1:
        raise ValueError(f"remap has {remap.shape[0]} entries; expected pad_id + 1 = {pad_id + 1}")
    out_array = np.zeros((batch, classes), dtype=np.float32)
    cdef float[:, ::1] out = out_array
    cdef float* acc
    cdef const float* weight_row
    cdef const float* weight_base = &weights[0, 0]
    cdef const float* bias_row = &bias[0]
    with nogil:
        for b in range(batch):
            acc = &out[b, 0]  # accumulate in float32, as the ONNX graph does
            count = 0.0
            for j in range(length):
                token = ids[b, j]
                if token < 0 or token > pad_id:
                    bad = token
                    failed = True
                    break
                if token < pad_id:
                    count = count + 1.0
                row = remap[token]
                if row < 0 or row >= rows:
                    bad = token
                    failed = True
                    break
                weight_row = weight_base + row * classes
                for c in range(classes):
                    acc[c] += weight_row[c]
            if failed:
                break
            norm = sqrt(count if count > 1.0 else 1.0)
            top = -1e300
            for c in range(classes):
                acc[c] = <float> (acc[c] / norm + bias_row[c])
                if acc[c] > top:
                    top = acc[c]
            total = 0.0
            for c in range(classes):
                acc[c] = <float> exp(acc[c] - top)
                total += acc[c]
            for c in range(classes):
                acc[c] = <float> (acc[c] / total)
    if failed:
        raise ValueError(f"feature id {bad} is outside [0, {pad_id}]")
    return out_array
