"""Structured PII: e-mail addresses, phone numbers, payment cards, IBANs, US SSNs, IP addresses,
URLs, dates of birth and postcodes, found in one pass over the text without regular expressions.

``PiiScanner(kinds).scan(text)`` returns ``Span``s with code point offsets (end exclusive),
sorted by start and never overlapping. Where candidates overlap, a checksummed kind (CARD, IBAN)
wins, then the longer, then the earlier. What each kind takes and refuses is documented by its
detector in ``router.governance.pii_scan_ref``; in short:

=============  ==================================================================  ===========
kind           takes                                                               score
=============  ==================================================================  ===========
EMAIL          local@domain.tld, letters of any script in the local part           1.0
PHONE          +CC forms; (555) 555-0123, 555-555-0123, 555.555.0123,              1.0 / 0.8 /
               020 7946 0958 and other national groupings, 7-15 digits, with       0.6
               an extension; 1.0 with + or a phone cue ("phone", "call", "fax"
               before or right after), 0.8 with parentheses or 3+ groups, 0.6
               for two groups; a solid run or two space-separated groups only
               with +, parentheses or a cue; never a date, SSN or card shape
CARD           13-19 digits (12 with a Maestro prefix), solid or in groups,        1.0
               Luhn-valid
IBAN           country code, check digits, the country's registered length,       1.0
               solid or in groups of four, mod-97-valid
SSN            ddd-dd-dddd (1.0) or ddd dd dddd (0.9); never area 000, 666, 9xx,   1.0 / 0.9
               group 00 or serial 0000
IP_ADDRESS     dotted quads (octets 0-255, no leading zeros); IPv6 full,           1.0
               compressed (two groups at least) and IPv4-suffixed
URL            http(s)://... (1.0), www.host.tld/... (0.9), a bare host.tld with   1.0 / 0.9 /
               a top-level domain from a compact list (0.7); not the domain of     0.7
               an e-mail address
DATE_OF_BIRTH  1985-03-03, 03/11/1985, 3 March 1985, March 3, 1985 starting at     1.0
               most 40 characters after a birth cue ("born", "DOB", "birth...")
POSTCODE       US ZIP (12345, 12345-6789) right after a state abbreviation or      1.0 / 0.9
               after zip/postcode/postal (1.0); after those words also other
               national forms (394 13, 3610-114, 1234 AB, A9A 9A9: 0.9); UK
               postcodes anywhere (SW1A 1AA: 0.9, 1.0 after the cue words)
=============  ==================================================================  ===========

The native scanner (``router._native.pii``) is chosen once at import, unless the shared switch
``router._native.NO_EXTENSIONS`` (``PLEXUS_NO_EXTENSIONS=1``) forces the pure-Python reference,
which gives identical spans; without the built extension the reference is used too. A
600-character text (about 100 tokens) takes about 20 µs at the median and under 55 µs at p99
natively, on one core, and about 1.5 ms and 7 ms in the reference (``python -m
tests.test_pii_scan``: presidio-research sentences and entity-dense texts cut to 600 characters).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from router._native import NO_EXTENSIONS
from router.governance import pii_scan_ref
from router.governance.types import Span

KINDS: tuple[str, ...] = pii_scan_ref.KINDS

_Scan = Callable[[str, int], list[tuple[int, int, int, float]]]


def _native_scan() -> _Scan | None:
    if NO_EXTENSIONS:
        return None
    try:
        from router._native.pii import scan
    except ImportError:  # pragma: no cover - only when the package was not built
        return None
    return scan


native_scan = _native_scan()
USING_NATIVE = native_scan is not None


class PiiScanner:
    """Finds the structured identifiers of ``kinds`` (None: every kind in ``KINDS``).

    Kinds left out are not looked for at all, so they never take a span from another kind.
    ``native`` forces an implementation (default: the one chosen at import).
    """

    def __init__(self, kinds: Iterable[str] | None = None, *, native: bool | None = None) -> None:
        selected = KINDS if kinds is None else tuple(dict.fromkeys(kinds))
        unknown = [kind for kind in selected if kind not in KINDS]
        if unknown:
            raise ValueError(f"unknown PII kinds {unknown}; expected some of {list(KINDS)}")
        use_native = USING_NATIVE if native is None else native
        if use_native and native_scan is None:
            raise RuntimeError("the native PII scanner is not built")
        self.kinds: tuple[str, ...] = selected
        self.native = bool(use_native)
        self._mask = sum(1 << KINDS.index(kind) for kind in selected)
        self._scan: _Scan = native_scan if use_native and native_scan else pii_scan_ref.scan

    def scan(self, text: str) -> list[Span]:
        if not self._mask:
            if not isinstance(text, str):
                raise TypeError(f"text is {type(text).__name__}, not str")
            return []
        return [
            Span(KINDS[kind], start, end, score)
            for kind, start, end, score in self._scan(text, self._mask)
        ]
