"""Names, places, organisations and street addresses: a small token tagger that Plexus trains.

``EntityTagger.tag(text)`` returns ``Span``s of kind ``PERSON``, ``LOCATION`` (cities,
countries, regions), ``ORGANIZATION`` and ``ADDRESS``. An ``ADDRESS`` is a street address
(number, street, flat or suite); a postal address that goes on to a postcode is one
``ADDRESS`` from the street to the postcode, or to the country written after it, while a town
named after a street without a postcode ("221 Baker Street, London") is a ``LOCATION`` of its
own. Titles (``Dr.``, ``Mrs``) are not part of a ``PERSON``. The model is trained by
``router.governance.ner_training`` on sentences it generates itself and ships as
``router/governance/models/entity-tagger.onnx``; nothing is downloaded at run time. Tagging
runs onnxruntime on one thread: about 0.35 ms per 100 tokens, 0.1 ms for a short sentence.

Contract (version 1), checked when a file is loaded:

* input ``ids`` int64 ``[tokens, features]``: one row per token of the text, the hashed
  feature ids described below, each in ``[0, 2**buckets_log2)``. The value ``2**buckets_log2``
  is padding (never produced by this runtime, accepted by the graph).
* output ``probs`` float32 ``[tokens, len(tags)]``: per-token probabilities over BIO tags.
  Plexus's own files compute ``softmax(sum(W[ids]) / sqrt(features) + b)`` per row (the
  routing models' linear head, rows read as tokens), any graph with this signature is served.
* ``metadata_props``: ``plexus.contract`` ("1"), ``plexus.kind`` ("entity_tagger"),
  ``plexus.tags`` (JSON list: ``"O"`` and ``"B-KIND"``/``"I-KIND"`` for each kind),
  ``plexus.tokenizer`` (the token pattern below, verbatim), ``plexus.features`` (JSON
  ``FeatureParams``), ``plexus.span_threshold``, ``plexus.neighbour_weight`` (decoding, below),
  ``plexus.metrics`` (JSON),
  ``plexus.training_data`` (what the model was trained on), ``plexus.training_data_sha256``,
  ``plexus.created_at``.

Tokens are the matches of ``TOKEN_PATTERN``: runs of word characters (an apostrophe inside a
word keeps it whole, ``O'Brien``, ``don't``, but a possessive ``'s`` is a token of its own) and
single other non-space characters. Feature ids, for ``FeatureParams`` ``p``:

1. Each token has atoms, one per name of ``p.atoms``: ``word`` (the token casefolded), ``shape``
   (each of its first 16 characters as ``X`` upper, ``x`` lower, ``d`` digit, ``a`` other
   letter, else itself, runs collapsed: ``John`` -> ``Xx``, ``221B`` -> ``dX``), ``case``
   (``title``, ``upper``, ``lower``, ``digit`` or ``other``), ``length`` (``min(len, 8)``),
   ``pN`` and ``sN`` (the casefolded word's first and last N characters, N in ``p.prefixes``
   and ``p.suffixes``), ``gap`` (the space before the token: ``""`` none, ``" "`` space,
   ``"\n"`` space with a line break, any of ``\n \r \v \f \x1c \x1d \x1e \x85 \u2028
   \u2029``). An atom's value is ``mmh3_32(utf8(value), seed=mmh3_32(utf8(name),
   p.seed))`` (unsigned; UTF-8 with lone surrogates passed through). Positions before the
   first token and after the last take the value ``<s>`` and ``</s>`` for every atom.
2. A template is a list of ``(offset, atom)`` parts; its salt is ``mmh3_32(utf8(name),
   p.seed)`` with ``name`` the parts joined as ``offset:atom`` by ``|``. For the token at ``i``,
   ``h = salt``, then for each part ``h = fmix32(h ^ atom_value(i + offset, atom))`` (fmix32:
   MurmurHash3's 32-bit finaliser), and the id is ``h & (2**p.buckets_log2 - 1)``. Rows list
   the templates of ``p.templates`` in order.

Decoding: a token's probability of a kind is ``P(B-kind) + P(I-kind)``. Each token takes the
kind (or none, ``O``) with the highest vote, a kind's vote being its probability plus
``plexus.neighbour_weight`` times its probability at the tokens just before and after (``O``
gets no such help), so that one doubtful token inside an address does not cut it in two.
Consecutive tokens of one kind form one span, split where ``P(B-kind) > P(I-kind)``, less the
tokens of ``EDGE_TOKENS`` (commas, brackets, quotes, dashes, a possessive ``'s``...) at either
end. A span runs from its first token's start to its last token's end (``str`` indices, end
exclusive), scores the mean of its tokens' probability of the kind, and is kept when the score
reaches ``plexus.span_threshold``.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mmh3
import numpy as np

from router.governance.types import Span
from router.routing.encoder import inference_session
from router.routing.model import ModelContractError

CONTRACT_VERSION = "1"
MODEL_KIND = "entity_tagger"
KINDS = ("PERSON", "LOCATION", "ORGANIZATION", "ADDRESS")
FEATURE_SCHEME = "plexus-token-hash-1"
DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "entity-tagger.onnx"

TOKEN_PATTERN_TEXT = r"['’][sS](?!\w)|\w+(?:['’](?![sS](?!\w))\w+)*|[^\w\s]"
TOKEN_PATTERN = re.compile(TOKEN_PATTERN_TEXT)

ATOMS = ("word", "shape", "case", "length")
"""The atoms of a token's own text; ``pN`` and ``sN`` follow, in the order of the parameters,
then ``gap``, the space before the token."""
GAP_CODES = ("", " ", "\n")
LINE_BREAKS = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
BEGIN, END = "<s>", "</s>"
EDGE_TOKENS = frozenset(",;:!?()[]{}<>\"'“”‘’«»/\\|-–—_*#@&+=~^`") | {"'s", "'S", "’s", "’S"}
"""Tokens that never begin or end a span (a full stop may end one: "Inc.", "Jr.")."""
SHAPE_CHARS = 16
CACHED_TOKEN_CHARS = 32
"""Atoms of tokens up to this long are cached (up to ``CACHE_ENTRIES`` distinct tokens)."""
CACHE_ENTRIES = 65536
ROWS_PER_RUN = 4096
"""Long texts are scored this many tokens per onnxruntime call (features see across)."""

REQUIRED_METADATA = (
    "plexus.contract",
    "plexus.kind",
    "plexus.tags",
    "plexus.tokenizer",
    "plexus.features",
    "plexus.span_threshold",
    "plexus.neighbour_weight",
    "plexus.metrics",
    "plexus.training_data",
    "plexus.training_data_sha256",
    "plexus.created_at",
)

Template = tuple[tuple[int, str], ...]

DEFAULT_TEMPLATES: tuple[Template, ...] = (
    ((0, "word"),),
    ((0, "shape"),),
    ((0, "case"),),
    ((0, "length"),),
    ((0, "p2"),),
    ((0, "p3"),),
    ((0, "s2"),),
    ((0, "s3"),),
    ((0, "s4"),),
    ((-1, "word"),),
    ((1, "word"),),
    ((-1, "shape"),),
    ((1, "shape"),),
    ((-1, "s3"),),
    ((1, "s3"),),
    ((-2, "word"),),
    ((2, "word"),),
    ((-2, "case"),),
    ((2, "case"),),
    ((0, "gap"),),
    ((1, "gap"),),
    ((0, "gap"), (0, "shape")),
    ((-1, "word"), (0, "case")),
    ((0, "case"), (1, "word")),
    ((-1, "case"), (0, "case"), (1, "case")),
    ((-2, "word"), (-1, "word")),
    ((1, "word"), (2, "word")),
)


class TaggerContractError(ModelContractError):
    """The file is not an entity tagger this runtime can run; the message says why."""


@dataclass(frozen=True)
class FeatureParams:
    """Everything that decides the feature ids; stored in every model file."""

    buckets_log2: int = 18
    seed: int = 0
    prefixes: tuple[int, ...] = (2, 3)
    suffixes: tuple[int, ...] = (2, 3, 4)
    templates: tuple[Template, ...] = DEFAULT_TEMPLATES
    scheme: str = FEATURE_SCHEME

    @property
    def buckets(self) -> int:
        return 1 << self.buckets_log2

    @property
    def atoms(self) -> tuple[str, ...]:
        return (
            *ATOMS,
            *(f"p{n}" for n in self.prefixes),
            *(f"s{n}" for n in self.suffixes),
            "gap",
        )

    @property
    def window(self) -> int:
        return max((abs(offset) for t in self.templates for offset, _ in t), default=0)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["templates"] = [[[offset, atom] for offset, atom in t] for t in self.templates]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureParams:
        """Parsed and checked: ``ValueError`` (or ``KeyError``, ``TypeError``) when not valid."""
        params = cls(
            buckets_log2=int(data["buckets_log2"]),
            seed=int(data["seed"]),
            prefixes=tuple(int(n) for n in data["prefixes"]),
            suffixes=tuple(int(n) for n in data["suffixes"]),
            templates=tuple(
                tuple((int(offset), str(atom)) for offset, atom in t) for t in data["templates"]
            ),
            scheme=str(data["scheme"]),
        )
        if params.scheme != FEATURE_SCHEME:
            raise ValueError(f"feature scheme {params.scheme!r}, this runtime: {FEATURE_SCHEME!r}")
        if not 8 <= params.buckets_log2 <= 26:
            raise ValueError(f"buckets_log2 {params.buckets_log2} is not in [8, 26]")
        if not 0 <= params.seed < 1 << 32:
            raise ValueError(f"seed {params.seed} is not an unsigned 32-bit value")
        if any(not 1 <= n <= 8 for n in (*params.prefixes, *params.suffixes)):
            raise ValueError("prefix and suffix lengths must be in [1, 8]")
        if not params.templates or any(not t for t in params.templates):
            raise ValueError("templates must be a non-empty list of non-empty part lists")
        known = set(params.atoms)
        for t in params.templates:
            for offset, atom in t:
                if atom not in known or not -8 <= offset <= 8:
                    raise ValueError(f"template part {[offset, atom]} is not supported")
        return params


def template_name(template: Template) -> str:
    return "|".join(f"{offset}:{atom}" for offset, atom in template)


def _utf8(text: str) -> bytes:
    # mmh3 must never see a ``str``: a lone surrogate in one crashes the interpreter.
    return text.encode("utf-8", "surrogatepass")


def _hash(text: str, seed: int) -> int:
    return mmh3.hash(_utf8(text), seed, signed=False)


def _fmix32(h: np.ndarray) -> None:
    """MurmurHash3's 32-bit finaliser, in place."""
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)


