"""Pure-Python reference of the structured-PII scanner (``native/pii.pyx``).

Slow and obvious on purpose: the property tests check that the native scanner returns exactly
these candidates, spans and scores. Both walk the text once, left to right, and try each
detector only where the character at hand can start its entity; every detector looks ahead a
bounded number of characters or consumes what it reads, so a scan is linear in the text.

The text is read as code points followed by ``PAD`` zeros; a negative index reads the zeros at
the end, so looking one or two characters back before the start, or past the end, meets a
zero, which no detector accepts. The native scanner lays its buffer out the same way.

``scan(text, mask)`` returns ``(kind index, start, end, score)`` tuples sorted by start, for
the kinds whose bit ``1 << index`` is set in ``mask`` (indices into ``KINDS``). How overlaps
are settled: every detector proposes candidates (one kind never proposes two that overlap:
it does not start again before the end of its last candidate), then candidates are taken
checksummed first, then longest, then earliest, then by ``PRIORITY``, each one only where it
overlaps nothing taken already.
"""

from __future__ import annotations

KINDS: tuple[str, ...] = (
    "EMAIL",
    "PHONE",
    "CARD",
    "IBAN",
    "SSN",
    "IP_ADDRESS",
    "URL",
    "DATE_OF_BIRTH",
    "POSTCODE",
)
EMAIL, PHONE, CARD, IBAN, SSN, IP_ADDRESS, URL, DATE_OF_BIRTH, POSTCODE = range(len(KINDS))
ALL_KINDS = (1 << len(KINDS)) - 1
CHECKSUMMED = (1 << CARD) | (1 << IBAN)
# ties between candidates of the same length and start (an IPv4 address is also a dotted
# phone shape): the lower number wins
PRIORITY = (2, 8, 0, 1, 5, 4, 3, 6, 7)

PAD = 64

# how far after a cue word (its end) an entity may start, in code points
BIRTH_WINDOW = 40  # "date of birth. It's 6/24/1991": 7; "was born in Leeds on 3 May 1990": 17
PHONE_WINDOW = 32  # "Mobile: 737 219 628\nDesk: 5403926876": 20
ZIP_WINDOW = 20  # "my zip code is 35350": 9
STATE_GAP = 3  # "Springfield, IL 62704": 1; only spaces and commas in between

# -- character classes ----------------------------------------------------------------------------

_DIGIT, _UPPER, _LOWER, _HEX, _LOCAL, _URL = 1, 2, 4, 8, 16, 32
_ALPHA = _UPPER | _LOWER
_ALNUM = _ALPHA | _DIGIT


def _ascii_classes() -> list[int]:
    table = [0] * 128
    for c in range(128):
        ch = chr(c)
        bits = 0
        if "0" <= ch <= "9":
            bits |= _DIGIT
        if "A" <= ch <= "Z":
            bits |= _UPPER
        if "a" <= ch <= "z":
            bits |= _LOWER
        if ch in "0123456789abcdefABCDEF":
            bits |= _HEX
        if bits & _ALNUM or ch in "._%+-":
            bits |= _LOCAL
        if 33 <= c <= 126 and ch not in "<>\"'`{}|\\^":
            bits |= _URL
        table[c] = bits
    return table


_CLASS = _ascii_classes()


def _cls(c: int) -> int:
    return _CLASS[c] if c < 128 else 0


def _digit(c: int) -> bool:
    return 48 <= c <= 57


def _word(c: int) -> bool:
    """A letter or digit of any script (``str.isalnum``): entities never start or end inside
    a word."""
    if c < 128:
        return bool(_CLASS[c] & _ALNUM)
    return chr(c).isalnum()


def _lower(c: int) -> int:
    """ASCII letters lower-cased; everything else unchanged."""
    return c | 32 if 65 <= c <= 90 else c


def _digits(t: list[int], j: int) -> int:
    """Length of the run of ASCII digits at ``j``, counted up to 20 (no detector takes more
    than 19 in a run)."""
    k = j
    while k - j < 20 and 48 <= t[k] <= 57:
        k += 1
    return k - j


def _number(t: list[int], j: int, length: int) -> int:
    value = 0
    for k in range(j, j + length):
        value = value * 10 + t[k] - 48
    return value


def _starts_number(t: list[int], i: int) -> bool:
    """Whether a number may start at ``i``: not inside a word, nor after ``1.``, ``1-``,
    ``1:`` or ``1/`` (the tail of a longer number, a time or a date)."""
    p = t[i - 1]
    if _word(p) or p == 95:
        return False
    return not (p in (45, 46, 47, 58) and _digit(t[i - 2]))


def _ends_number(t: list[int], e: int) -> bool:
    """Whether a number may end at ``e`` (its mirror of ``_starts_number``)."""
    c = t[e]
    if _word(c) or c == 95:
        return False
    return not (c in (45, 46, 47, 58) and _digit(t[e + 1]))


