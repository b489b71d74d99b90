"""The routing model contract: an ONNX file that describes itself, and the classifier over it.

Contract (version 1), checked when a file is loaded:

* inputs: ``ids`` int64 ``[batch, length]``, hashed feature ids from the featurizer named in
  the metadata, right-padded with ``buckets`` (the pad id). Models of the ``accurate`` family
  also take ``embedding`` float32 ``[batch, dim]`` from the encoder named in the metadata.
* output: ``probs`` float32 ``[batch, len(labels)]``.
* ``metadata_props``: ``plexus.contract`` ("1"), ``plexus.family``, ``plexus.labels`` (JSON list),
  ``plexus.oos_label`` (the label meaning out-of-scope, or ""), ``plexus.featurizer`` (JSON
  ``FeaturizerParams``), ``plexus.threshold``, ``plexus.metrics`` (JSON), ``plexus.encoder``
  (JSON, or "" for the fast family), ``plexus.training_data_sha256``, ``plexus.created_at``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from router._native import NO_EXTENSIONS
from router.files import atomic_write
from router.routing.encoder import inference_session
from router.routing.featurizer import Featurizer, FeaturizerParams

if TYPE_CHECKING:
    import onnx

# `onnx` is imported only where a graph is built or parsed: importing it costs 1-2 s at start-up
# (most of it in ml_dtypes), which a server loading a cached fast model never needs.

if NO_EXTENSIONS:
    from router.routing.linear_head_ref import LinearHead as _LinearHead
else:
    try:
        from router._native.linear_head import LinearHead as _LinearHead
    except ImportError:  # pragma: no cover - only when the package was not built
        from router.routing.linear_head_ref import LinearHead as _LinearHead

CONTRACT_VERSION = "1"
REQUIRED_METADATA = (
    "plexus.contract",
    "plexus.family",
    "plexus.labels",
    "plexus.oos_label",
    "plexus.featurizer",
    "plexus.threshold",
    "plexus.metrics",
    "plexus.encoder",
    "plexus.training_data_sha256",
    "plexus.created_at",
)


class ModelContractError(ValueError):
    """The file is not a routing model this server can serve; the message says why."""


@dataclass
class ModelCard:
    """What a model file says about itself."""

    family: str
    labels: list[str]
    oos_label: str
    featurizer: FeaturizerParams
    threshold: float
    metrics: dict[str, float]
    encoder: dict[str, Any] | None
    training_data_sha256: str
    created_at: str
    extra: dict[str, str] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        return {
            "plexus.contract": CONTRACT_VERSION,
            "plexus.family": self.family,
            "plexus.labels": json.dumps(self.labels),
            "plexus.oos_label": self.oos_label,
            "plexus.featurizer": json.dumps(self.featurizer.to_dict()),
            "plexus.threshold": repr(float(self.threshold)),
            "plexus.metrics": json.dumps(self.metrics),
            "plexus.encoder": json.dumps(self.encoder) if self.encoder else "",
            "plexus.training_data_sha256": self.training_data_sha256,
            "plexus.created_at": self.created_at,
            **self.extra,
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str) -> ModelCard:
        missing = [key for key in REQUIRED_METADATA if key not in meta]
        if missing:
            raise ModelContractError(f"{source}: metadata_props lacks {missing}")
        if meta["plexus.contract"] != CONTRACT_VERSION:
            raise ModelContractError(
                f"{source}: plexus.contract is {meta['plexus.contract']!r}, "
                f"this server reads {CONTRACT_VERSION!r}"
            )
        try:
            labels = json.loads(meta["plexus.labels"])
            featurizer = FeaturizerParams.from_dict(json.loads(meta["plexus.featurizer"]))
            threshold = float(meta["plexus.threshold"])
            metrics = {k: float(v) for k, v in json.loads(meta["plexus.metrics"]).items()}
            encoder = json.loads(meta["plexus.encoder"]) if meta["plexus.encoder"] else None
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelContractError(f"{source}: malformed metadata: {exc}") from None
        if not isinstance(labels, list) or len(labels) < 2 or len(set(labels)) != len(labels):
            raise ModelContractError(f"{source}: plexus.labels must list 2+ distinct labels")
        family = meta["plexus.family"]
        if family not in ("fast", "accurate"):
            raise ModelContractError(f"{source}: unknown plexus.family {family!r}")
        if (family == "accurate") != (encoder is not None):
            raise ModelContractError(f"{source}: plexus.encoder must be set exactly for 'accurate'")
        if not 0.0 <= threshold <= 1.0:
            raise ModelContractError(f"{source}: plexus.threshold {threshold} is not in [0, 1]")
        oos_label = meta["plexus.oos_label"]
        if oos_label and oos_label not in labels:
            raise ModelContractError(f"{source}: plexus.oos_label {oos_label!r} is not a label")
        extra = {k: v for k, v in meta.items() if k not in REQUIRED_METADATA}
        return cls(
            family=family,
            labels=[str(label) for label in labels],
            oos_label=oos_label,
            featurizer=featurizer,
            threshold=threshold,
            metrics=metrics,
            encoder=encoder,
            training_data_sha256=meta["plexus.training_data_sha256"],
            created_at=meta["plexus.created_at"],
            extra=extra,
        )


def _linear_nodes(dense: bool, int8: bool = False) -> list[onnx.NodeProto]:
    """The graph of a Plexus linear head (``dense``: with the encoder's embedding input;
    ``int8``: weight rows stored as int8 with a float32 scale per row)."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Gather", ["remap", "ids"], ["rows"], axis=0)]
    if int8:
        nodes += [
            helper.make_node("Gather", ["weights", "rows"], ["gathered_q"], axis=0),
            helper.make_node("Cast", ["gathered_q"], ["gathered_f"], to=TensorProto.FLOAT),
            helper.make_node("Gather", ["scales", "rows"], ["gathered_scales"], axis=0),
            helper.make_node("Mul", ["gathered_f", "gathered_scales"], ["gathered"]),
        ]
    else:
        nodes.append(helper.make_node("Gather", ["weights", "rows"], ["gathered"], axis=0))
    nodes += [
        helper.make_node("ReduceSum", ["gathered", "axis1"], ["summed"], keepdims=0),
        helper.make_node("Less", ["ids", "pad_id"], ["real"]),
        helper.make_node("Cast", ["real"], ["real_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["real_f", "axis1"], ["count"], keepdims=1),
        helper.make_node("Max", ["count", "one"], ["count1"]),
        helper.make_node("Sqrt", ["count1"], ["norm"]),
        helper.make_node("Div", ["summed", "norm"], ["sparse_logits"]),
    ]
    logits = "sparse_logits"
    if dense:
        nodes += [
            helper.make_node("MatMul", ["embedding", "dense_weights"], ["dense_logits"]),
            helper.make_node("Add", ["sparse_logits", "dense_logits"], ["all_logits"]),
        ]
        logits = "all_logits"
    return [
        *nodes,
        helper.make_node("Add", [logits, "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]


def quantize_rows(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 rows and one float32 scale per row, ``weights[r] ~= q[r] * scale[r]``: each row's
    largest magnitude maps to 127 (a row too small for a float32 step gets scale 1, all 0)."""
    weights = np.asarray(weights, dtype=np.float32)
    top = np.abs(weights).max(axis=1) if weights.size else np.zeros(len(weights), np.float32)
    step = (top / np.float32(127.0)).astype(np.float32)
    scales = np.where(step > 0, step, np.float32(1.0)).astype(np.float32)  # 0 or subnormal
    q = np.clip(np.rint(weights / scales[:, None]), -127, 127).astype(np.int8)
    return q, scales


def build_linear_onnx(
    sparse_weights: np.ndarray,
    bias: np.ndarray,
    card: ModelCard,
    dense_weights: np.ndarray | None = None,
    *,
    bucket_ids: np.ndarray | None = None,
    int8: bool = False,
) -> bytes:
    """Serialise a trained head: softmax(sum(W[ids]) / sqrt(n_ids) [+ embedding @ E] + b).

    ``sparse_weights`` is ``[buckets, classes]``, or with ``bucket_ids`` the rows of those
    buckets only (every other bucket weighs nothing). Only nonzero rows are stored, behind an
    int32 remap table, so the file grows with the vocabulary kept, not the buckets; ``int8``
    stores them as int8 with a float32 scale per row (:func:`quantize_rows`), a quarter of the
    size.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    sparse_weights = np.asarray(sparse_weights, dtype=np.float32)
    classes = sparse_weights.shape[1]
    if bucket_ids is None:
        buckets = sparse_weights.shape[0]
        bucket_ids = np.arange(buckets, dtype=np.int64)
    else:
        buckets = card.featurizer.buckets
        bucket_ids = np.asarray(bucket_ids, dtype=np.int64)
        if len(bucket_ids) != len(sparse_weights):
            raise ValueError(f"{len(bucket_ids)} bucket ids for {len(sparse_weights)} rows")
        if len(bucket_ids) and (bucket_ids.min() < 0 or bucket_ids.max() >= buckets):
            raise ValueError(f"bucket ids must be in [0, {buckets})")
    kept = np.flatnonzero(np.any(sparse_weights != 0, axis=1))
    remap = np.full(buckets + 1, len(kept), dtype=np.int32)  # pad and unseen -> zero row
    remap[bucket_ids[kept]] = np.arange(len(kept), dtype=np.int32)
    compact = np.zeros((len(kept) + 1, classes), dtype=np.float32)
    compact[: len(kept)] = sparse_weights[kept]
    pad_id = buckets
    if int8:
        q, scales = quantize_rows(compact)
        stored = [
            numpy_helper.from_array(q, "weights"),
            numpy_helper.from_array(scales.reshape(-1, 1), "scales"),
        ]
    else:
        stored = [numpy_helper.from_array(compact, "weights")]
    inits = [
        numpy_helper.from_array(remap, "remap"),
        *stored,
        numpy_helper.from_array(bias.astype(np.float32).reshape(1, -1), "bias"),
        numpy_helper.from_array(np.array(pad_id, dtype=np.int64), "pad_id"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
    ]
    nodes = _linear_nodes(dense=dense_weights is not None, int8=int8)
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "length"])]
    if dense_weights is not None:
        inputs.append(
            helper.make_tensor_value_info(
                "embedding", TensorProto.FLOAT, ["batch", dense_weights.shape[0]]
            )
        )
        inits.append(numpy_helper.from_array(dense_weights.astype(np.float32), "dense_weights"))
    graph = helper.make_graph(
        nodes,
        "plexus_router",
        inputs,
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="plexus"
    )
    model.ir_version = 8
    helper.set_model_props(model, card.to_metadata())
    onnx.checker.check_model(model)
    return model.SerializeToString()


class NativeLinearHead:
    """The fast family's graph run by the native kernel (numpy reference without extensions).

    Used only for files whose graph is exactly the one ``build_linear_onnx`` writes without an
    embedding input; any other contract-compliant file runs in onnxruntime.
    """

    def __init__(
        self,
        remap: np.ndarray,
        weights: np.ndarray,
        bias: np.ndarray,
        pad_id: int,
        scales: np.ndarray | None = None,
    ):
        """``weights`` float32 ``[rows, classes]``, or int8 with ``scales`` (float32, one per
        row): the two graphs ``build_linear_onnx`` writes. The kernel sums int8 rows as they
        are, each times its scale (the products the graph's ``Cast`` and ``Mul`` make, so the
        same sums as the rows multiplied out, bit for bit): as fast, and a quarter of the
        memory (5 MB instead of 21 MB for the CLINC150 model)."""
        self.remap = np.ascontiguousarray(remap, dtype=np.int64)
        self.scales: np.ndarray | None = None
        if scales is None:
            self.weights = np.ascontiguousarray(weights, dtype=np.float32)
        else:
            self.weights = np.ascontiguousarray(weights)
            self.scales = np.ascontiguousarray(np.reshape(scales, -1), dtype=np.float32)
            if self.weights.dtype != np.int8:
                raise ModelContractError("scaled linear head weights must be int8")
            if self.weights.ndim != 2 or len(self.scales) != len(self.weights):
                raise ModelContractError("the scales do not match the weight rows")
        self.bias = np.ascontiguousarray(bias.reshape(-1), dtype=np.float32)
        self.pad_id = int(pad_id)
        if self.weights.ndim != 2 or len(self.weights) == 0:
            raise ModelContractError("the linear head weights must be a nonempty matrix")
        if len(self.remap) != self.pad_id + 1 or len(self.bias) != self.weights.shape[1]:
            raise ModelContractError("inconsistent linear head tensors")
        if self.remap.min() < 0 or self.remap.max() >= len(self.weights):
            raise ModelContractError("the remap table points outside the weights")
        self._head = _LinearHead(self.remap, self.weights, self.bias, self.pad_id, self.scales)

    @classmethod
    def from_bytes(cls, model_bytes: bytes) -> NativeLinearHead | None:
        """The head of a model file, or None when its graph is not the one Plexus writes.

        What a file holds is cached by its SHA-256 (``cache_dir()/head-*.npz``), so a restart
        reads four arrays instead of parsing the graph with ``onnx``.
        """
        from router.routing.encoder import cache_dir

        digest = hashlib.sha256(model_bytes).hexdigest()[:32]
        cached = cache_dir() / f"head-{digest}.npz"
        try:
            with np.load(cached) as arrays:
                if not bool(arrays["native"]):
                    return None
                scales = arrays["scales"] if "scales" in arrays.files else None
                return cls(
                    arrays["remap"],
                    arrays["weights"],
                    arrays["bias"],
                    int(arrays["pad_id"]),
                    scales,
                )
        except (OSError, KeyError, ValueError):
            pass  # not cached yet (or damaged): parse the graph and cache it
        import onnx

        head = cls.from_model(onnx.load_from_string(model_bytes))
        arrays: dict[str, np.ndarray] = {"native": np.array(head is not None)}
        if head is not None:
            scales = head.scales
            arrays |= {
                "remap": head.remap.astype(np.int32 if len(head.weights) < 2**31 else np.int64),
                "weights": head.weights,
                "bias": head.bias,
                "pad_id": np.array(head.pad_id),
            }
            if scales is not None:
                arrays["scales"] = scales
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        with contextlib.suppress(OSError):  # an unwritable cache only costs time
            atomic_write(cached, buffer.getvalue())
        return head

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> NativeLinearHead | None:
        from onnx import numpy_helper

        graph = model.graph
        if [i.name for i in graph.input] != ["ids"]:
            return None
        signature = _node_signature(graph.node)
        int8 = signature == _node_signature(_linear_nodes(dense=False, int8=True))
        if not int8 and signature != _node_signature(_linear_nodes(dense=False)):
            return None
        tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        needed = {"remap", "weights", "bias", "pad_id", "axis1", "one"} | (
            {"scales"} if int8 else set()
        )
        if not needed <= set(tensors):
            return None
        if tensors["axis1"].tolist() != [1] or float(tensors["one"]) != 1.0:
            return None
        weights = tensors["weights"]
        if weights.dtype != (np.int8 if int8 else np.float32):
            return None
        if int8 and tensors["scales"].shape != (len(weights), 1):
            return None
        scales = tensors["scales"] if int8 else None
        return cls(tensors["remap"], weights, tensors["bias"], int(tensors["pad_id"]), scales)

    def probs(self, ids: np.ndarray) -> np.ndarray:
        return self._head.probs(np.ascontiguousarray(ids, dtype=np.int64))


def _node_signature(
    nodes: Iterable[onnx.NodeProto],
) -> list[tuple[str, list[str], list[str], list[bytes]]]:
    return [
        (
            n.op_type,
            list(n.input),
            list(n.output),
            sorted(a.SerializeToString() for a in n.attribute),
        )
        for n in nodes
    ]


class Classifier:
    """``predict(ids[, embedding]) -> (probs, version)`` over one loaded routing model."""

    def __init__(
        self,
        model_bytes: bytes,
        version: str,
        source: str = "<memory>",
        threads: int = 1,
        native_head: bool = True,
    ):
        self.version = version
        self.source = source
        try:
            self._session = inference_session(model_bytes, threads)
        except Exception as exc:  # onnxruntime raises several unrelated exception types
            raise ModelContractError(f"{source}: onnxruntime cannot load it: {exc}") from None
        meta = dict(self._session.get_modelmeta().custom_metadata_map)
        self.card = ModelCard.from_metadata(meta, source)
        self._check_signature(source)
        self.featurizer = Featurizer(self.card.featurizer)
        self.labels = self.card.labels
        self.uses_encoder = self.card.encoder is not None
        self._output = ["probs"]
        self.native_head = None
        if native_head and not self.uses_encoder:
            self.native_head = NativeLinearHead.from_bytes(model_bytes)
        self._check_output(source)

    def _check_output(self, source: str) -> None:
        """One prediction on padding: the output must be one probability per label."""
        ids = np.full((1, 1), self.featurizer.pad_id, dtype=np.int64)
        embedding = None
        if self.uses_encoder:
            embedding = np.zeros((1, int(self.card.encoder.get("dim", 0))), dtype=np.float32)
        try:
            probs, _ = self.predict(ids, embedding)
        except Exception as exc:  # onnxruntime raises several unrelated exception types
            raise ModelContractError(f"{source}: a test prediction failed: {exc}") from None
        if probs.shape != (1, len(self.labels)):
            raise ModelContractError(
                f"{source}: 'probs' has shape {probs.shape}; expected (1, {len(self.labels)})"
            )

    def _check_signature(self, source: str) -> None:
        inputs = {i.name: i for i in self._session.get_inputs()}
        expected = {"ids": "tensor(int64)"}
        if self.card.family == "accurate":
            expected["embedding"] = "tensor(float)"
        for name, dtype in expected.items():
            if name not in inputs or inputs[name].type != dtype:
                raise ModelContractError(f"{source}: needs input {name!r} of type {dtype}")
        if set(inputs) != set(expected):
            raise ModelContractError(
                f"{source}: unexpected inputs {sorted(set(inputs) - set(expected))}"
            )
        outputs = {o.name: o for o in self._session.get_outputs()}
        if "probs" not in outputs or outputs["probs"].type != "tensor(float)":
            raise ModelContractError(f"{source}: needs a float output named 'probs'")

    @classmethod
    def from_file(cls, path: Path, version: str | None = None, threads: int = 1) -> Classifier:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelContractError(f"{path}: cannot read: {exc.strerror}") from None
        return cls(data, version or path.stem, str(path), threads)

    def predict(
        self, ids: np.ndarray, embedding: np.ndarray | None = None
    ) -> tuple[np.ndarray, str]:
        """Probabilities ``[batch, labels]`` for padded ids ``[batch, length]``."""
        if self.native_head is not None:
            return self.native_head.probs(ids), self.version
        feeds = {"ids": ids}
        if self.uses_encoder:
            feeds["embedding"] = embedding
        return self._session.run(self._output, feeds)[0], self.version


def read_card(path: Path) -> ModelCard:
    """The metadata of a model file, without building an inference session."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise ModelContractError(f"{path}: not an ONNX model: {exc}") from None
    return ModelCard.from_metadata({p.key: p.value for p in model.metadata_props}, str(path))
