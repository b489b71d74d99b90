"""The prepared encoder graph is cached once per source file, variant and onnxruntime."""

from __future__ import annotations

import numpy as np

from router.routing import encoder as encoder_module
from router.routing.encoder import SentenceEncoder, cache_dir, cached_model, model_file


def test_prepared_graph_is_cached_and_a_damaged_entry_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("PLEXUS_CACHE_DIR", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    first = cached_model(model_file())
    (entry,) = (tmp_path / "cache").iterdir()
    assert entry.read_bytes() == first

    prepared: list[bool] = []
    real_prepare = encoder_module.prepare_model

    def counting_prepare(*args, **kwargs):  # type: ignore[no-untyped-def]
        prepared.append(True)
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(encoder_module, "prepare_model", counting_prepare)
    assert cached_model(model_file()) == first and prepared == []  # read, not prepared

    entry.write_bytes(b"not an onnx graph")
    encoder = SentenceEncoder()  # the damaged entry is detected and the graph prepared again
    assert prepared == [True]
    assert entry.read_bytes() == first  # and the entry is whole again
    vectors = encoder.encode(["where is my order", "is the kettle in stock"])
    assert vectors.shape == (2, encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_an_unwritable_cache_only_costs_time(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("PLEXUS_CACHE_DIR", str(blocked / "cache"))
    assert len(cached_model(model_file(), quantize=False)) > 1_000_000