def _word_at(t: list[int], i: int, limit: int) -> str:
    """The lower-cased ASCII word at ``i`` if it has at most ``limit`` letters and ends there
    (not followed by another letter or digit), else ``""``."""
    k = i
    while k - i <= limit and t[k] < 128 and _CLASS[t[k]] & _ALPHA:
        k += 1
    if k - i > limit or _word(t[k]):
        return ""
    return "".join(chr(_lower(c)) for c in t[i:k])


# -- cue words ------------------------------------------------------------------------------------

CUE_BIRTH, CUE_PHONE, CUE_ZIP, CUE_STATE = 1, 2, 3, 4
CUE_LIMIT = 12
_CUES = {
    "born": CUE_BIRTH,
    "dob": CUE_BIRTH,
    "phone": CUE_PHONE,
    "phones": CUE_PHONE,
    "telephone": CUE_PHONE,
    "tel": CUE_PHONE,
    "mobile": CUE_PHONE,
    "cell": CUE_PHONE,
    "cellphone": CUE_PHONE,
    "fax": CUE_PHONE,
    "call": CUE_PHONE,
    "dial": CUE_PHONE,
    "zip": CUE_ZIP,
    "zipcode": CUE_ZIP,
    "postcode": CUE_ZIP,
    "postal": CUE_ZIP,
}
_STATE_NAMES = (
    "AL AK AZ AR CA CO CT DE DC FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE NV NH "
    "NJ NM NY NC ND OH OK OR PA RI SC SD TN TX UT VT VA WA WV WI WY PR GU VI AS MP"
)
US_STATES = frozenset(_STATE_NAMES.split())


def cue_at(t: list[int], i: int) -> tuple[int, int]:
    """``(cue, end)`` for a cue word starting at ``i``, or ``(0, 0)``. Any word beginning with
    "birth" (birth, birthday, birthdate) is a birth cue; a state is two capitals."""
    word = _word_at(t, i, CUE_LIMIT)
    if not word:
        return 0, 0
    end = i + len(word)
    if word.startswith("birth"):
        return CUE_BIRTH, end
    cue = _CUES.get(word, 0)
    if cue:
        return cue, end
    capitals = len(word) == 2 and _CLASS[t[i]] & _UPPER and _CLASS[t[i + 1]] & _UPPER
    if capitals and word.upper() in US_STATES:
        return CUE_STATE, end
    return 0, 0


# -- CARD -----------------------------------------------------------------------------------------


def _luhn_card(t: list[int], i: int, e: int, count: int) -> bool:
    """Luhn over the digits in ``t[i:e]``; 12 digits only with a Maestro prefix (50, 56-69),
    and never all zeros."""
    total = 0
    nonzero = False
    parity = 0
    for k in range(e - 1, i - 1, -1):
        c = t[k]
        if not _digit(c):
            continue
        d = c - 48
        if d:
            nonzero = True
        if parity:
            d *= 2
            if d > 9:
                d -= 9
        total += d
        parity ^= 1
    if not nonzero or total % 10:
        return False
    if count == 12:
        first, second = t[i] - 48, t[i + 1] - 48
        return first == 6 or (first == 5 and second in (0, 6, 7, 8))
    return True


def card_at(t: list[int], i: int) -> int:
    """End of a Luhn-valid card number at ``i``, or -1: 12-19 digits in one run, or groups
    of four split by one kind of separator (space or dash), Amex/Diners 4-6-5 and 4-6-4, the
    last group possibly shorter. The longest valid prefix of the groups wins."""
    run = _digits(t, i)
    sep = t[i + 4]
    if run == 4 and sep in (32, 45) and _digit(t[i + 5]):
        ends: list[tuple[int, int]] = [(i + 4, 4)]
        total, groups, previous, j = 4, 1, 4, i + 4
        while t[j] == sep and _digit(t[j + 1]):
            g = _digits(t, j + 1)
            last = False
            if groups == 2 and previous == 6:
                ok, last = g in (4, 5), True
            elif g == 4 or (g == 6 and groups == 1):
                ok = True
            else:
                ok, last = 1 <= g <= 3, True
            if not ok or total + g > 19:
                break
            total += g
            j += 1 + g
            groups += 1
            previous = g
            ends.append((j, total))
            if last:
                break
        for end, count in reversed(ends):
            if count < 12:
                break
            if _ends_number(t, end) and _luhn_card(t, i, end, count):
                return end
        return -1
    if 12 <= run <= 19 and _ends_number(t, i + run) and _luhn_card(t, i, i + run, run):
        return i + run
    return -1


# -- IBAN -----------------------------------------------------------------------------------------

