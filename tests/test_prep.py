"""The prep stage: request checks, text normalisation and field extraction."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.calls import Caller, RouteQuery
from router.config import ConfigError, ExtractorConfig, parse_config
from router.errors import InvalidArgument, NotFound, PermissionDenied
from router.pipeline import RequestState
from router.stages.prep import Extractor, Prep, extract_fields, normalize_text

from .conftest import demo_config_data


def extractor(**config: object) -> Extractor:
    return Extractor.from_config(ExtractorConfig.model_validate({"name": "field", **config}))


@pytest.mark.parametrize(
    ("kind", "text", "value"),
    [
        ("store_id", "what time does store 1432 close", "1432"),
        ("store_id", "Store #77 hours?", "77"),
        ("store_id", "store number: 0112", "0112"),
        ("order_number", "where is order 88123", "88123"),
        ("order_number", "my Order #AB-552211 never came", "AB-552211"),
        ("order_number", "order no. 123456789", "123456789"),
        ("sku", "is SKU 448-2210 in stock", "448-2210"),
        ("sku", "sku: FW-TR5-M10 please", "FW-TR5-M10"),
        ("amount", "you charged me $1,250.00 twice", "1250.00"),
        ("amount", "a refund of 49.99 dollars", "49.99"),
        ("amount", "£12 fee", "12"),
        ("date", "delivered on 2026-11-03?", "2026-11-03"),
        ("date", "ordered on 3rd of March, 2026", "2026-03-03"),
        ("date", "since Sept 14, 2025", "2025-09-14"),
        ("email", "write to jo.doe+shop@example.co.uk now", "jo.doe+shop@example.co.uk"),
    ],
)
def test_built_in_kinds(kind: str, text: str, value: str) -> None:
    assert extractor(kind=kind).extract(text) == value


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        ("store_id", "what time do you close"),
        ("order_number", "order 12"),  # too short to be an order number
        ("date", "on 2026-02-30"),  # impossible date
        ("amount", "I have 3 kids"),  # a bare number is not an amount
    ],
)
def test_built_in_kinds_find_nothing(kind: str, text: str) -> None:
    assert extractor(kind=kind).extract(text) is None


def test_pattern_group_and_padding() -> None:
    assert extractor(pattern=r"(?i)loyalty\s+(\d+)", pad_digits=8).extract("Loyalty 4411") == (
        "00004411"
    )
    assert extractor(pattern=r"[A-Z]{3}\d{2}").extract("code XYZ12 here") == "XYZ12"
    found = extract_fields(
        [
            extractor(kind="store_id"),
            Extractor.from_config(ExtractorConfig(name="order", kind="order_number")),
        ],
        "store 12 and order 99881",
    )
    assert found == {"field": "12", "order": "99881"}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "x"}, "exactly one of kind"),
        ({"name": "x", "kind": "sku", "pattern": "a"}, "exactly one of kind"),
        ({"name": "x", "pattern": "(?<=a)b"}, "not a valid RE2 pattern"),
        ({"name": "x", "pattern": "(a)(b)"}, "at most one capturing group"),
        ({"name": "x", "kind": "phone"}, "tenants.retail.extractors.0.kind"),
    ],
)
def test_extractor_configuration_errors(tmp_path, entry: dict, message: str) -> None:
    data = demo_config_data(tmp_path)
    data["tenants"]["retail"]["extractors"] = [entry]
    with pytest.raises(ConfigError) as info:
        parse_config(data, tmp_path / "plexus.yaml")
    assert message in str(info.value)
    assert "plexus.yaml" in str(info.value)


def test_hostile_pattern_runs_in_linear_time() -> None:
    # Catastrophic for a backtracking engine; RE2 answers at once.
    found = extractor(pattern=r"(a+)+$").extract("a" * 5000 + "!")
    assert found is None


@pytest.mark.parametrize(
    ("raw", "prepared"),
    [
        ("  where is my order  ", "where is my order"),
        ("ｓｔｏｒｅ　１４３２", "store 1432"),  # full-width forms
        ("ign\u200bore previous\u202e", "ignore previous"),  # zero-width and bidi controls
        ("line one\nline\ttwo\x00", "line one\nline\ttwo"),
        ("ﬁne", "fine"),
    ],
)
def test_normalize_text(raw: str, prepared: str) -> None:
    assert normalize_text(raw) == prepared


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_normalize_text_is_idempotent_and_drops_controls(text: str) -> None:
    once = normalize_text(text)
    assert normalize_text(once) == once
    assert all(ch in "\t\n" or unicodedata.category(ch) not in ("Cc", "Cf") for ch in once)


def test_prep_checks(tmp_path) -> None:
    loaded = parse_config(demo_config_data(tmp_path), tmp_path / "plexus.yaml")
    prep = Prep.from_config(loaded)
    caller = Caller("retail", "k", admin=False, apps=frozenset({"store_ops"}))

    def state(app: str, text: str, who: Caller = caller) -> RequestState:
        return RequestState(who, RouteQuery(app, text))

    with pytest.raises(NotFound):
        prep.check(state("nope", "hi"))
    with pytest.raises(PermissionDenied):
        prep.check(state("storefront", "hi"))
    with pytest.raises(InvalidArgument, match="empty"):
        prep.check(state("store_ops", " \u200b\u200d "))
    with pytest.raises(InvalidArgument, match="limit is 500"):
        prep.check(state("store_ops", "x" * 501))
    ok = state("store_ops", "  hours of store 1432 ")
    prep.check(ok)
    assert ok.text == "hours of store 1432" and ok.extracted == {"store_id": "1432"}


_PIECES = st.sampled_from(
    [
        "store",
        "STORE",
        "Store #",
        "order",
        "ORDER no. ",
        "sku",
        "SKU: ",
        "1432",
        "88123",
        "ab-12",
        " ",
        "-",
        "x",
        "İ",
        "ß",
        "ſ",
        "\u212a",
        "\u0130store",
        "the ",
        "#",
        ":",
        "9",
    ]
)


@settings(max_examples=400, deadline=None)
@given(
    kind=st.sampled_from(["store_id", "order_number", "sku"]),
    pieces=st.lists(_PIECES, max_size=12),
    noise=st.text(max_size=8),
)
def test_a_search_from_the_cue_finds_what_a_whole_search_finds(kind: str, pieces, noise: str):
    """Starting the search at the cue's first place changes no value, whatever the text."""
    from router.stages.prep import _BUILT_IN

    text = noise + "".join(pieces)
    whole = Extractor(
        "whole",
        _BUILT_IN[kind].search,
        extractor(kind=kind).value_of,
        4 if kind == "store_id" else 0,
    )
    assert extractor(kind=kind, **({"pad_digits": 4} if kind == "store_id" else {})).extract(
        text
    ) == whole.extract(text)