def token_shape(token: str) -> str:
    out: list[str] = []
    for char in token[:SHAPE_CHARS]:
        if char.isupper():
            code = "X"
        elif char.islower():
            code = "x"
        elif char.isdigit():
            code = "d"
        elif char.isalpha():
            code = "a"
        else:
            code = char
        if not out or out[-1] != code:
            out.append(code)
    return "".join(out)


def token_case(token: str) -> str:
    if token.isdigit():
        return "digit"
    if token.istitle():
        return "title"
    if token.isupper():
        return "upper"
    if token.islower():
        return "lower"
    return "other"


def tokenize(text: str) -> tuple[list[str], np.ndarray]:
    """The tokens of ``text`` and their ``[start, end)`` offsets, int64 ``[tokens, 2]``."""
    matches = list(TOKEN_PATTERN.finditer(text))
    offsets = np.array([m.span() for m in matches], dtype=np.int64).reshape(-1, 2)
    return [m.group() for m in matches], offsets


def token_gaps(text: str, offsets: np.ndarray) -> np.ndarray:
    """Per token, the index in ``GAP_CODES`` of the space before it (only space lies between
    tokens): 0 none, 1 space without a line break, 2 space with one."""
    previous_end = np.empty(len(offsets), dtype=np.int64)
    previous_end[:1] = 0
    previous_end[1:] = offsets[:-1, 1]
    gaps = (offsets[:, 0] > previous_end).astype(np.int64)
    breaks = [m.start() for m in LINE_BREAKS.finditer(text)]
    if breaks:
        at = np.array(breaks, dtype=np.int64)
        crossed = np.searchsorted(at, offsets[:, 0]) > np.searchsorted(at, previous_end)
        gaps[crossed] = 2
    return gaps