# total length per country (ISO 13616 registry)
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28,
    "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28,
    "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22,
    "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23,
    "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24,
    "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip


def _iban_value(c: int) -> int:
    """0-9 for a digit, 10-35 for a letter of either case."""
    if c <= 57:
        return c - 48
    return _lower(c) - 97 + 10


def iban_at(t: list[int], i: int) -> int:
    """End of a mod-97-valid IBAN at ``i``, or -1: a country code (both capitals or both
    small letters) with the country's registered length, written solid or in groups of four
    split by single spaces."""
    a, b = t[i], t[i + 1]
    if not _cls(a) & _cls(b) & _ALPHA:  # both capitals or both small letters
        return -1
    length = IBAN_LENGTHS.get(chr(a).upper() + chr(b).upper(), 0)
    if not length or not (_digit(t[i + 2]) and _digit(t[i + 3])):
        return -1
    spaced = t[i + 4] == 32
    j, count, remainder = i + 4, 4, 0
    while count < length:
        if count % 4 == 0 and spaced:
            if t[j] != 32:
                return -1
            j += 1
        c = t[j]
        if not _cls(c) & _ALNUM:
            return -1
        value = _iban_value(c)
        remainder = (remainder * (100 if value > 9 else 10) + value) % 97
        j += 1
        count += 1
    if _word(t[j]) or t[j] == 95:
        return -1
    for k in range(i, i + 4):  # the country code and check digits go last
        value = _iban_value(t[k])
        remainder = (remainder * (100 if value > 9 else 10) + value) % 97
    return j if remainder == 1 else -1


# -- SSN, IP addresses ----------------------------------------------------------------------------


def ssn_at(t: list[int], i: int) -> int:
    """End of a US SSN ``ddd-dd-dddd`` (or with spaces) at ``i``, or -1. Areas 000, 666 and
    9xx, group 00 and serial 0000 are never issued."""
    if _digits(t, i) != 3:
        return -1
    sep = t[i + 3]
    if sep not in (32, 45) or _digits(t, i + 4) != 2 or t[i + 6] != sep:
        return -1
    if _digits(t, i + 7) != 4 or not _ends_number(t, i + 11):
        return -1
    area = _number(t, i, 3)
    if area == 0 or area == 666 or area >= 900:
        return -1
    if _number(t, i + 4, 2) == 0 or _number(t, i + 7, 4) == 0:
        return -1
    return i + 11


def _ipv4(t: list[int], i: int) -> int:
    """End of a dotted quad at ``i`` (octets 0-255, no leading zeros), or -1; no boundary
    check after it."""
    j = i
    for octet in range(4):
        run = _digits(t, j)
        if run == 0 or run > 3 or (run > 1 and t[j] == 48) or _number(t, j, run) > 255:
            return -1
        j += run
        if octet < 3:
            if t[j] != 46:
                return -1
            j += 1
    return j


def ipv4_at(t: list[int], i: int) -> int:
    """End of a dotted quad at ``i`` that ends there, or -1; a port (``:8080``) or prefix
    length (``/24``) may follow."""
    end = _ipv4(t, i)
    if end < 0:
        return -1
    c = t[end]
    if _word(c) or c == 95 or (c in (45, 46) and _digit(t[end + 1])):
        return -1
    return end


def _hex_run(t: list[int], j: int) -> int:
    """Length of the run of hex digits at ``j``, counted up to 5."""
    k = j
    while k - j < 5 and _cls(t[k]) & _HEX:
        k += 1
    return k - j


def starts_ipv6(t: list[int], i: int) -> bool:
    p = t[i - 1]
    return not (_word(p) or p in (46, 58, 95))


def ipv6_at(t: list[int], i: int) -> int:
    """End of an IPv6 address at ``i``, or -1: eight groups of 1-4 hex digits, fewer around
    one ``::`` (at least two groups then, so ``::1`` alone is not taken), the last two
    possibly written as a dotted quad."""
    j, groups, double = i, 0, False
    if t[j] == 58:
        if t[j + 1] != 58:
            return -1
        double = True
        j += 2
    while groups <= 8:
        h = _hex_run(t, j)
        if h == 0:
            break
        run = _digits(t, j)
        if run >= h and t[j + run] == 46:
            end = _ipv4(t, j)
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
        elif t[j] == 58 and _cls(t[j + 1]) & _HEX:
            j += 1
        else:
            break
    if double:
        if groups < 2 or groups > 7:
            return -1
    elif groups != 8:
        return -1
    c = t[j]
    if _word(c) or c in (58, 95) or (c == 46 and _cls(t[j + 1]) & _ALNUM):
        return -1
    return j


# -- PHONE ----------------------------------------------------------------------------------------


def _is_year(value: int) -> bool:
    return 1900 <= value <= 2099


