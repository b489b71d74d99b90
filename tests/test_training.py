"""Training, calibration and the self-describing ONNX contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from router.routing.examples import DatasetError, Examples, read_examples
from router.routing.featurizer import FeaturizerParams
from router.routing.metrics import decide_rows
from router.routing.model import Classifier, ModelCard, ModelContractError, build_linear_onnx
from router.routing.training import calibrate_threshold, train_model

ROUTES = {
    "order_status": [
        "where is my order",
        "track my package",
        "has my parcel shipped yet",
        "when will my delivery arrive",
        "order 1234 status please",
    ],
    "store_hours": [
        "when do you open",
        "what time does the store close",
        "are you open on sunday",
        "holiday opening hours",
        "closing time tonight",
    ],
    "returns": [
        "how do I return shoes",
        "can I exchange this shirt",
        "refund for a return",
        "return policy for electronics",
        "send back a damaged item",
    ],
}
OOS = [
    "what is the weather tomorrow",
    "tell me a joke",
    "who won the football game",
    "recipe for pancakes",
    "how tall is mount everest",
]


def small_examples() -> Examples:
    texts = [t for examples in ROUTES.values() for t in examples] + OOS
    labels = [r for r, examples in ROUTES.items() for _ in examples] + ["oos"] * len(OOS)
    return Examples(texts, labels)


PARAMS = FeaturizerParams(buckets_log2=12)


def test_training_is_deterministic_under_a_seed():
    first = train_model(small_examples(), featurizer_params=PARAMS, seed=3, heldout_fraction=0.4)
    second = train_model(small_examples(), featurizer_params=PARAMS, seed=3, heldout_fraction=0.4)
    np.testing.assert_array_equal(first.heldout_probs, second.heldout_probs)
    assert first.card.threshold == second.card.threshold
    assert first.card.metrics == second.card.metrics
    assert first.heldout.texts == second.heldout.texts


def test_model_file_describes_itself(tmp_path: Path):
    trained = train_model(small_examples(), featurizer_params=PARAMS, seed=0, heldout_fraction=0.4)
    path = tmp_path / "m.onnx"
    path.write_bytes(trained.model_bytes)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["plexus.labels"]) == sorted([*ROUTES, "oos"])
    assert json.loads(meta["plexus.featurizer"])["buckets_log2"] == 12
    assert meta["plexus.oos_label"] == "oos"
    assert 0.0 <= float(meta["plexus.threshold"]) <= 1.0
    assert "inscope_accuracy" in json.loads(meta["plexus.metrics"])
    assert len(meta["plexus.training_data_sha256"]) == 64
    assert meta["plexus.created_at"]
    classifier = Classifier.from_file(path)
    ids = classifier.featurizer.featurize_batch(["where is my order please"])
    probs, version = classifier.predict(ids)
    assert version == "m"
    assert probs.shape == (1, 4)
    assert classifier.labels[int(probs.argmax())] == "order_status"


def test_a_model_trained_elsewhere_that_meets_the_contract_loads():
    """A user can bring any ONNX file with the documented inputs, output and metadata."""
    rng = np.random.default_rng(0)
    card = ModelCard(
        family="fast",
        labels=["a", "b"],
        oos_label="",
        featurizer=PARAMS,
        threshold=0.5,
        metrics={"inscope_accuracy": 0.9},
        encoder=None,
        training_data_sha256="0" * 64,
        created_at="2026-01-01T00:00:00+00:00",
    )
    weights = rng.normal(size=(PARAMS.buckets, 2)).astype(np.float32)
    classifier = Classifier(build_linear_onnx(weights, np.zeros(2, np.float32), card), "byo")
    probs, _ = classifier.predict(classifier.featurizer.featurize_batch(["anything at all"]))
    assert probs.shape == (1, 2)
    assert np.isclose(probs.sum(), 1.0, atol=1e-5)


def test_files_that_break_the_contract_are_refused():
    identity = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["ids"], ["probs"])],
            "g",
            [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 2])],
            [helper.make_tensor_value_info("probs", TensorProto.INT64, [1, 2])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    with pytest.raises(ModelContractError, match="metadata_props lacks"):
        Classifier(identity.SerializeToString(), "x")
    with pytest.raises(ModelContractError, match="cannot load"):
        Classifier(b"not onnx at all", "x")


def test_calibration_uses_out_of_scope_examples():
    labels = ["a", "b", "oos"]
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.4, 0.35, 0.25], [0.45, 0.3, 0.25]])
    truth = ["a", "b", "oos", "oos"]
    threshold = calibrate_threshold(probs, truth, labels, "oos")
    assert 0.45 < threshold <= 0.8
    result = decide_rows(probs, labels, "oos", threshold)
    assert result.predicted == ["a", "b", "oos", "oos"]


def test_read_examples_jsonl_and_csv(tmp_path: Path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "hi", "label": "oos"}\n\n{"text": "where", "label": "order"}\n')
    assert read_examples(jsonl).labels == ["oos", "order"]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('text,label\n"hello, there",greet\n')
    assert read_examples(csv_path).texts == ["hello, there"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "label": "a"}\n{"text": 3, "label": "a"}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl: line 2: 'text'"):
        read_examples(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(DatasetError, match=r"broken.jsonl: line 1: invalid JSON"):
        read_examples(broken)


def test_accurate_family_adds_the_sentence_encoder():
    from router.routing.encoder import SERVING_ENCODER_NAME, shared_encoder

    trained = train_model(
        small_examples(),
        family="accurate",
        featurizer_params=PARAMS,
        seed=0,
        heldout_fraction=0.4,
    )
    assert trained.card.encoder["name"] == SERVING_ENCODER_NAME
    assert trained.card.encoder["dim"] == 384
    classifier = Classifier(trained.model_bytes, "acc")
    assert classifier.uses_encoder
    texts = ["has my parcel shipped", "are you open on sunday"]
    embedding = shared_encoder().encode(texts)
    assert embedding.shape == (2, 384)
    assert np.allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-4)
    probs, _ = classifier.predict(classifier.featurizer.featurize_batch(texts), embedding)
    assert [classifier.labels[i] for i in probs.argmax(axis=1)] == ["order_status", "store_hours"]


def test_encoder_on_cuda_falls_back_to_the_cpu_without_a_gpu():
    import onnxruntime as ort

    from router.routing.encoder import SentenceEncoder

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime has CUDA here: the fallback cannot be observed")
    encoder = SentenceEncoder(device="cuda")
    assert encoder.device == "cpu"
    assert encoder.encode(["still works"]).shape == (1, 384)


def test_rows_that_weigh_least_are_pruned_to_the_budget():
    from router.routing.training import prune_rows

    weights = np.array([[0.1, -0.2], [3.0, 0.0], [0.0, -2.0], [0.5, 0.5]], dtype=np.float32)
    assert prune_rows(weights, max_bytes=100).tolist() == [0, 1, 2, 3]
    assert prune_rows(weights, max_bytes=4).tolist() == [1, 2]  # 2 rows of 2 one-byte weights
    assert prune_rows(weights, max_bytes=1).tolist() == [1]


def test_the_temperature_fits_held_out_likelihood():
    from router.routing.training import fit_temperature

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 5, size=2000)
    scores = rng.normal(size=(2000, 5))
    scores[np.arange(2000), truth] += 1.0
    sharp = fit_temperature(scores, truth)
    # the true model is softmax(scores): a fitted factor near 1
    assert 0.8 < sharp < 1.25
    assert fit_temperature(scores / 4, truth) == pytest.approx(4 * sharp, rel=0.05)
    assert fit_temperature(np.zeros((0, 5)), np.zeros(0, dtype=np.int64)) == 1.0


def test_the_served_model_is_the_fitted_head():
    """The exported file (int8 rows, temperature folded in) gives softmax of the head's scores."""
    trained = train_model(small_examples(), featurizer_params=PARAMS, seed=0, heldout_fraction=0.4)
    classifier = Classifier(trained.model_bytes, "m")
    assert classifier.native_head is not None and classifier.native_head.scales is not None
    texts = ["where is my parcel", "refund please", "store closing time", "weather on mars"]
    probs, _ = classifier.predict(classifier.featurizer.featurize_batch(texts))
    reference = Classifier(trained.model_bytes, "o", native_head=False)
    np.testing.assert_allclose(
        probs, reference.predict(reference.featurizer.featurize_batch(texts))[0], atol=1e-5
    )
    assert float(trained.card.extra["plexus.temperature"]) > 0


def test_two_routes_without_out_of_scope_train_and_route():
    examples = Examples(
        [
            "where is my order",
            "track my parcel",
            "order status please",
            "has it shipped",
            "refund my shoes",
            "return this item",
            "money back please",
            "send it back",
        ],
        ["order"] * 4 + ["returns"] * 4,
    )
    trained = train_model(examples, featurizer_params=PARAMS, seed=0, heldout_fraction=0.5)
    classifier = Classifier(trained.model_bytes, "two")
    probs, _ = classifier.predict(classifier.featurizer.featurize_batch(["track my order"]))
    assert classifier.labels == ["order", "returns"] and probs.shape == (1, 2)
    assert classifier.labels[int(probs.argmax())] == "order"
    assert "no out-of-scope examples" in trained.calibration.how


def test_an_unknown_family_is_refused():
    with pytest.raises(DatasetError, match="unknown model family"):
        train_model(small_examples(), family="huge", featurizer_params=PARAMS)