class TokenFeaturizer:
    """``ids(tokens) -> int64 [tokens, templates]``, the contract's feature ids."""

    def __init__(self, params: FeatureParams):
        self.params = params
        atoms = params.atoms
        self._atom_seeds = [_hash(name, params.seed) for name in atoms]
        self._prefixes = params.prefixes
        self._suffixes = params.suffixes
        self._cache: dict[str, tuple[int, ...]] = {}
        self._gap_values = np.array([_hash(c, self._atom_seeds[-1]) for c in GAP_CODES])
        self._lock = threading.Lock()
        window = params.window
        self._window = window
        self._begin = np.array([_hash(BEGIN, s) for s in self._atom_seeds], dtype=np.uint32)
        self._end = np.array([_hash(END, s) for s in self._atom_seeds], dtype=np.uint32)
        templates = params.templates
        index = {name: i for i, name in enumerate(atoms)}
        # templates are hashed in order of their number of parts (the first part of every one,
        # then the second of those with two or more, ...), columns put back in order at the end
        order = sorted(range(len(templates)), key=lambda k: len(templates[k]))
        self._unsort = None if order == sorted(order) else np.argsort(order)
        ordered = [templates[k] for k in order]
        self._salts = np.array(
            [_hash(template_name(t), params.seed) for t in ordered], dtype=np.uint32
        )
        # part j: the templates from self._part_from[j] on have one, at flat offset
        # (token + window + offset) * atoms + atom column in the padded atom matrix
        self._stride = len(atoms)
        self._part_from: list[int] = []
        self._part_base: list[np.ndarray] = []
        for j in range(len(ordered[-1])):
            first = next(k for k, t in enumerate(ordered) if len(t) > j)
            self._part_from.append(first)
            self._part_base.append(
                np.array(
                    [(window + t[j][0]) * self._stride + index[t[j][1]] for t in ordered[first:]],
                    dtype=np.int64,
                )
            )
        self._mask = np.uint32(params.buckets - 1)

    def atoms(self, token: str) -> tuple[int, ...]:
        """The atom values of one token (cached for short tokens)."""
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        word = token.casefold()
        values = [
            word,
            token_shape(token),
            token_case(token),
            str(min(len(token), 8)),
            *(word[:n] for n in self._prefixes),
            *(word[-n:] for n in self._suffixes),
        ]
        result = tuple(
            mmh3.hash(_utf8(v), s, signed=False)
            for v, s in zip(values, self._atom_seeds[:-1], strict=True)
        )
        if len(token) <= CACHED_TOKEN_CHARS:
            with self._lock:
                if len(self._cache) >= CACHE_ENTRIES:
                    self._cache.clear()
                self._cache[token] = result
        return result

    def ids(self, tokens: Sequence[str], gaps: np.ndarray) -> np.ndarray:
        """Feature ids of ``tokens`` with ``gaps`` (``token_gaps``) before them."""
        n = len(tokens)
        w = self._window
        padded = np.empty((n + 2 * w, len(self._atom_seeds)), dtype=np.uint32)
        padded[:w] = self._begin
        padded[n + w :] = self._end
        if n:
            padded[w : n + w, :-1] = [self.atoms(t) for t in tokens]
            padded[w : n + w, -1] = self._gap_values[gaps]
        flat = padded.ravel()
        rows = np.arange(0, n * self._stride, self._stride, dtype=np.int64)[:, None]
        h = np.take(flat, rows + self._part_base[0])
        h ^= self._salts
        _fmix32(h)
        for first, base in zip(self._part_from[1:], self._part_base[1:], strict=True):
            part = h[:, first:]
            part ^= np.take(flat, rows + base)
            _fmix32(part)
        h &= self._mask
        if self._unsort is not None:
            h = h[:, self._unsort]
        return h.astype(np.int64)