def phone_at(t: list[int], i: int, cued: bool) -> tuple[int, float]:
    """``(end, score)`` of a phone number at ``i`` (``+``, ``(`` or a digit), or ``(-1, 0)``.

    Groups of digits split by single spaces, dashes or dots; ``(area)`` groups; after ``+CC``
    or a parenthesised group the next separator is free, after that every separator is the
    one first used (a change ends the number). 7-15 digits, groups of at least two digits
    except the first and one right after parentheses; an extension (``x123``, ``ext. 123``)
    is included. A single group without separators, or two split by a space (which is how
    street numbers and amounts read: "17151 2450 Crown St", measured below), needs ``+``,
    parentheses or a phone cue: one that ends at most ``PHONE_WINDOW`` before (``cued``) or
    a cue word right after ("781 1704 fax").
    Shapes that are something else are refused: dates (1985-03-03, 03.11.1985), the SSN shape,
    card groups (4-4-4, 4-6-5), runs of years (2019-2020) and thousands (1.000.000, 1 000 000).

    Scores: 1.0 with ``+`` or a cue; 0.8 with parentheses or three groups or more; 0.6 for two
    bare groups.
    """
    j = i
    plus = paren = False
    lengths: list[int] = []
    seps: list[int] = []  # the separator before each group after the first (0: none)
    if t[j] == 43:
        plus = True
        j += 1
    elif t[j] == 40:
        run = _digits(t, j + 1)
        if run == 0 or run > 5 or t[j + 1 + run] != 41:
            return -1, 0.0
        paren = True
        j += run + 2
        lengths.append(run)
        seps.append(0)
    if not paren:
        run = _digits(t, j)
        if run == 0 or run > 15:
            return -1, 0.0
        lengths.append(run)
        seps.append(0)
        j += run
    digits = lengths[0]
    free = plus or paren  # the next separator does not fix the number's separator
    after_paren = paren
    main = 0
    while True:
        sep = t[j]
        k = j + 1 if sep in (32, 45, 46) else j
        if k == j:
            sep = 0
        if t[k] == 40 and not paren and sep in (0, 32):
            run = _digits(t, k + 1)
            if run == 0 or run > 4 or t[k + 1 + run] != 41 or digits + run > 15:
                break
            paren = free = after_paren = True
            digits += run
            lengths.append(run)
            seps.append(sep)
            j = k + run + 2
            continue
        if not _digit(t[k]) or (sep == 0 and not after_paren):
            break
        if free:
            free = False
        elif main == 0:
            main = sep
        elif sep != main:
            break
        run = _digits(t, k)
        if (run < 2 and not after_paren) or digits + run > 15:
            break
        after_paren = False
        digits += run
        lengths.append(run)
        seps.append(sep)
        j = k + run
    if digits < 7 or (not plus and _other_number_shape(t, i, lengths, seps, paren)):
        return -1, 0.0
    end = _extension(t, j)
    if not _ends_number(t, end):
        return -1, 0.0
    cued = cued or _cue_after(t, end)
    bare = len(lengths) == 1 or (len(lengths) == 2 and seps[1] == 32)
    if bare and not (plus or cued or paren):
        return -1, 0.0
    if plus or cued:
        score = 1.0
    elif paren or len(lengths) >= 3:
        score = 0.8
    else:
        score = 0.6
    return end, score


def _cue_after(t: list[int], end: int) -> bool:
    """Whether a phone cue word follows a number ending at ``end`` ("781 1704 fax",
    "3660170548-Fax"), after at most one space or dash."""
    k = end + 1 if t[end] in (32, 45) else end
    return k > end and cue_at(t, k)[0] == CUE_PHONE


def _group_values(t: list[int], i: int, lengths: list[int]) -> list[int]:
    values = []
    j = i
    for length in lengths:
        while not _digit(t[j]):
            j += 1
        values.append(_number(t, j, length))
        j += length
    return values


def _other_number_shape(
    t: list[int], i: int, lengths: list[int], seps: list[int], paren: bool
) -> bool:
    """Whether digit groups (no ``+``) are a date, an SSN, a card, years or thousands."""
    if paren:
        return False
    n = len(lengths)
    values = _group_values(t, i, lengths)
    main = seps[1] if n > 1 else 0
    if _date_shape(lengths, values):
        return True
    if n == 3 and lengths == [3, 2, 4] and main in (32, 45):
        return True
    if n >= 3 and lengths[0] == lengths[1] == lengths[2] == 4:
        return True
    if lengths[:3] in ([4, 6, 5], [4, 6, 4]):
        return True
    if all(length == 4 for length in lengths) and sum(_is_year(v) for v in values) >= 2:
        return True
    thousands = n >= 3 and all(length == 3 for length in lengths[1:])
    return thousands and (main == 46 or (main == 32 and lengths[0] == 1))


