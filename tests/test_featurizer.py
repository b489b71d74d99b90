"""The native featurizer gives exactly the reference's ids, on any text and any parameters."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.routing.featurizer import USING_NATIVE, Featurizer, FeaturizerParams, normalize
from router.routing.featurizer_ref import ReferenceHashedNgrams, split_words

pytestmark = pytest.mark.skipif(not USING_NATIVE, reason="the native featurizer is not built")

params_strategy = st.builds(
    FeaturizerParams,
    buckets_log2=st.integers(1, 24),
    seed=st.integers(0, 2**32 - 1),
    char_ngram_min=st.integers(1, 4),
    char_ngram_max=st.integers(4, 7),
    word_bigrams=st.booleans(),
)


def both(params: FeaturizerParams) -> tuple[Featurizer, Featurizer]:
    return Featurizer(params, native=True), Featurizer(params, native=False)


@settings(max_examples=300, deadline=None)
@given(text=st.text(), params=params_strategy)
def test_native_matches_reference_on_arbitrary_unicode(text: str, params: FeaturizerParams):
    native, reference = both(params)
    ids = native.featurize(text)
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, reference.featurize(text))
    assert ((ids >= 0) & (ids < params.buckets)).all()


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=200))
def test_default_parameters_agree(text: str):
    native, reference = both(FeaturizerParams())
    np.testing.assert_array_equal(native.featurize(text), reference.featurize(text))


@settings(max_examples=5, deadline=None)
@given(chunk=st.text(min_size=1, max_size=40), params=params_strategy)
def test_hostile_sizes_100kb(chunk: str, params: FeaturizerParams):
    text = (chunk * (100_000 // len(chunk) + 1))[:100_000]
    native, reference = both(params)
    np.testing.assert_array_equal(native.featurize(text), reference.featurize(text))


@pytest.mark.parametrize("text", ["", " ", "\x00\x01\u200b", "!!!", "a" * 100_000, "\ud800x"])
def test_edge_cases_agree(text: str):
    native, reference = both(FeaturizerParams())
    np.testing.assert_array_equal(native.featurize(text), reference.featurize(text))


def test_empty_text_has_no_ids():
    assert len(Featurizer().featurize("")) == 0


def test_normalisation_nfkc_casefold_and_control_characters():
    assert normalize("ﬁne STRASSE Straße") == "fine strasse strasse"
    # a zero-width joiner inside a word vanishes instead of splitting it
    assert split_words(normalize("pass\u200dword")) == ["password"]
    assert split_words(normalize("Where's  order\t#42?")) == ["where", "s", "order", "42"]
    featurizer = Featurizer()
    np.testing.assert_array_equal(featurizer.featurize("ORDER"), featurizer.featurize("order"))


def test_id_layout_unigrams_bigrams_char_ngrams():
    params = FeaturizerParams(char_ngram_min=3, char_ngram_max=3)
    ids = Featurizer(params).featurize("ab cd")
    # 2 unigrams + 1 bigram + 2 words x 2 trigrams of "\x02ab\x03"
    assert len(ids) == 2 + 1 + 4


def test_batch_pads_with_pad_id():
    featurizer = Featurizer(FeaturizerParams(buckets_log2=10))
    batch = featurizer.featurize_batch(["one two three", "x", ""])
    assert batch.shape[0] == 3
    assert (batch[2] == featurizer.pad_id).all()
    np.testing.assert_array_equal(batch[0], featurizer.featurize("one two three"))


def test_bad_parameters_rejected_by_both():
    for impl in (ReferenceHashedNgrams, Featurizer):
        with pytest.raises(ValueError):
            if impl is Featurizer:
                Featurizer(FeaturizerParams(buckets_log2=0))
            else:
                impl(buckets_log2=40)
