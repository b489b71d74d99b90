"""The native linear head, its numpy reference and onnxruntime agree on the same model file."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from router.routing.featurizer import USING_NATIVE, FeaturizerParams
from router.routing.linear_head_ref import linear_head_probs as reference_probs
from router.routing.model import Classifier, ModelCard, build_linear_onnx

pytestmark = pytest.mark.skipif(not USING_NATIVE, reason="the native extensions are not built")


def make_model(buckets_log2: int, classes: int, seed: int, sparsity: float) -> bytes:
    rng = np.random.default_rng(seed)
    params = FeaturizerParams(buckets_log2=buckets_log2)
    weights = rng.normal(scale=3.0, size=(params.buckets, classes)).astype(np.float32)
    weights[rng.random(params.buckets) < sparsity] = 0.0  # rows training never touched
    card = ModelCard(
        family="fast",
        labels=[f"r{i}" for i in range(classes)],
        oos_label="",
        featurizer=params,
        threshold=0.5,
        metrics={},
        encoder=None,
        training_data_sha256="0" * 64,
        created_at="2026-01-01T00:00:00+00:00",
    )
    return build_linear_onnx(weights, rng.normal(size=classes).astype(np.float32), card)


@settings(max_examples=60, deadline=None)
@given(
    buckets_log2=st.integers(1, 12),
    classes=st.integers(2, 40),
    seed=st.integers(0, 2**16),
    sparsity=st.floats(0.0, 1.0),
    data=st.data(),
)
def test_native_reference_and_onnxruntime_agree(buckets_log2, classes, seed, sparsity, data):
    model_bytes = make_model(buckets_log2, classes, seed, sparsity)
    native = Classifier(model_bytes, "n")
    onnxruntime = Classifier(model_bytes, "o", native_head=False)
    assert native.native_head is not None and onnxruntime.native_head is None
    pad = native.featurizer.pad_id
    ids = data.draw(
        hnp.arrays(
            np.int64,
            hnp.array_shapes(min_dims=2, max_dims=2, max_side=300),
            elements=st.integers(0, pad),
        )
    )
    expected, _ = onnxruntime.predict(ids)
    got, _ = native.predict(ids)
    head = native.native_head
    ref = reference_probs(ids, head.remap, head.weights, head.bias, head.pad_id)
    # all three accumulate in float32, in different orders
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("bad", [-1, 2**12 + 1, 2**40])
def test_ids_outside_the_buckets_are_refused(bad):
    classifier = Classifier(make_model(12, 3, 0, 0.5), "n")
    ids = np.array([[1, 2, bad]], dtype=np.int64)
    head = classifier.native_head
    with pytest.raises(ValueError, match="outside"):
        classifier.predict(ids)
    with pytest.raises(ValueError, match="outside"):
        reference_probs(ids, head.remap, head.weights, head.bias, head.pad_id)


def test_accurate_and_foreign_graphs_run_in_onnxruntime():
    from router.routing.training import train_model

    from .test_training import small_examples

    trained = train_model(
        small_examples(),
        family="accurate",
        seed=0,
        heldout_fraction=0.4,
        featurizer_params=FeaturizerParams(buckets_log2=10),
    )
    assert Classifier(trained.model_bytes, "a").native_head is None