def _date_shape(lengths: list[int], values: list[int]) -> bool:
    """Whether the first three groups read as year-month-day or day-month-year."""
    if len(lengths) < 3:
        return False
    a, b, c = lengths[:3]
    x, y, z = values[:3]
    if a == 4 and b <= 2 and c <= 2 and _is_year(x) and 1 <= y <= 12 and 1 <= z <= 31:
        return True
    day_month = 1 <= x <= 31 and 1 <= y <= 31 and (x <= 12 or y <= 12)
    return a <= 2 and b <= 2 and c == 4 and _is_year(z) and day_month


def _extension(t: list[int], j: int) -> int:
    """End of an extension right after a number ending at ``j`` (``x123``, `` ext. 123``),
    else ``j``."""
    k = j + 1 if t[j] == 32 else j
    if _lower(t[k]) == 120:  # x
        k += 1
    elif _lower(t[k]) == 101 and _lower(t[k + 1]) == 120 and _lower(t[k + 2]) == 116:  # ext
        k += 3
        if t[k] == 46:
            k += 1
        if t[k] == 32:
            k += 1
    else:
        return j
    run = _digits(t, k)
    return k + run if 1 <= run <= 6 else j


# -- dates of birth -------------------------------------------------------------------------------

MONTHS = {
    "january": 1, "february": 2, "march": 3, "april": 4, "may": 5, "june": 6, "july": 7,
    "august": 8, "september": 9, "october": 10, "november": 11, "december": 12,
    "jan": 1, "feb": 2, "mar": 3, "apr": 4, "jun": 6, "jul": 7, "aug": 8, "sep": 9,
    "sept": 9, "oct": 10, "nov": 11, "dec": 12,
}  # fmt: skip


def _month_at(t: list[int], i: int) -> int:
    """End of a month name (optionally abbreviated, with a dot) at ``i``, or -1."""
    if t[i] >= 128 or not _CLASS[t[i]] & _ALPHA or _word(t[i - 1]):
        return -1
    word = _word_at(t, i, 9)
    if word not in MONTHS:
        return -1
    end = i + len(word)
    return end + 1 if t[end] == 46 else end


def _ordinal(t: list[int], j: int) -> int:
    """Skip st/nd/rd/th after a day number."""
    pair = (_lower(t[j]), _lower(t[j + 1]))
    if pair in ((115, 116), (110, 100), (114, 100), (116, 104)) and not _word(t[j + 2]):
        return j + 2
    return j


def _day_at(t: list[int], j: int) -> int:
    """End of a day of the month (1-31, with an optional ordinal suffix) at ``j``, or -1."""
    run = _digits(t, j)
    if run == 0 or run > 2 or not 1 <= _number(t, j, run) <= 31:
        return -1
    return _ordinal(t, j + run)


def _year_at(t: list[int], j: int) -> int:
    """End of a four-digit year 1900-2099 at ``j`` that ends a number, or -1."""
    if _digits(t, j) != 4 or not _is_year(_number(t, j, 4)) or not _ends_number(t, j + 4):
        return -1
    return j + 4


def date_at(t: list[int], i: int) -> int:
    """End of a calendar date at ``i``, or -1: 1985-03-03 (also with / or .), 03/11/1985 and
    11/03/1985 (also with - or .), 3 March 1985, 3rd Mar. 1985, March 3, 1985."""
    c = t[i]
    if not _digit(c):
        end = _month_at(t, i)
        if end < 0 or t[end] != 32:
            return -1
        end = _day_at(t, end + 1)
        if end < 0:
            return -1
        if t[end] == 44:
            end += 1
        return _year_at(t, end + 1) if t[end] == 32 else -1
    run = _digits(t, i)
    sep = t[i + run]
    if run == 4 and sep in (45, 46, 47):
        m = _digits(t, i + 5)
        if not 1 <= m <= 2 or t[i + 5 + m] != sep:
            return -1
        d = _digits(t, i + 6 + m)
        end = i + 6 + m + d
        if not 1 <= d <= 2 or not _ends_number(t, end):
            return -1
        year, month, day = _number(t, i, 4), _number(t, i + 5, m), _number(t, i + 6 + m, d)
        return end if _is_year(year) and 1 <= month <= 12 and 1 <= day <= 31 else -1
    if not 1 <= run <= 2:
        return -1
    if sep in (45, 46, 47):
        m = _digits(t, i + run + 1)
        if not 1 <= m <= 2 or t[i + run + 1 + m] != sep:
            return -1
        x, y = _number(t, i, run), _number(t, i + run + 1, m)
        if not (1 <= x <= 31 and 1 <= y <= 31 and (x <= 12 or y <= 12)):
            return -1
        return _year_at(t, i + run + 2 + m)
    end = _day_at(t, i)
    if end < 0 or t[end] != 32:
        return -1
    end = _month_at(t, end + 1)
    if end < 0:
        return -1
    if t[end] == 44:
        end += 1
    return _year_at(t, end + 1) if t[end] == 32 else -1


