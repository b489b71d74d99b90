# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Structured-PII scanner: the native twin of ``router.governance.pii_scan_ref``.

One walk over the text's code points, left to right, without the GIL: each detector is tried
only where the character at hand can start its entity (a digit, a letter at a word start,
``+``, ``(``, ``@``, ``::``), looks ahead a bounded number of characters or consumes what it
reads, and a kind never starts again before the end of its last candidate; cue words (birth,
phone, zip, US states) are noted on the way. No regular expression is involved. Then the
candidates are settled: checksummed first, longest, earliest, by kind priority, each kept only
where it overlaps nothing kept already.

Every function mirrors the reference function of the same name (less its leading underscore);
the reference documents the rules. The text is copied once into a buffer of UCS4 code units with
``PII_PAD`` zeros on each side, so looking a few characters behind the start or past the end
reads a zero, which no detector accepts (the reference reads the same zeros). The C-level
declarations are in ``router/_native/pii.pxd``.
"""

from cpython.unicode cimport PyUnicode_AsUCS4, PyUnicode_GET_LENGTH
from libc.stdlib cimport calloc, free, qsort, realloc
from libc.stdint cimport uint32_t
from libc.string cimport memcmp, memset


cdef extern from "Python.h":
    bint Py_UNICODE_ISALNUM(Py_UCS4 ch) nogil
    const Py_ssize_t PY_SSIZE_T_MAX


KINDS = ("EMAIL", "PHONE", "CARD", "IBAN", "SSN", "IP_ADDRESS", "URL", "DATE_OF_BIRTH",
         "POSTCODE")
ALL_KINDS = (1 << PII_KINDS) - 1

cdef unsigned int CHECKSUMMED = (1u << PII_CARD) | (1u << PII_IBAN)
# ties between candidates of the same length and start (an IPv4 address is also a dotted
# phone shape): the lower number wins
cdef int PRIORITY[PII_KINDS]

cdef enum:
    BIRTH_WINDOW = 40
    PHONE_WINDOW = 32
    ZIP_WINDOW = 20
    STATE_GAP = 3
    CUE_LIMIT = 12
    MAX_GROUPS = 24

cdef enum Cue:
    CUE_NONE = 0
    CUE_BIRTH = 1
    CUE_PHONE = 2
    CUE_ZIP = 3
    CUE_STATE = 4

cdef enum:
    C_DIGIT = 1
    C_UPPER = 2
    C_LOWER = 4
    C_HEX = 8
    C_LOCAL = 16
    C_URL = 32
    C_ALPHA = C_UPPER | C_LOWER
    C_ALNUM = C_ALPHA | C_DIGIT

cdef double SCORE_SCHEME = 1.0, SCORE_WWW = 0.9, SCORE_BARE = 0.7

# -- tables ----------------------------------------------------------------------------------------

cdef unsigned char CLASS[128]
cdef unsigned char IBAN_LENGTH[26 * 26]
cdef unsigned char STATE[26 * 26]

cdef const char* IBAN_TABLE = (
    b"AD24AE23AL28AT20AZ28BA20BE16BG22BH22BI27BR29BY28CH21CR22CY28CZ24DE22DJ27DK18DO28EE20"
    b"EG29ES24FI18FK18FO18FR27GB22GE22GI23GL18GR27GT28HN28HR21HU28IE22IL23IQ23IS26IT27JO30"
    b"KW30KZ20LB28LC32LI21LT20LU20LV21LY25MC27MD24ME22MK19MN20MR27MT31MU30NI28NL18NO15OM23"
    b"PK24PL28PS29PT25QA29RO24RS22RU33SA24SC31SD18SE24SI19SK24SM27SO23ST25SV28TL23TN24TR26"
    b"UA29VA22VG24XK20YE30")
cdef const char* STATE_TABLE = (
    b"ALAKAZARCACOCTDEDCFLGAHIIDILINIAKSKYLAMEMDMAMIMNMSMOMTNENVNHNJNMNYNCNDOHOKORPARISCSDTN"
    b"TXUTVTVAWAWVWIWYPRGUVIASMP")

# lower-case words, space-separated; a cue's kind is its list
cdef const char* BIRTH_CUES = b" born dob "
cdef const char* PHONE_CUES = b" phone phones telephone tel mobile cell cellphone fax call dial "
cdef const char* ZIP_CUES = b" zip zipcode postcode postal "
cdef const char* MONTH_NAMES = (
    b" january february march april may june july august september october november december"
    b" jan feb mar apr jun jul aug sep sept oct nov dec ")
cdef const char* TLD_NAMES = (
    b" com org net edu gov mil int info biz io ai app dev co me tv xyz online site shop store"
    b" tech cloud blog news name pro mobi eu asia uk de fr it es pt nl be ch at se no dk fi is"
    b" ie pl cz sk hu ro bg gr tr ru ua by lt lv ee si hr rs ba cy mt lu li mc us ca mx br ar"
    b" cl pe uy ve au nz jp cn hk tw kr in sg my id th vn ph za ng ke eg il ae sa qa ")
cdef const char* UK_INWARD = b"ABDEFGHJLNPQRSTUWXYZ"


cdef void fill_tables() noexcept nogil:
    cdef int c, k
    cdef const char* url_excluded = b"<>\"'`{}|\\^"
    cdef const char* priority = b"280154367"
    for k in range(PII_KINDS):
        PRIORITY[k] = priority[k] - 48
    for c in range(128):
        CLASS[c] = 0
        if 48 <= c <= 57:
            CLASS[c] |= C_DIGIT | C_HEX
        if 65 <= c <= 90:
            CLASS[c] |= C_UPPER
        if 97 <= c <= 122:
            CLASS[c] |= C_LOWER
        if 65 <= c <= 70 or 97 <= c <= 102:
            CLASS[c] |= C_HEX
        if CLASS[c] & C_ALNUM or c == 46 or c == 95 or c == 37 or c == 43 or c == 45:
            CLASS[c] |= C_LOCAL
        if 33 <= c <= 126:
            CLASS[c] |= C_URL
            k = 0
            while url_excluded[k]:
                if url_excluded[k] == c:
                    CLASS[c] &= ~C_URL
                k += 1
    memset(IBAN_LENGTH, 0, sizeof(IBAN_LENGTH))
    k = 0
    while IBAN_TABLE[k]:
        IBAN_LENGTH[(IBAN_TABLE[k] - 65) * 26 + IBAN_TABLE[k + 1] - 65] = (
            (IBAN_TABLE[k + 2] - 48) * 10 + IBAN_TABLE[k + 3] - 48)
        k += 4
    memset(STATE, 0, sizeof(STATE))
    k = 0
    while STATE_TABLE[k]:
        STATE[(STATE_TABLE[k] - 65) * 26 + STATE_TABLE[k + 1] - 65] = 1
        k += 2
    index_words(&BIRTH_WORDS, BIRTH_CUES)
    index_words(&PHONE_WORDS, PHONE_CUES)
    index_words(&ZIP_WORDS, ZIP_CUES)
    index_words(&MONTH_WORDS, MONTH_NAMES)
    index_words(&TLD_WORDS, TLD_NAMES)


fill_tables()

# -- character classes -----------------------------------------------------------------------------


cdef inline unsigned char cls(uint32_t c) noexcept nogil:
    return CLASS[c] if c < 128 else 0


cdef inline bint digit(uint32_t c) noexcept nogil:
    return 48 <= c <= 57


cdef inline bint upper(uint32_t c) noexcept nogil:
    return 65 <= c <= 90


cdef inline bint word(uint32_t c) noexcept nogil:
    if c < 128:
        return (CLASS[c] & C_ALNUM) != 0
    return Py_UNICODE_ISALNUM(c)


cdef inline uint32_t lower(uint32_t c) noexcept nogil:
    return c | 32 if 65 <= c <= 90 else c


cdef inline Py_ssize_t digits(const uint32_t* t, Py_ssize_t j) noexcept nogil:
    cdef Py_ssize_t k = j
    while k - j < 20 and 48 <= t[k] <= 57:
        k += 1
    return k - j


cdef inline long long number(const uint32_t* t, Py_ssize_t j, Py_ssize_t length) noexcept nogil:
    cdef long long value = 0
    cdef Py_ssize_t k
    for k in range(j, j + length):
        value = value * 10 + <long long> (t[k] - 48)
    return value


cdef inline bint starts_number(const uint32_t* t, Py_ssize_t i) noexcept nogil:
    cdef uint32_t p = t[i - 1]
    if word(p) or p == 95:
        return False
    return not ((p == 45 or p == 46 or p == 47 or p == 58) and digit(t[i - 2]))


cdef inline bint ends_number(const uint32_t* t, Py_ssize_t e) noexcept nogil:
    cdef uint32_t c = t[e]
    if word(c) or c == 95:
        return False
    return not ((c == 45 or c == 46 or c == 47 or c == 58) and digit(t[e + 1]))


cdef Py_ssize_t word_at(const uint32_t* t, Py_ssize_t i, Py_ssize_t limit,
                        char* out) noexcept nogil:
    """Length of the lower-cased ASCII word at ``i`` (written to ``out``, which has room for
    ``limit`` letters) when it has at most ``limit`` letters and ends there, else 0."""
    cdef Py_ssize_t k = i, j
    while k - i <= limit and t[k] < 128 and CLASS[t[k]] & C_ALPHA:
        k += 1
    if k - i > limit or word(t[k]):
        return 0
    for j in range(i, k):
        out[j - i] = <char> lower(t[j])
    return k - i


cdef struct WordList:
    const char* names     # lower-case words, each after a space, the last followed by one
    unsigned int first    # bit c - 'a' for the first letter c of each word
    unsigned int lengths  # bit n for each word of n letters


cdef WordList BIRTH_WORDS, PHONE_WORDS, ZIP_WORDS, MONTH_WORDS, TLD_WORDS


cdef void index_words(WordList* words, const char* names) noexcept nogil:
    cdef Py_ssize_t k = 0, n
    words.names = names
    words.first = 0
    words.lengths = 0
    while names[k]:
        if names[k] == 32 and names[k + 1]:
            words.first |= 1u << (names[k + 1] - 97)
            n = 0
            while names[k + 1 + n] != 32:
                n += 1
            words.lengths |= 1u << n
        k += 1


cdef bint in_list(const WordList* words, const char* w, Py_ssize_t length) noexcept nogil:
    """Whether ``w[:length]`` (lower-case letters) is one of ``words``. Most words of a text
    are ruled out by their first letter or length, without reading the list: a 600-character
    text scans in 21 µs at the median with this test, 30 µs without."""
    cdef const char* names = words.names
    cdef Py_ssize_t k = 0, m
    if length > 31 or not (words.lengths >> length & 1) or not (words.first >> (w[0] - 97) & 1):
        return False
    while names[k]:
        if names[k] == 32:
            m = 0
            while m < length and names[k + 1 + m] == w[m]:  # stops at the terminating zero
                m += 1
            if m == length and names[k + 1 + length] == 32:
                return True
        k += 1
    return False


# -- cue words -------------------------------------------------------------------------------------


cdef Cue cue_at(const uint32_t* t, Py_ssize_t i, Py_ssize_t* end) noexcept nogil:
    cdef char w[CUE_LIMIT + 1]
    cdef Py_ssize_t length = word_at(t, i, CUE_LIMIT, w)
    if length == 0:
        return CUE_NONE
    end[0] = i + length
    if length >= 5 and memcmp(w, b"birth", 5) == 0:
        return CUE_BIRTH
    if in_list(&BIRTH_WORDS, w, length):
        return CUE_BIRTH
    if in_list(&PHONE_WORDS, w, length):
        return CUE_PHONE
    if in_list(&ZIP_WORDS, w, length):
        return CUE_ZIP
    if length == 2 and upper(t[i]) and upper(t[i + 1]):
        if STATE[(t[i] - 65) * 26 + t[i + 1] - 65]:
            return CUE_STATE
    return CUE_NONE


# -- CARD ------------------------------------------------------------------------------------------


cdef bint luhn_card(const uint32_t* t, Py_ssize_t i, Py_ssize_t e, Py_ssize_t count) noexcept nogil:
    cdef int total = 0, parity = 0, d, first, second
    cdef bint nonzero = False
    cdef Py_ssize_t k = e - 1
    while k >= i:
        if digit(t[k]):
            d = <int> (t[k] - 48)
            if d:
                nonzero = True
            if parity:
                d *= 2
                if d > 9:
                    d -= 9
            total += d
            parity ^= 1
        k -= 1
    if not nonzero or total % 10:
        return False
    if count == 12:
        first = <int> (t[i] - 48)
        second = <int> (t[i + 1] - 48)
        return first == 6 or (first == 5 and (second == 0 or 6 <= second <= 8))
    return True


cdef Py_ssize_t card_at(const uint32_t* t, Py_ssize_t i) noexcept nogil:
    cdef Py_ssize_t run = digits(t, i), g, total, groups, previous, j, n_ends, k
    cdef Py_ssize_t end_at[8]
    cdef Py_ssize_t end_count[8]
    cdef uint32_t sep = t[i + 4]
    cdef bint ok, last
    if run == 4 and (sep == 32 or sep == 45) and digit(t[i + 5]):
        end_at[0] = i + 4
        end_count[0] = 4
        n_ends = 1
        total = 4
        groups = 1
        previous = 4
        j = i + 4
        while t[j] == sep and digit(t[j + 1]):
            g = digits(t, j + 1)
            last = False
            if groups == 2 and previous == 6:
                ok = g == 4 or g == 5
                last = True
            elif g == 4 or (g == 6 and groups == 1):
                ok = True
            else:
                ok = 1 <= g <= 3
                last = True
            if not ok or total + g > 19:
                break
            total += g
            j += 1 + g
            groups += 1
            previous = g
            end_at[n_ends] = j
            end_count[n_ends] = total
            n_ends += 1
            if last:
                break
        k = n_ends - 1
        while k >= 0:
            if end_count[k] < 12:
                break
            if ends_number(t, end_at[k]) and luhn_card(t, i, end_at[k], end_count[k]):
                return end_at[k]
            k -= 1
        return -1
    if 12 <= run <= 19 and ends_number(t, i + run) and luhn_card(t, i, i + run, run):
        return i + run
    return -1


# -- IBAN ------------------------------------------------------------------------------------------


cdef inline int iban_value(uint32_t c) noexcept nogil:
    if c <= 57:
        return <int> (c - 48)
    return <int> (lower(c) - 97) + 10


cdef Py_ssize_t iban_at(const uint32_t* t, Py_ssize_t i) noexcept nogil:
    cdef uint32_t a = t[i], b = t[i + 1], c
    cdef int length, count = 4, remainder = 0, value
    cdef Py_ssize_t j, k
    cdef bint spaced
    if not (cls(a) & cls(b) & C_ALPHA):
        return -1
    length = IBAN_LENGTH[(lower(a) - 97) * 26 + lower(b) - 97]
    if not length or not (digit(t[i + 2]) and digit(t[i + 3])):
        return -1
    spaced = t[i + 4] == 32
    j = i + 4
    while count < length:
        if count % 4 == 0 and spaced:
            if t[j] != 32:
                return -1
            j += 1
        c = t[j]
        if not cls(c) & C_ALNUM:
            return -1
        value = iban_value(c)
        remainder = (remainder * (100 if value > 9 else 10) + value) % 97
        j += 1
        count += 1
    if word(t[j]) or t[j] == 95:
        return -1
    for k in range(i, i + 4):
        value = iban_value(t[k])
        remainder = (remainder * (100 if value > 9 else 10) + value) % 97
    return j if remainder == 1 else -1


# -- SSN, IP addresses -----------------------------------------------------------------------------


cdef Py_ssize_t ssn_at(const uint32_t* t, Py_ssize_t i) noexcept nogil:
    cdef uint32_t sep
    cdef long long area
    if digits(t, i) != 3:
        return -1
    sep = t[i + 3]
    if (sep != 32 and sep != 45) or digits(t, i + 4) != 2 or t[i + 6] != sep:
        return -1
    if digits(t, i + 7) != 4 or not ends_number(t, i + 11):
        return -1
    area = number(t, i, 3)
    if area == 0 or area == 666 or area >= 900:
        return -1
    if number(t, i + 4, 2) == 0 or number(t, i + 7, 4) == 0:
        return -1
    return i + 11


cdef Py_ssize_t ipv4(const uint32_t* t, Py_ssize_t i) noexcept nogil:
    cdef Py_ssize_t j = i, run
    cdef int octet
    for octet in range(4):
        run = digits(t, j)
        if run == 0 or run > 3 or (run > 1 and t[j] == 48) or number(t, j, run) > 255:
            return -1
        j += run
        if octet < 3:
            if t[j] != 46:
                return -1
            j += 1
    return j


cdef Py_ssize_t ipv4_at(const uint32_t* t, Py_ssize_t i) noexcept nogil:
    cdef Py_ssize_t end = ipv4(t, i)
    cdef uint32_t c
    if end < 0:
        return -1
    c = t[end]
    if word(c) or c == 95 or ((c == 45 or c == 46) and digit(t[end + 1])):
        return -1
    return end


cdef inline Py_ssize_t hex_run(const uint32_t* t, Py_ssize_t j) noexcept nogil:
    cdef Py_ssize_t k = j
    while k - j < 5 and cls(t[k]) & C_HEX:
        k += 1
    return k - j


cdef inline bint starts_ipv6(const uint32_t* t, Py_ssize_t i) noexcept nogil:
    cdef uint32_t p = t[i - 1]
    return not (word(p) or p == 46 or p == 58 or p == 95)


cdef Py_ssize_t ipv6_at(const uint32_t* t, Py_ssize_t i) noexcept nogil:
    cdef Py_ssize_t j = i, h, run, end
    cdef int groups = 0
    cdef bint double = False
    cdef uint32_t c
    if t[j] == 58:
        if t[j + 1] != 58:
            return -1
        double = True
        j += 2
    while groups <= 8:
        h = hex_run(t, j)
        if h == 0:
            break
        run = digits(t, j)
        if run >= h and t[j + run] == 46:
            end = ipv4(t, j)
            if end < 0:
                return -1
            groups += 2
            j = end
            break
        if h > 4:
            return -1
        groups += 1
        j += h
        if t[j] == 58 and t[j + 1] == 58:
            if double:
                break
            double = True
            j += 2
        elif t[j] == 58 and cls(t[j + 1]) & C_HEX:
            j += 1
        else:
            break
    if double:
        if groups < 2 or groups > 7:
            return -1
    elif groups != 8:
        return -1
    c = t[j]
    if word(c) or c == 58 or c == 95 or (c == 46 and cls(t[j + 1]) & C_ALNUM):
        return -1
    return j


# -- PHONE -----------------------------------------------------------------------------------------


cdef inline bint is_year(long long value) noexcept nogil:
    return 1900 <= value <= 2099


cdef bint cue_after(const uint32_t* t, Py_ssize_t end) noexcept nogil:
    cdef Py_ssize_t k = end + 1 if (t[end] == 32 or t[end] == 45) else end
    cdef Py_ssize_t cue_end
    return k > end and cue_at(t, k, &cue_end) == CUE_PHONE


# the reference's _other_number_shape, with its _group_values and _date_shape inline
cdef bint other_number_shape(const uint32_t* t, Py_ssize_t i, const Py_ssize_t* lengths,
                             const uint32_t* seps, Py_ssize_t n, bint paren) noexcept nogil:
    cdef long long values[MAX_GROUPS]
    cdef Py_ssize_t g, j = i, a, b, c, years
    cdef long long x, y, z
    cdef uint32_t main
    cdef bint all_four = True, rest_three = True
    if paren:
        return False
    for g in range(n):
        while not digit(t[j]):
            j += 1
        values[g] = number(t, j, lengths[g])
        j += lengths[g]
    main = seps[1] if n > 1 else 0
    if n >= 3:
        a = lengths[0]
        b = lengths[1]
        c = lengths[2]
        x = values[0]
        y = values[1]
        z = values[2]
        if a == 4 and b <= 2 and c <= 2 and is_year(x) and 1 <= y <= 12 and 1 <= z <= 31:
            return True
        if a <= 2 and b <= 2 and c == 4 and is_year(z) and 1 <= x <= 31 and 1 <= y <= 31:
            if x <= 12 or y <= 12:
                return True
    if n == 3 and lengths[0] == 3 and lengths[1] == 2 and lengths[2] == 4:
        if main == 32 or main == 45:
            return True
    if n >= 3 and lengths[0] == 4 and lengths[1] == 4 and lengths[2] == 4:
        return True
    if n >= 3 and lengths[0] == 4 and lengths[1] == 6 and (lengths[2] == 5 or lengths[2] == 4):
        return True
    years = 0
    for g in range(n):
        if lengths[g] != 4:
            all_four = False
        if is_year(values[g]):
            years += 1
        if g >= 1 and lengths[g] != 3:
            rest_three = False
    if all_four and years >= 2:
        return True
    if n >= 3 and rest_three:
        if main == 46 or (main == 32 and lengths[0] == 1):
            return True
    return False


cdef Py_ssize_t extension(const uint32_t* t, Py_ssize_t j) noexcept nogil:
    cdef Py_ssize_t k = j + 1 if t[j] == 32 else j, run
    if lower(t[k]) == 120:
        k += 1
    elif lower(t[k]) == 101 and lower(t[k + 1]) == 120 and lower(t[k + 2]) == 116:
        k += 3
        if t[k] == 46:
            k += 1
        if t[k] == 32:
            k += 1
    else:
        return j
    run = digits(t, k)
    return k + run if 1 <= run <= 6 else j


cdef Py_ssize_t phone_at(const uint32_t* t, Py_ssize_t i, bint cued, double* score) noexcept nogil:
    cdef Py_ssize_t j = i, k, run, n = 0, total, end
    cdef Py_ssize_t lengths[MAX_GROUPS]
    cdef uint32_t seps[MAX_GROUPS]
    cdef uint32_t sep, main = 0
    cdef bint plus = False, paren = False, free, after_paren
    if t[j] == 43:
        plus = True
        j += 1
    elif t[j] == 40:
        run = digits(t, j + 1)
        if run == 0 or run > 5 or t[j + 1 + run] != 41:
            return -1
        paren = True
        j += run + 2
        lengths[0] = run
        seps[0] = 0
        n = 1
    if not paren:
        run = digits(t, j)
        if run == 0 or run > 15:
            return -1
        lengths[0] = run
        seps[0] = 0
        n = 1
        j += run
    total = lengths[0]
    free = plus or paren
    after_paren = paren
    while True:
        sep = t[j]
        if sep == 32 or sep == 45 or sep == 46:
            k = j + 1
        else:
            k = j
            sep = 0
        if t[k] == 40 and not paren and (sep == 0 or sep == 32):
            run = digits(t, k + 1)
            if run == 0 or run > 4 or t[k + 1 + run] != 41 or total + run > 15:
                break
            paren = True
            free = True
            after_paren = True
            total += run
            lengths[n] = run
            seps[n] = sep
            n += 1
            j = k + run + 2
            continue
        if not digit(t[k]) or (sep == 0 and not after_paren):
            break
        if free:
            free = False
        elif main == 0:
            main = sep
        elif sep != main:
            break
        run = digits(t, k)
        if (run < 2 and not after_paren) or total + run > 15:
            break
        after_paren = False
        total += run
        lengths[n] = run
        seps[n] = sep
        n += 1
        j = k + run
    if total < 7 or (not plus and other_number_shape(t, i, lengths, seps, n, paren)):
        return -1
    end = extension(t, j)
    if not ends_number(t, end):
        return -1
    cued = cued or cue_after(t, end)
    if not (plus or cued or paren):
        if n == 1 or (n == 2 and seps[1] == 32):
            return -1
    if plus or cued:
        score[0] = 1.0
    elif paren or n >= 3:
        score[0] = 0.8
    else:
        score[0] = 0.6
    return end


# -- dates of birth --------------------------------------------------------------------------------


cdef Py_ssize_t month_at(const uint32_t* t, Py_ssize_t i) noexcept nogil:
    cdef char w[10]
    cdef Py_ssize_t length, end
    if t[i] >= 128 or not CLASS[t[i]] & C_ALPHA or word(t[i - 1]):
        return -1
    length = word_at(t, i, 9, w)
    if length == 0 or not in_list(&MONTH_WORDS, w, length):
        return -1
    end = i + length
    return end + 1 if t[end] == 46 else end


cdef Py_ssize_t ordinal(const uint32_t* t, Py_ssize_t j) noexcept nogil:
    cdef uint32_t a = lower(t[j]), b = lower(t[j + 1])
    if ((a == 115 and b == 116) or (a == 110 and b == 100) or (a == 114 and b == 100)
            or (a == 116 and b == 104)) and not word(t[j + 2]):
        return j + 2
    return j


cdef Py_ssize_t day_at(const uint32_t* t, Py_ssize_t j) noexcept nogil:
    cdef Py_ssize_t run = digits(t, j)
    cdef long long value
    if run == 0 or run > 2:
        return -1
    value = number(t, j, run)
    if not 1 <= value <= 31:
        return -1
    return ordinal(t, j + run)


cdef Py_ssize_t year_at(const uint32_t* t, Py_ssize_t j) noexcept nogil:
    if digits(t, j) != 4 or not is_year(number(t, j, 4)) or not ends_number(t, j + 4):
        return -1
    return j + 4


cdef Py_ssize_t date_at(const uint32_t* t, Py_ssize_t i) noexcept nogil:
    cdef Py_ssize_t run, m, d, end
    cdef uint32_t sep
    cdef long long x, y, year, month, day
    if not digit(t[i]):
        end = month_at(t, i)
        if end < 0 or t[end] != 32:
            return -1
        end = day_at(t, end + 1)
        if end < 0:
            return -1
        if t[end] == 44:
            end += 1
        return year_at(t, end + 1) if t[end] == 32 else -1
    run = digits(t, i)
    sep = t[i + run]
    if run == 4 and (sep == 45 or sep == 46 or sep == 47):
        m = digits(t, i + 5)
        if not 1 <= m <= 2 or t[i + 5 + m] != sep:
            return -1
        d = digits(t, i + 6 + m)
        end = i + 6 + m + d
        if not 1 <= d <= 2 or not ends_number(t, end):
            return -1
        year = number(t, i, 4)
        month = number(t, i + 5, m)
        day = number(t, i + 6 + m, d)
        return end if is_year(year) and 1 <= month <= 12 and 1 <= day <= 31 else -1
    if not 1 <= run <= 2:
        return -1
    if sep == 45 or sep == 46 or sep == 47:
        m = digits(t, i + run + 1)
        if not 1 <= m <= 2 or t[i + run + 1 + m] != sep:
            return -1
        x = number(t, i, run)
        y = number(t, i + run + 1, m)
        if not (1 <= x <= 31 and 1 <= y <= 31 and (x <= 12 or y <= 12)):
            return -1
        return year_at(t, i + run + 2 + m)
    end = day_at(t, i)
    if end < 0 or t[end] != 32:
        return -1
    end = month_at(t, end + 1)
    if end < 0:
        return -1
    if t[end] == 44:
        end += 1
    return year_at(t, end + 1) if t[end] == 32 else -1


# -- POSTCODE --------------------------------------------------------------------------------------


cdef inline bint uk_inward(uint32_t c) noexcept nogil:
    cdef int k = 0
    while UK_INWARD[k]:
        if <uint32_t> UK_INWARD[k] == c:
            return True
        k += 1
    return False


cdef Py_ssize_t uk_postcode_at(const uint32_t* t, Py_ssize_t i) noexcept nogil:
    cdef Py_ssize_t j = i
    if not upper(t[j]) or t[j] == 81 or t[j] == 86 or t[j] == 88:  # Q V X
        return -1
    j += 1
    if upper(t[j]):
        if t[j] == 73 or t[j] == 74 or t[j] == 90:  # I J Z
            return -1
        j += 1
    if not digit(t[j]):
        return -1
    j += 1
    if digit(t[j]) or upper(t[j]):
        j += 1
    if t[j] != 32 or not digit(t[j + 1]):
        return -1
    if not uk_inward(t[j + 2]) or not uk_inward(t[j + 3]):
        return -1
    j += 4
    return -1 if word(t[j]) or t[j] == 95 else j


cdef Py_ssize_t us_zip_at(const uint32_t* t, Py_ssize_t i) noexcept nogil:
    if digits(t, i) != 5:
        return -1
    if t[i + 5] == 45 and digits(t, i + 6) == 4 and ends_number(t, i + 10):
        return i + 10
    return i + 5 if ends_number(t, i + 5) else -1


cdef Py_ssize_t cued_postcode_at(const uint32_t* t, Py_ssize_t i) noexcept nogil:
    cdef Py_ssize_t run, tail, end
    cdef uint32_t sep
    if digit(t[i]):
        run = digits(t, i)
        sep = t[i + run]
        if (sep == 32 or sep == 45) and digit(t[i + run + 1]):
            tail = digits(t, i + run + 1)
            end = i + run + 1 + tail
            if (3 <= run <= 6 and 2 <= tail <= 4) or (run == 2 and tail == 3 and sep == 45):
                if ends_number(t, end):
                    return end
        if run == 4 and sep == 32 and upper(t[i + 5]) and upper(t[i + 6]):
            if not word(t[i + 7]):
                return i + 7
        if 3 <= run <= 6 and ends_number(t, i + run):
            return i + run
        return -1
    if not (upper(t[i]) and digit(t[i + 1]) and upper(t[i + 2]) and t[i + 3] == 32
            and digit(t[i + 4]) and upper(t[i + 5]) and digit(t[i + 6])):
        return -1
    return -1 if word(t[i + 7]) else i + 7


# -- URL and EMAIL ---------------------------------------------------------------------------------


cdef Py_ssize_t host_labels(const uint32_t* t, Py_ssize_t j, int* labels,
                          Py_ssize_t* last) noexcept nogil:
    cdef Py_ssize_t k
    labels[0] = 0
    last[0] = j
    while True:
        k = j
        while cls(t[k]) & C_ALNUM or t[k] == 45:
            k += 1
        if k == j or t[j] == 45 or t[k - 1] == 45:
            return -1
        labels[0] += 1
        last[0] = j
        j = k
        if t[j] == 46 and cls(t[j + 1]) & C_ALNUM:
            j += 1
            continue
        return j


cdef bint tld_letters(const uint32_t* t, Py_ssize_t start, Py_ssize_t end) noexcept nogil:
    cdef Py_ssize_t k
    if end - start < 2:
        return False
    for k in range(start, end):
        if not cls(t[k]) & C_ALPHA:
            return False
    return True


cdef Py_ssize_t url_tail(const uint32_t* t, Py_ssize_t j) noexcept nogil:
    cdef Py_ssize_t opened = 0, closed = 0, k = j
    cdef uint32_t c
    while cls(t[k]) & C_URL:
        if t[k] == 40 or t[k] == 91:
            opened += 1
        elif t[k] == 41 or t[k] == 93:
            closed += 1
        k += 1
    while k > j:
        c = t[k - 1]
        if c == 46 or c == 44 or c == 59 or c == 58 or c == 33 or c == 63 or c == 42:
            k -= 1
        elif (c == 41 or c == 93) and closed > opened:
            closed -= 1
            k -= 1
        else:
            break
    return k


cdef bint matches(const uint32_t* t, Py_ssize_t i, const char* w) noexcept nogil:
    cdef Py_ssize_t k = 0
    while w[k]:
        if lower(t[i + k]) != <uint32_t> w[k]:
            return False
        k += 1
    return True


cdef inline bint starts_url(const uint32_t* t, Py_ssize_t i) noexcept nogil:
    cdef uint32_t p = t[i - 1]
    if word(p):
        return False
    return not (p == 64 or p == 46 or p == 45 or p == 95 or p == 47 or p == 92 or p == 37
                or p == 43 or p == 61 or p == 38 or p == 35 or p == 126)


cdef Py_ssize_t url_at(const uint32_t* t, Py_ssize_t i, double* score) noexcept nogil:
    cdef Py_ssize_t k, host, end, last, x
    cdef int labels
    cdef bint www, all_lower = True, all_upper = True
    cdef char tld[8]
    cdef uint32_t c
    if matches(t, i, b"http"):
        k = i + 5 if lower(t[i + 4]) == 115 else i + 4
        if t[k] == 58 and t[k + 1] == 47 and t[k + 2] == 47:
            host = k + 3
            if cls(t[host]) & C_ALNUM or t[host] == 91:
                end = url_tail(t, host)
                if end > host:
                    score[0] = SCORE_SCHEME
                    return end
            return -1
    www = matches(t, i, b"www.") and (cls(t[i + 4]) & C_ALNUM) != 0
    end = host_labels(t, i, &labels, &last)
    if end < 0 or labels < (3 if www else 2):
        return -1
    c = t[end]
    if word(c) or c == 64 or c == 95:
        return -1
    if www:
        if not tld_letters(t, last, end):
            return -1
        score[0] = SCORE_WWW
    else:
        for x in range(last, end):
            if not cls(t[x]) & C_LOWER:
                all_lower = False
            if not cls(t[x]) & C_UPPER:
                all_upper = False
        if not (all_lower or all_upper) or end - last > 6:
            return -1
        for x in range(last, end):
            tld[x - last] = <char> lower(t[x])
        if not in_list(&TLD_WORDS, tld, end - last):
            return -1
        score[0] = SCORE_BARE
    if c == 47 or c == 63 or c == 35 or (c == 58 and digit(t[end + 1])):
        end = url_tail(t, end)
    return end


cdef Py_ssize_t email_at(const uint32_t* t, Py_ssize_t at, Py_ssize_t* end) noexcept nogil:
    cdef Py_ssize_t k = at, last, e
    cdef int labels
    cdef uint32_t c
    while k > 0:
        c = t[k - 1]
        if c < 128:
            if not CLASS[c] & C_LOCAL or (c == 46 and t[k - 2] == 46):
                break
        elif not word(c):
            break
        k -= 1
    while k < at and t[k] == 46:
        k += 1
    if k == at or t[at - 1] == 46:
        return -1
    e = host_labels(t, at + 1, &labels, &last)
    if e < 0 or labels < 2 or not tld_letters(t, last, e):
        return -1
    if word(t[e]) or t[e] == 64 or t[e] == 95:
        return -1
    end[0] = e
    return k


# -- the scan --------------------------------------------------------------------------------------


cdef bint push(PiiCandidates* out, int kind, Py_ssize_t start, Py_ssize_t end,
               double score) noexcept nogil:
    cdef Py_ssize_t capacity
    cdef PiiCandidate* grown
    if out.count == out.capacity:
        capacity = out.capacity * 2 if out.capacity else 16
        if capacity > PY_SSIZE_T_MAX // (<Py_ssize_t> sizeof(PiiCandidate)):
            return False
        grown = <PiiCandidate*> realloc(out.items, capacity * sizeof(PiiCandidate))
        if grown == NULL:
            return False
        out.items = grown
        out.capacity = capacity
    out.items[out.count].kind = kind
    out.items[out.count].start = start
    out.items[out.count].end = end
    out.items[out.count].score = score
    out.count += 1
    return True


cdef bint pii_scan_codes(const uint32_t* t, Py_ssize_t n, unsigned int mask,
                         PiiCandidates* out) noexcept nogil:
    cdef Py_ssize_t resume[PII_KINDS]
    cdef Py_ssize_t never = -(<Py_ssize_t> 1 << 40)
    cdef Py_ssize_t birth = never, phone_cue = never, zip_cue = never, state = never
    cdef Py_ssize_t i, end, start, k, gap
    cdef uint32_t c
    cdef unsigned char cl
    cdef bint word_start, cued, by_state
    cdef Cue cue
    cdef double score
    for k in range(PII_KINDS):
        resume[k] = 0
    for i in range(n):
        c = t[i]
        cl = CLASS[c] if c < 128 else 0
        if cl & C_ALNUM:
            word_start = not word(t[i - 1]) and t[i - 1] != 95
            if cl & C_ALPHA and word_start:
                cue = cue_at(t, i, &end)
                if cue == CUE_BIRTH:
                    birth = end
                elif cue == CUE_PHONE:
                    phone_cue = end
                elif cue == CUE_ZIP:
                    zip_cue = end
                elif cue == CUE_STATE:
                    state = end
                if mask >> PII_IBAN & 1 and i >= resume[PII_IBAN]:
                    end = iban_at(t, i)
                    if end >= 0:
                        if not push(out, PII_IBAN, i, end, 1.0):
                            return False
                        resume[PII_IBAN] = end
                if mask >> PII_POSTCODE & 1 and i >= resume[PII_POSTCODE]:
                    cued = 0 <= i - zip_cue <= ZIP_WINDOW
                    end = uk_postcode_at(t, i)
                    if end >= 0:
                        if not push(out, PII_POSTCODE, i, end, 1.0 if cued else 0.9):
                            return False
                        resume[PII_POSTCODE] = end
                    elif cued:
                        end = cued_postcode_at(t, i)
                        if end >= 0:
                            if not push(out, PII_POSTCODE, i, end, 0.9):
                                return False
                            resume[PII_POSTCODE] = end
            if (word_start and mask >> PII_URL & 1 and i >= resume[PII_URL]
                    and starts_url(t, i)):
                end = url_at(t, i, &score)
                if end >= 0:
                    if not push(out, PII_URL, i, end, score):
                        return False
                    resume[PII_URL] = end
            if (cl & C_HEX and mask >> PII_IP_ADDRESS & 1 and i >= resume[PII_IP_ADDRESS]
                    and starts_ipv6(t, i)):
                end = ipv6_at(t, i)
                if end >= 0:
                    if not push(out, PII_IP_ADDRESS, i, end, 1.0):
                        return False
                    resume[PII_IP_ADDRESS] = end
            if (mask >> PII_DATE_OF_BIRTH & 1 and i >= resume[PII_DATE_OF_BIRTH]
                    and 0 <= i - birth <= BIRTH_WINDOW):
                if (cl & C_ALPHA and word_start) or (cl & C_DIGIT and starts_number(t, i)):
                    end = date_at(t, i)
                    if end >= 0:
                        if not push(out, PII_DATE_OF_BIRTH, i, end, 1.0):
                            return False
                        resume[PII_DATE_OF_BIRTH] = end
            if cl & C_DIGIT and starts_number(t, i):
                if mask >> PII_CARD & 1 and i >= resume[PII_CARD]:
                    end = card_at(t, i)
                    if end >= 0:
                        if not push(out, PII_CARD, i, end, 1.0):
                            return False
                        resume[PII_CARD] = end
                if mask >> PII_SSN & 1 and i >= resume[PII_SSN]:
                    end = ssn_at(t, i)
                    if end >= 0:
                        if not push(out, PII_SSN, i, end, 1.0 if t[i + 3] == 45 else 0.9):
                            return False
                        resume[PII_SSN] = end
                if mask >> PII_IP_ADDRESS & 1 and i >= resume[PII_IP_ADDRESS]:
                    end = ipv4_at(t, i)
                    if end >= 0:
                        if not push(out, PII_IP_ADDRESS, i, end, 1.0):
                            return False
                        resume[PII_IP_ADDRESS] = end
                if mask >> PII_POSTCODE & 1 and i >= resume[PII_POSTCODE]:
                    gap = i - state
                    by_state = 1 <= gap <= STATE_GAP
                    if by_state:
                        for k in range(state, i):
                            if t[k] != 32 and t[k] != 44:
                                by_state = False
                    cued = 0 <= i - zip_cue <= ZIP_WINDOW
                    if by_state or cued:
                        end = us_zip_at(t, i)
                        if end >= 0:
                            if not push(out, PII_POSTCODE, i, end, 1.0):
                                return False
                            resume[PII_POSTCODE] = end
                        elif cued:
                            end = cued_postcode_at(t, i)
                            if end >= 0:
                                if not push(out, PII_POSTCODE, i, end, 0.9):
                                    return False
                                resume[PII_POSTCODE] = end
                if mask >> PII_PHONE & 1 and i >= resume[PII_PHONE] and t[i - 1] != 43:
                    end = phone_at(t, i, 0 <= i - phone_cue <= PHONE_WINDOW, &score)
                    if end >= 0:
                        if not push(out, PII_PHONE, i, end, score):
                            return False
                        resume[PII_PHONE] = end
        elif c == 64:
            if mask >> PII_EMAIL & 1:
                start = email_at(t, i, &end)
                if start >= resume[PII_EMAIL]:
                    if not push(out, PII_EMAIL, start, end, 1.0):
                        return False
                    resume[PII_EMAIL] = end
        elif c == 43 or c == 40:
            if (mask >> PII_PHONE & 1 and i >= resume[PII_PHONE] and digit(t[i + 1])
                    and starts_number(t, i)):
                end = phone_at(t, i, 0 <= i - phone_cue <= PHONE_WINDOW, &score)
                if end >= 0:
                    if not push(out, PII_PHONE, i, end, score):
                        return False
                    resume[PII_PHONE] = end
        elif c == 58:
            if (t[i + 1] == 58 and mask >> PII_IP_ADDRESS & 1 and i >= resume[PII_IP_ADDRESS]
                    and starts_ipv6(t, i)):
                end = ipv6_at(t, i)
                if end >= 0:
                    if not push(out, PII_IP_ADDRESS, i, end, 1.0):
                        return False
                    resume[PII_IP_ADDRESS] = end
    return True


cdef int by_rank(const void* left, const void* right) noexcept nogil:
    cdef const PiiCandidate* a = <const PiiCandidate*> left
    cdef const PiiCandidate* b = <const PiiCandidate*> right
    cdef int a_plain = 0 if CHECKSUMMED >> a.kind & 1 else 1
    cdef int b_plain = 0 if CHECKSUMMED >> b.kind & 1 else 1
    cdef Py_ssize_t a_len = a.end - a.start, b_len = b.end - b.start
    if a_plain != b_plain:
        return a_plain - b_plain
    if a_len != b_len:
        return -1 if a_len > b_len else 1
    if a.start != b.start:
        return -1 if a.start < b.start else 1
    return PRIORITY[a.kind] - PRIORITY[b.kind]


cdef int by_start(const void* left, const void* right) noexcept nogil:
    cdef const PiiCandidate* a = <const PiiCandidate*> left
    cdef const PiiCandidate* b = <const PiiCandidate*> right
    if a.start != b.start:
        return -1 if a.start < b.start else 1
    return 0


cdef bint pii_resolve(PiiCandidates* candidates, Py_ssize_t n) noexcept nogil:
    cdef unsigned char* taken
    cdef Py_ssize_t i, k, kept = 0
    cdef PiiCandidate* item
    cdef bint free_span
    if candidates.count == 0:
        return True
    taken = <unsigned char*> calloc(<size_t> n if n > 0 else 1, 1)
    if taken == NULL:
        return False
    qsort(candidates.items, candidates.count, sizeof(PiiCandidate), by_rank)
    for i in range(candidates.count):
        item = &candidates.items[i]
        free_span = True
        for k in range(item.start, item.end):
            if taken[k]:
                free_span = False
                break
        if free_span:
            memset(taken + item.start, 1, item.end - item.start)
            candidates.items[kept] = item[0]
            kept += 1
    free(taken)
    candidates.count = kept
    qsort(candidates.items, kept, sizeof(PiiCandidate), by_start)
    return True


cdef void pii_candidates_release(PiiCandidates* candidates) noexcept nogil:
    free(candidates.items)
    candidates.items = NULL
    candidates.count = 0
    candidates.capacity = 0


def scan(text, unsigned int mask=ALL_KINDS):
    """``(kind, start, end, score)`` of every structured identifier in ``text``, sorted by
    start, for the kinds whose bit ``1 << kind`` is set in ``mask``; the reference's
    ``scan``, exactly."""
    cdef Py_ssize_t n, i
    cdef uint32_t* buffer
    cdef PiiCandidates found
    cdef bint ok
    if not isinstance(text, str):
        raise TypeError(f"text is {type(text).__name__}, not str")
    n = PyUnicode_GET_LENGTH(text)
    if n > (PY_SSIZE_T_MAX // 8) - 2 * PII_PAD:
        raise MemoryError()
    buffer = <uint32_t*> calloc(<size_t> (n + 2 * PII_PAD), sizeof(uint32_t))
    if buffer == NULL:
        raise MemoryError()
    found.items = NULL
    found.count = 0
    found.capacity = 0
    try:
        if n:
            PyUnicode_AsUCS4(text, <Py_UCS4*> (buffer + PII_PAD), n, 0)
        with nogil:
            ok = pii_scan_codes(buffer + PII_PAD, n, mask, &found)
            if ok:
                ok = pii_resolve(&found, n)
        if not ok:
            raise MemoryError()
        return [(found.items[i].kind, found.items[i].start, found.items[i].end,
                 found.items[i].score) for i in range(found.count)]
    finally:
        pii_candidates_release(&found)
        free(buffer)
