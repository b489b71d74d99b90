"""The featurizer's behaviour, natively and in pure Python; both give exactly the same ids.

Behaviour tests run once per implementation (the ``implementation`` fixture); the property
tests prove the native featurizer equals the reference on any text, any parameters and
hostile sizes, and skip when the extension is not built.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router._native import NO_EXTENSIONS
from router.routing.featurizer import (
    USING_NATIVE,
    Featurizer,
    FeaturizerParams,
    NativeHashedNgrams,
    normalize,
)
from router.routing.featurizer_ref import ReferenceHashedNgrams, split_words

NATIVE_MODULE = "router._native.featurizer"

params_strategy = st.builds(
    FeaturizerParams,
    buckets_log2=st.integers(1, 24),
    seed=st.integers(0, 2**32 - 1),
    char_ngram_min=st.integers(1, 4),
    char_ngram_max=st.integers(4, 7),
    word_bigrams=st.booleans(),
)
# arbitrary code points, surrogates included; a few ASCII separators so that words form
texts_strategy = st.text(alphabet=st.characters() | st.sampled_from(" \t.,-"), max_size=300)


def hostile(chunk: str, size: int = 100_000) -> str:
    return (chunk * (size // len(chunk) + 1))[:size]


@pytest.fixture(scope="module")
def native(implementation: str) -> bool:
    """``Featurizer(native=...)`` for the implementation under test."""
    return implementation == "native"


def both(params: FeaturizerParams) -> tuple[Featurizer, Featurizer]:
    return Featurizer(params, native=True), Featurizer(params, native=False)


# -- behaviour, once per implementation ---------------------------------------------------------


def test_empty_text_has_no_ids(native: bool):
    ids = Featurizer(native=native).featurize("")
    assert ids.dtype == np.int64 and ids.shape == (0,)


def test_normalisation_nfkc_casefold_and_control_characters(native: bool):
    assert normalize("ﬁne STRASSE Straße") == "fine strasse strasse"
    # a zero-width joiner inside a word vanishes instead of splitting it
    assert split_words(normalize("pass\u200dword")) == ["password"]
    assert split_words(normalize("Where's  order\t#42?")) == ["where", "s", "order", "42"]
    featurizer = Featurizer(native=native)
    np.testing.assert_array_equal(featurizer.featurize("ORDER"), featurizer.featurize("order"))
    np.testing.assert_array_equal(
        featurizer.featurize("pass\u200dword"), featurizer.featurize("password")
    )


def test_id_layout_unigrams_bigrams_char_ngrams(native: bool):
    params = FeaturizerParams(char_ngram_min=3, char_ngram_max=3)
    ids = Featurizer(params, native=native).featurize("ab cd")
    # 2 unigrams + 1 bigram + 2 words x 2 trigrams of "\x02ab\x03"
    assert len(ids) == 2 + 1 + 4
    without_bigrams = FeaturizerParams(char_ngram_min=3, char_ngram_max=3, word_bigrams=False)
    assert len(Featurizer(without_bigrams, native=native).featurize("ab cd")) == 2 + 4


def test_ids_stay_inside_the_buckets(native: bool):
    params = FeaturizerParams(buckets_log2=3)
    ids = Featurizer(params, native=native).featurize("a fairly long sentence, with words")
    assert len(ids) > 0 and ((ids >= 0) & (ids < params.buckets)).all()


def test_batch_pads_with_pad_id(native: bool):
    featurizer = Featurizer(FeaturizerParams(buckets_log2=10), native=native)
    assert featurizer.pad_id == 1024 == featurizer._impl.pad_id
    batch = featurizer.featurize_batch(["one two three", "x", ""])
    assert batch.dtype == np.int64 and batch.flags.c_contiguous
    assert batch.shape == (3, len(featurizer.featurize("one two three")))
    np.testing.assert_array_equal(batch[0], featurizer.featurize("one two three"))
    x = featurizer.featurize("x")
    np.testing.assert_array_equal(batch[1, : len(x)], x)
    assert (batch[1, len(x) :] == featurizer.pad_id).all()
    assert (batch[2] == featurizer.pad_id).all()


def test_batch_is_at_least_one_column_wide(native: bool):
    featurizer = Featurizer(native=native)
    assert featurizer.featurize_batch([]).shape == (0, 1)
    empty = featurizer.featurize_batch(["", "...", "\x00"])
    assert empty.shape == (3, 1) and (empty == featurizer.pad_id).all()


def test_batch_takes_any_sequence_and_refuses_non_text(native: bool):
    featurizer = Featurizer(native=native)
    texts = ("Where is my order", "refund please")
    np.testing.assert_array_equal(
        featurizer.featurize_batch(texts), featurizer.featurize_batch(list(texts))
    )
    with pytest.raises(TypeError):
        featurizer.featurize_batch(["fine", None])  # type: ignore[list-item]


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(texts_strategy, max_size=12), params=params_strategy)
def test_batch_rows_are_the_single_featurizations(
    native: bool, texts: list[str], params: FeaturizerParams
):
    featurizer = Featurizer(params, native=native)
    batch = featurizer.featurize_batch(texts)
    rows = [featurizer.featurize(text) for text in texts]
    assert batch.shape == (len(texts), max([len(row) for row in rows] + [1]))
    for out, row in zip(batch, rows, strict=True):
        np.testing.assert_array_equal(out[: len(row)], row)
        assert (out[len(row) :] == params.buckets).all()


def test_threads_featurize_concurrently(native: bool):
    featurizer = Featurizer(native=native)
    texts = [f"order {i} for store {i % 7}: où est ma commande {'x' * (i % 50)}" for i in range(64)]
    expected = featurizer.featurize_batch(texts)
    with ThreadPoolExecutor(max_workers=8) as pool:
        batches = list(pool.map(lambda _: featurizer.featurize_batch(texts), range(16)))
        singles = list(pool.map(featurizer.featurize, texts * 4))
    for batch in batches:
        np.testing.assert_array_equal(batch, expected)
    for i, ids in enumerate(singles):
        np.testing.assert_array_equal(ids, featurizer.featurize(texts[i % len(texts)]))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"buckets_log2": 0},
        {"buckets_log2": 32},
        {"char_ngram_min": 0},
        {"char_ngram_min": 5, "char_ngram_max": 4},
        {"char_ngram_max": 17},
    ],
)
def test_bad_parameters_rejected(native: bool, kwargs: dict[str, int]):
    with pytest.raises(ValueError):
        Featurizer(FeaturizerParams(**kwargs), native=native)  # type: ignore[arg-type]


# -- which implementation is chosen ------------------------------------------------------------


def test_the_default_follows_the_switch():
    assert USING_NATIVE is (NativeHashedNgrams is not None)
    assert Featurizer().native == USING_NATIVE
    if NO_EXTENSIONS:
        assert not USING_NATIVE
    if not USING_NATIVE:
        assert isinstance(Featurizer()._impl, ReferenceHashedNgrams)
        with pytest.raises(RuntimeError, match="not built"):
            Featurizer(native=True)


@pytest.mark.parametrize("value", ["1", "0"])
def test_no_extensions_switch_chooses_every_module_at_import(value: str):
    """One variable decides for the featurizer and the linear head alike."""
    probe = (
        "import importlib.util as u\n"
        "from router._native import NO_EXTENSIONS\n"
        "from router.routing import featurizer, linear_head_ref, model\n"
        "built = all(u.find_spec(f'router._native.{m}') for m in ('featurizer', 'linear_head'))\n"
        "head_native = model._LinearHead is not linear_head_ref.LinearHead\n"
        "print(NO_EXTENSIONS, built, featurizer.USING_NATIVE, head_native)\n"
    )
    env = {**os.environ, "PLEXUS_NO_EXTENSIONS": value}
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    disabled, built, featurizer_native, head_native = result.stdout.split()
    assert disabled == str(value == "1")
    expected = str(value == "0" and built == "True")
    assert (featurizer_native, head_native) == (expected, expected)


# -- the native featurizer is the reference, exactly --------------------------------------------

requires_native = pytest.mark.usefixtures("native_available")


@requires_native
@settings(max_examples=300, deadline=None)
@given(text=st.text(), params=params_strategy)
def test_native_matches_reference_on_arbitrary_unicode(text: str, params: FeaturizerParams):
    native, reference = both(params)
    ids = native.featurize(text)
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, reference.featurize(text))
    assert ((ids >= 0) & (ids < params.buckets)).all()


@requires_native
@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=200))
def test_default_parameters_agree(text: str):
    native, reference = both(FeaturizerParams())
    np.testing.assert_array_equal(native.featurize(text), reference.featurize(text))


@requires_native
@settings(max_examples=5, deadline=None)
@given(chunk=st.text(min_size=1, max_size=40), params=params_strategy)
def test_hostile_sizes_100kb(chunk: str, params: FeaturizerParams):
    text = hostile(chunk)
    native, reference = both(params)
    np.testing.assert_array_equal(native.featurize(text), reference.featurize(text))


@requires_native
@pytest.mark.parametrize(
    "text",
    ["", " ", "\x00\x01\u200b", "!!!", "a" * 100_000, "a " * 50_000, "\ud800x", "\U0010ffff" * 9],
)
def test_edge_cases_agree(text: str):
    native, reference = both(FeaturizerParams())
    np.testing.assert_array_equal(native.featurize(text), reference.featurize(text))


@requires_native
@settings(max_examples=150, deadline=None)
@given(texts=st.lists(texts_strategy, max_size=16), params=params_strategy)
def test_native_batch_matches_reference(texts: list[str], params: FeaturizerParams):
    native, reference = both(params)
    batch = native.featurize_batch(texts)
    assert batch.dtype == np.int64 and batch.flags.c_contiguous
    np.testing.assert_array_equal(batch, reference.featurize_batch(texts))


@requires_native
@settings(max_examples=4, deadline=None)
@given(
    chunk=st.text(min_size=1, max_size=40),
    small=st.lists(st.text(max_size=30), max_size=4),
    params=params_strategy,
)
def test_native_batch_matches_reference_on_hostile_sizes(
    chunk: str, small: list[str], params: FeaturizerParams
):
    texts = [*small, hostile(chunk), "", hostile(chunk[::-1], 1_000)]
    native, reference = both(params)
    np.testing.assert_array_equal(native.featurize_batch(texts), reference.featurize_batch(texts))