# -- POSTCODE -------------------------------------------------------------------------------------

# sets of code points (``int in bytes`` would refuse code points above 255)
_UK_INWARD = frozenset(b"ABDEFGHJLNPQRSTUWXYZ")
_UK_NOT_FIRST = frozenset(b"QVX")
_UK_NOT_SECOND = frozenset(b"IJZ")


def _upper(c: int) -> bool:
    return 65 <= c <= 90


def uk_postcode_at(t: list[int], i: int) -> int:
    """End of a UK postcode at ``i`` (SW1A 1AA, EC1A 1BB, M1 1AE, B33 8TH), or -1: the outward
    code A9, A99, AA9, AA99, A9A or AA9A, one space, the inward code 9AA."""
    j = i
    if not _upper(t[j]) or t[j] in _UK_NOT_FIRST:
        return -1
    j += 1
    if _upper(t[j]):
        if t[j] in _UK_NOT_SECOND:
            return -1
        j += 1
    if not _digit(t[j]):
        return -1
    j += 1
    if _digit(t[j]) or _upper(t[j]):
        j += 1
    if t[j] != 32 or not _digit(t[j + 1]):
        return -1
    if t[j + 2] not in _UK_INWARD or t[j + 3] not in _UK_INWARD:
        return -1
    j += 4
    return -1 if _word(t[j]) or t[j] == 95 else j


def us_zip_at(t: list[int], i: int) -> int:
    """End of a US ZIP code (12345 or 12345-6789) at ``i``, or -1."""
    if _digits(t, i) != 5:
        return -1
    if t[i + 5] == 45 and _digits(t, i + 6) == 4 and _ends_number(t, i + 10):
        return i + 10
    return i + 5 if _ends_number(t, i + 5) else -1


def cued_postcode_at(t: list[int], i: int) -> int:
    """End of a postal code of another common national form right after a zip/postcode cue,
    or -1: 3-6 digits optionally followed by a space or dash and 2-4 digits (394 13,
    3610-114), 12-345, 1234 AB, and the Canadian A9A 9A9."""
    if _digit(t[i]):
        run = _digits(t, i)
        sep = t[i + run]
        if sep in (32, 45) and _digit(t[i + run + 1]):
            tail = _digits(t, i + run + 1)
            end = i + run + 1 + tail
            grouped = (3 <= run <= 6 and 2 <= tail <= 4) or (run == 2 and tail == 3 and sep == 45)
            if grouped and _ends_number(t, end):
                return end
        letters = run == 4 and sep == 32 and _upper(t[i + 5]) and _upper(t[i + 6])
        if letters and not _word(t[i + 7]):
            return i + 7
        if 3 <= run <= 6 and _ends_number(t, i + run):
            return i + run
        return -1
    shape = (_upper, _digit, _upper, None, _digit, _upper, _digit)
    for k, test in enumerate(shape):
        c = t[i + k]
        if (c != 32) if test is None else not test(c):
            return -1
    return -1 if _word(t[i + 7]) else i + 7


# -- URL and EMAIL --------------------------------------------------------------------------------

# A compact list of top-level domains that bare domains (no scheme, no www.) must end with:
# generic ones and common country codes. Country codes that are also common file extensions
# (md, py, sh, rs, so, pl is kept) are left out, so that README.md or main.py are not URLs.
_TLD_NAMES = (
    "com org net edu gov mil int info biz io ai app dev co me tv xyz online site shop store "
    "tech cloud blog news name pro mobi eu asia uk de fr it es pt nl be ch at se no dk fi is "
    "ie pl cz sk hu ro bg gr tr ru ua by lt lv ee si hr rs ba cy mt lu li mc us ca mx br ar "
    "cl pe uy ve au nz jp cn hk tw kr in sg my id th vn ph za ng ke eg il ae sa qa"
)
TLDS = frozenset(_TLD_NAMES.split())
_SCORE_SCHEME, _SCORE_WWW, _SCORE_BARE = 1.0, 0.9, 0.7
_URL_TRAILING = frozenset(b".,;:!?*")  # given back at the end of a URL
_NOT_BEFORE_URL = frozenset(b"@.-_/\\%+=&#~")  # a URL does not start right after these
_URL_PATH = frozenset(b"/?#")


