# cython: language_level=3
# C-level interface of the structured-PII scanner; the implementation is native/pii.pyx and its
# pure-Python reference router/governance/pii_scan_ref.py (Cython finds a module's .pxd by its
# package path, router/_native/, not beside the .pyx).
#
# Another extension can cimport these to scan without Python calls. They run without the GIL and
# keep no state between calls, so any number of threads may scan at once, each with its own
# PiiCandidates.

from libc.stdint cimport uint32_t


cdef enum:
    # the kinds: indices into KINDS; bit 1 << kind of a scan's mask selects the kind
    PII_EMAIL = 0
    PII_PHONE = 1
    PII_CARD = 2
    PII_IBAN = 3
    PII_SSN = 4
    PII_IP_ADDRESS = 5
    PII_URL = 6
    PII_DATE_OF_BIRTH = 7
    PII_POSTCODE = 8

cdef enum:
    PII_KINDS = 9
    PII_PAD = 64  # zeros a scanned text needs on each side (see pii_scan_codes)


cdef struct PiiCandidate:
    int kind
    Py_ssize_t start     # code point offsets, end exclusive
    Py_ssize_t end
    double score


cdef struct PiiCandidates:
    # A growing array; start with all members zero, release with pii_candidates_release.
    PiiCandidate* items
    Py_ssize_t count
    Py_ssize_t capacity


# Propose candidates for the kinds in ``mask`` into ``out`` (appended). ``text`` holds ``length``
# code points (UCS4) and must be readable, as zeros, from text[-PII_PAD] to
# text[length + PII_PAD - 1]. False when out of memory.
cdef bint pii_scan_codes(const uint32_t* text, Py_ssize_t length, unsigned int mask,
                         PiiCandidates* out) noexcept nogil

# Keep the candidates that win their overlaps (checksummed first, then longest, earliest, by
# kind priority), sorted by start. False when out of memory (``candidates`` is then unchanged).
cdef bint pii_resolve(PiiCandidates* candidates, Py_ssize_t length) noexcept nogil

cdef void pii_candidates_release(PiiCandidates* candidates) noexcept nogil