@dataclass
class TaggerCard:
    """What an entity tagger file says about itself."""

    tags: list[str]
    features: FeatureParams
    span_threshold: float
    neighbour_weight: float
    metrics: dict[str, float]
    training_data: str
    training_data_sha256: str
    created_at: str
    tokenizer: str = TOKEN_PATTERN_TEXT

    def to_metadata(self) -> dict[str, str]:
        return {
            "plexus.contract": CONTRACT_VERSION,
            "plexus.kind": MODEL_KIND,
            "plexus.tags": json.dumps(self.tags),
            "plexus.tokenizer": self.tokenizer,
            "plexus.features": json.dumps(self.features.to_dict()),
            "plexus.span_threshold": repr(float(self.span_threshold)),
            "plexus.neighbour_weight": repr(float(self.neighbour_weight)),
            "plexus.metrics": json.dumps(self.metrics, sort_keys=True),
            "plexus.training_data": self.training_data,
            "plexus.training_data_sha256": self.training_data_sha256,
            "plexus.created_at": self.created_at,
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str) -> TaggerCard:
        kind = meta.get("plexus.kind")
        if kind != MODEL_KIND:
            expected = f"expected {MODEL_KIND!r}"
            raise TaggerContractError(
                f"{source}: not an entity tagger (plexus.kind is {kind!r}, {expected})"
            )
        missing = [key for key in REQUIRED_METADATA if key not in meta]
        if missing:
            raise TaggerContractError(f"{source}: metadata_props lacks {missing}")
        if meta["plexus.contract"] != CONTRACT_VERSION:
            raise TaggerContractError(
                f"{source}: plexus.contract is {meta['plexus.contract']!r}, "
                f"this runtime reads {CONTRACT_VERSION!r}"
            )
        if meta["plexus.tokenizer"] != TOKEN_PATTERN_TEXT:
            raise TaggerContractError(f"{source}: trained with another tokenizer pattern")
        try:
            tags = json.loads(meta["plexus.tags"])
            features = FeatureParams.from_dict(json.loads(meta["plexus.features"]))
            threshold = float(meta["plexus.span_threshold"])
            neighbour_weight = float(meta["plexus.neighbour_weight"])
            metrics = {k: float(v) for k, v in json.loads(meta["plexus.metrics"]).items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TaggerContractError(f"{source}: malformed metadata: {exc}") from None
        expected = {"O"} | {f"{p}-{kind}" for kind in KINDS for p in "BI"}
        if (
            not isinstance(tags, list)
            or len(set(map(str, tags))) != len(tags)
            or set(map(str, tags)) - expected
            or "O" not in tags
            or any((f"B-{k}" in tags) != (f"I-{k}" in tags) for k in KINDS)
        ):
            raise TaggerContractError(
                f"{source}: plexus.tags must be 'O' and B-/I- pairs of {list(KINDS)}"
            )
        if not 0.0 <= threshold <= 1.0:
            raise TaggerContractError(f"{source}: plexus.span_threshold {threshold} not in [0, 1]")
        if not 0.0 <= neighbour_weight <= 1.0:
            raise TaggerContractError(
                f"{source}: plexus.neighbour_weight {neighbour_weight} not in [0, 1]"
            )
        return cls(
            tags=[str(t) for t in tags],
            features=features,
            span_threshold=threshold,
            neighbour_weight=neighbour_weight,
            metrics=metrics,
            training_data=meta["plexus.training_data"],
            training_data_sha256=meta["plexus.training_data_sha256"],
            created_at=meta["plexus.created_at"],
            tokenizer=meta["plexus.tokenizer"],
        )


class EntityTagger:
    """``tag(text) -> list[Span]`` over one loaded entity tagger (thread-safe)."""

    _default: EntityTagger | None = None
    _default_lock = threading.Lock()

    def __init__(self, model_bytes: bytes, source: str = "<memory>", threads: int = 1):
        self.source = source
        try:
            self._session = inference_session(model_bytes, threads)
        except Exception as exc:  # onnxruntime raises several unrelated exception types
            raise TaggerContractError(f"{source}: onnxruntime cannot load it: {exc}") from None
        meta = dict(self._session.get_modelmeta().custom_metadata_map)
        self.card = TaggerCard.from_metadata(meta, source)
        self._check_signature(source)
        self.featurizer = TokenFeaturizer(self.card.features)
        tags = self.card.tags
        self.kinds = [k for k in KINDS if f"B-{k}" in tags]
        # columns: O, then each kind; probs @ to_kind sums B- and I- of a kind
        self._to_kind = np.zeros((len(tags), len(self.kinds) + 1), dtype=np.float32)
        self._to_kind[tags.index("O"), 0] = 1.0
        for j, kind in enumerate(self.kinds, start=1):
            self._to_kind[tags.index(f"B-{kind}"), j] = 1.0
            self._to_kind[tags.index(f"I-{kind}"), j] = 1.0
        self._begin_col = np.array([0] + [tags.index(f"B-{k}") for k in self.kinds])
        self._inside_col = np.array([0] + [tags.index(f"I-{k}") for k in self.kinds])
        self.threshold = self.card.span_threshold
        self.neighbour_weight = self.card.neighbour_weight
        self._check_output(source)

    def _check_signature(self, source: str) -> None:
        inputs = {i.name: i.type for i in self._session.get_inputs()}
        if inputs != {"ids": "tensor(int64)"}:
            raise TaggerContractError(
                f"{source}: needs exactly one input 'ids' of type tensor(int64); has {inputs}"
            )
        outputs = {o.name: o.type for o in self._session.get_outputs()}
        if outputs.get("probs") != "tensor(float)":
            raise TaggerContractError(f"{source}: needs a float output named 'probs'")

    def _check_output(self, source: str) -> None:
        """One prediction on three tokens: one probability per tag and token."""
        ids = self.featurizer.ids(["Plexus", "checks", "."], np.array([0, 1, 0]))
        try:
            probs = self._probs(ids)
        except Exception as exc:  # onnxruntime raises several unrelated exception types
            raise TaggerContractError(f"{source}: a test prediction failed: {exc}") from None
        if probs.shape != (3, len(self.card.tags)) or not np.all(np.isfinite(probs)):
            raise TaggerContractError(
                f"{source}: 'probs' has shape {probs.shape}; expected (3, {len(self.card.tags)})"
            )

    @classmethod
    def from_file(cls, path: Path) -> EntityTagger:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise TaggerContractError(f"{path}: cannot read: {exc.strerror}") from None
        return cls(data, str(path))

    @classmethod
    def default(cls) -> EntityTagger:
        """The model shipped with Plexus, loaded once per process and shared."""
        with cls._default_lock:
            if cls._default is None:
                cls._default = cls.from_file(DEFAULT_MODEL)
            return cls._default

    def _probs(self, ids: np.ndarray) -> np.ndarray:
        if len(ids) <= ROWS_PER_RUN:
            return self._session.run(["probs"], {"ids": ids})[0]
        return np.concatenate(
            [
                self._session.run(["probs"], {"ids": ids[i : i + ROWS_PER_RUN]})[0]
                for i in range(0, len(ids), ROWS_PER_RUN)
            ]
        )

    def token_probs(self, text: str) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Tokens, their offsets ``[tokens, 2]`` and tag probabilities ``[tokens, tags]``."""
        tokens, offsets = tokenize(text)
        if not tokens:
            return tokens, offsets, np.zeros((0, len(self.card.tags)), dtype=np.float32)
        ids = self.featurizer.ids(tokens, token_gaps(text, offsets))
        return tokens, offsets, self._probs(ids)

    def tag(self, text: str) -> list[Span]:
        tokens, offsets = tokenize(text)
        if not tokens:
            return []
        probs = self._probs(self.featurizer.ids(tokens, token_gaps(text, offsets)))
        return self.decode(probs, offsets, tokens)

    def decode(self, probs: np.ndarray, offsets: np.ndarray, tokens: Sequence[str]) -> list[Span]:
        """Spans from per-token tag probabilities (the contract's decoding)."""
        kind_probs = probs @ self._to_kind
        votes = kind_probs
        if self.neighbour_weight and len(probs) > 1:
            votes = kind_probs.copy()
            votes[1:, 1:] += self.neighbour_weight * kind_probs[:-1, 1:]
            votes[:-1, 1:] += self.neighbour_weight * kind_probs[1:, 1:]
        best = votes.argmax(axis=1)
        hits = np.flatnonzero(best)
        if not len(hits):
            return []
        best_p = kind_probs[hits, best[hits]].tolist()
        splits = (
            probs[hits, self._begin_col[best[hits]]] > probs[hits, self._inside_col[best[hits]]]
        ).tolist()
        kinds = best[hits].tolist()
        positions = hits.tolist()
        bounds = offsets.tolist()
        spans: list[Span] = []
        first = 0  # index into positions of the open span's first token
        for n in range(1, len(positions) + 1):
            if (
                n < len(positions)
                and positions[n] == positions[n - 1] + 1
                and kinds[n] == kinds[first]
                and not splits[n]
            ):
                continue
            start, end = first, n
            first = n
            while start < end and tokens[positions[start]] in EDGE_TOKENS:
                start += 1
            while end > start and tokens[positions[end - 1]] in EDGE_TOKENS:
                end -= 1
            if start == end:
                continue
            score = sum(best_p[start:end]) / (end - start)
            if score >= self.threshold:
                spans.append(
                    Span(
                        self.kinds[kinds[start] - 1],
                        bounds[positions[start]][0],
                        bounds[positions[end - 1]][1],
                        round(score, 4),
                    )
                )
        return spans