def _host_labels(t: list[int], j: int) -> tuple[int, int, int]:
    """``(end, labels, last_label_start)`` of a dotted host name at ``j`` (ASCII letters,
    digits and inner hyphens), or ``(-1, 0, 0)`` when a label starts or ends with ``-``."""
    labels = 0
    last = j
    while True:
        k = j
        while _cls(t[k]) & _ALNUM or t[k] == 45:
            k += 1
        if k == j or t[j] == 45 or t[k - 1] == 45:
            return -1, 0, 0
        labels += 1
        last = j
        j = k
        if t[j] == 46 and _cls(t[j + 1]) & _ALNUM:
            j += 1
            continue
        return j, labels, last


def _tld_letters(t: list[int], start: int, end: int) -> bool:
    return end - start >= 2 and all(_cls(c) & _ALPHA for c in t[start:end])


def _url_tail(t: list[int], j: int) -> int:
    """Extend a URL from ``j`` over URL characters, then give back trailing punctuation and
    unbalanced closing brackets."""
    opened = closed = 0
    k = j
    while _cls(t[k]) & _URL:
        if t[k] in (40, 91):
            opened += 1
        elif t[k] in (41, 93):
            closed += 1
        k += 1
    while k > j:
        c = t[k - 1]
        if c in _URL_TRAILING:
            k -= 1
        elif c in (41, 93) and closed > opened:
            closed -= 1
            k -= 1
        else:
            break
    return k


def _matches(t: list[int], i: int, word: bytes) -> bool:
    return all(_lower(t[i + k]) == c for k, c in enumerate(word))


def starts_url(t: list[int], i: int) -> bool:
    p = t[i - 1]
    return not (_word(p) or p in _NOT_BEFORE_URL)


def url_at(t: list[int], i: int) -> tuple[int, float]:
    """``(end, score)`` of a URL at ``i``, or ``(-1, 0)``: http(s)://anything (1.0),
    www.host.tld with an optional path (0.9), or a bare host.tld whose top-level domain is
    in ``TLDS`` and written in one case (0.7)."""
    if _matches(t, i, b"http"):
        k = i + 5 if _lower(t[i + 4]) == 115 else i + 4
        if t[k] == 58 and t[k + 1] == 47 and t[k + 2] == 47:
            host = k + 3
            if _cls(t[host]) & _ALNUM or t[host] == 91:
                end = _url_tail(t, host)
                if end > host:
                    return end, _SCORE_SCHEME
            return -1, 0.0
    www = _matches(t, i, b"www.") and bool(_cls(t[i + 4]) & _ALNUM)
    end, labels, last = _host_labels(t, i)
    if end < 0 or labels < (3 if www else 2):
        return -1, 0.0
    c = t[end]
    if _word(c) or c in (64, 95):
        return -1, 0.0
    if www:
        if not _tld_letters(t, last, end):
            return -1, 0.0
        score = _SCORE_WWW
    else:
        tld = t[last:end]
        if not all(_cls(x) & _LOWER for x in tld) and not all(_cls(x) & _UPPER for x in tld):
            return -1, 0.0
        if "".join(chr(_lower(x)) for x in tld) not in TLDS:
            return -1, 0.0
        score = _SCORE_BARE
    if c in _URL_PATH or (c == 58 and _digit(t[end + 1])):
        end = _url_tail(t, end)
    return end, score


def email_at(t: list[int], at: int) -> tuple[int, int]:
    """``(start, end)`` of an e-mail address around the ``@`` at ``at``, or ``(-1, -1)``.

    The local part is the run of letters (any script), digits and ``._%+-`` before the ``@``
    (from after a ``..``, leading dots dropped, not ending in a dot); the domain is two labels
    or more, the last of at least two ASCII letters.
    """
    k = at
    while k > 0:
        c = t[k - 1]
        if c < 128:
            if not _CLASS[c] & _LOCAL or (c == 46 and t[k - 2] == 46):
                break
        elif not _word(c):
            break
        k -= 1
    while k < at and t[k] == 46:
        k += 1
    if k == at or t[at - 1] == 46:
        return -1, -1
    end, labels, last = _host_labels(t, at + 1)
    if end < 0 or labels < 2 or not _tld_letters(t, last, end):
        return -1, -1
    if _word(t[end]) or t[end] in (64, 95):
        return -1, -1
    return k, end


# -- the scan -------------------------------------------------------------------------------------


def _resolve(
    candidates: list[tuple[int, int, int, float]], n: int
) -> list[tuple[int, int, int, float]]:
    def rank(c: tuple[int, int, int, float]) -> tuple[int, int, int, int]:
        kind, start, end, _ = c
        return (0 if CHECKSUMMED >> kind & 1 else 1, start - end, start, PRIORITY[kind])

    taken = bytearray(n)
    kept = []
    for candidate in sorted(candidates, key=rank):
        _, start, end, _ = candidate
        if taken.find(1, start, end) < 0:
            taken[start:end] = b"\x01" * (end - start)
            kept.append(candidate)
    kept.sort(key=lambda c: c[1])
    return kept


