# cython: language_level=3
# C-level interface of the fast family's linear head; the implementation is
# native/linear_head.pyx (Cython finds a module's .pxd by its package path, router/_native/).

from libc.stdint cimport int64_t


cdef bint linear_head_kernel(const int64_t* ids, Py_ssize_t batch, Py_ssize_t length,
                             const int64_t* remap, const float* weights, Py_ssize_t rows,
                             Py_ssize_t classes, const float* bias, int64_t pad_id,
                             float* out, int64_t* bad) noexcept nogil


cdef bint scaled_head_kernel(const int64_t* ids, Py_ssize_t batch, Py_ssize_t length,
                             const int64_t* remap, const signed char* weights,
                             const float* scales, Py_ssize_t rows, Py_ssize_t classes,
                             const float* bias, int64_t pad_id, float* out,
                             int64_t* bad) noexcept nogil