def scan(text: str, mask: int = ALL_KINDS) -> list[tuple[int, int, int, float]]:
    """``(kind, start, end, score)`` of every structured identifier in ``text``."""
    if not isinstance(text, str):
        raise TypeError(f"text is {type(text).__name__}, not str")
    n = len(text)
    t = [ord(ch) for ch in text]
    t.extend([0] * PAD)
    out: list[tuple[int, int, int, float]] = []
    resume = [0] * len(KINDS)
    never = -(1 << 40)
    birth = phone_cue = zip_cue = state = never

    def on(kind: int, start: int) -> bool:
        return bool(mask >> kind & 1) and start >= resume[kind]

    def add(kind: int, start: int, end: int, score: float) -> None:
        out.append((kind, start, end, score))
        resume[kind] = end

    for i in range(n):
        c = t[i]
        cls = _CLASS[c] if c < 128 else 0
        if cls & _ALNUM:
            word_start = not _word(t[i - 1]) and t[i - 1] != 95
            if cls & _ALPHA and word_start:
                cue, end = cue_at(t, i)
                if cue == CUE_BIRTH:
                    birth = end
                elif cue == CUE_PHONE:
                    phone_cue = end
                elif cue == CUE_ZIP:
                    zip_cue = end
                elif cue == CUE_STATE:
                    state = end
                if on(IBAN, i):
                    end = iban_at(t, i)
                    if end >= 0:
                        add(IBAN, i, end, 1.0)
                if on(POSTCODE, i):
                    cued = 0 <= i - zip_cue <= ZIP_WINDOW
                    end = uk_postcode_at(t, i)
                    if end >= 0:
                        add(POSTCODE, i, end, 1.0 if cued else 0.9)
                    elif cued:
                        end = cued_postcode_at(t, i)
                        if end >= 0:
                            add(POSTCODE, i, end, 0.9)
            if word_start and on(URL, i) and starts_url(t, i):
                end, score = url_at(t, i)
                if end >= 0:
                    add(URL, i, end, score)
            if cls & _HEX and on(IP_ADDRESS, i) and starts_ipv6(t, i):
                end = ipv6_at(t, i)
                if end >= 0:
                    add(IP_ADDRESS, i, end, 1.0)
            can_date = (cls & _ALPHA and word_start) or (cls & _DIGIT and _starts_number(t, i))
            if can_date and on(DATE_OF_BIRTH, i) and 0 <= i - birth <= BIRTH_WINDOW:
                end = date_at(t, i)
                if end >= 0:
                    add(DATE_OF_BIRTH, i, end, 1.0)
            if cls & _DIGIT and _starts_number(t, i):
                if on(CARD, i):
                    end = card_at(t, i)
                    if end >= 0:
                        add(CARD, i, end, 1.0)
                if on(SSN, i):
                    end = ssn_at(t, i)
                    if end >= 0:
                        add(SSN, i, end, 1.0 if t[i + 3] == 45 else 0.9)
                if on(IP_ADDRESS, i):
                    end = ipv4_at(t, i)
                    if end >= 0:
                        add(IP_ADDRESS, i, end, 1.0)
                if on(POSTCODE, i):
                    gap = i - state
                    by_state = 1 <= gap <= STATE_GAP and all(
                        t[k] in (32, 44) for k in range(state, i)
                    )
                    cued = 0 <= i - zip_cue <= ZIP_WINDOW
                    if by_state or cued:
                        end = us_zip_at(t, i)
                        if end >= 0:
                            add(POSTCODE, i, end, 1.0)
                        elif cued:
                            end = cued_postcode_at(t, i)
                            if end >= 0:
                                add(POSTCODE, i, end, 0.9)
                if on(PHONE, i) and t[i - 1] != 43:
                    end, score = phone_at(t, i, 0 <= i - phone_cue <= PHONE_WINDOW)
                    if end >= 0:
                        add(PHONE, i, end, score)
        elif c == 64:
            if mask >> EMAIL & 1:
                start, end = email_at(t, i)
                if start >= resume[EMAIL]:
                    add(EMAIL, start, end, 1.0)
        elif c == 43 or c == 40:
            if on(PHONE, i) and _digit(t[i + 1]) and _starts_number(t, i):
                end, score = phone_at(t, i, 0 <= i - phone_cue <= PHONE_WINDOW)
                if end >= 0:
                    add(PHONE, i, end, score)
        elif c == 58 and t[i + 1] == 58 and on(IP_ADDRESS, i) and starts_ipv6(t, i):
            end = ipv6_at(t, i)
            if end >= 0:
                add(IP_ADDRESS, i, end, 1.0)
    return _resolve(out, n)
