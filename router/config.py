"""The YAML configuration: schema, validation and loading.

Every error names the file, the key path and what was expected; nothing starts on an invalid
configuration. API keys are stored as SHA-256 hashes, never in clear.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class ConfigError(ValueError):
    """An invalid configuration file; the message names file, key path and expectation."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(_Strict):
    """TLS for the gRPC server; with ``client_ca``, mutual TLS (clients must present a
    certificate signed by it). Paths are relative to the configuration file."""

    cert: Path = Field(description="the server's certificate chain (PEM)")
    key: Path = Field(description="the server's private key (PEM)")
    client_ca: Path | None = Field(None, description="CA bundle (PEM) that signs client certs")


class StateConfig(_Strict):
    """Where limits, budgets and change notices live: in this process (one replica) or in Redis,
    shared by every replica of a deployment."""

    kind: Literal["memory", "redis"] = "memory"
    url: str = Field("", description="redis: redis://HOST:PORT/DB (rediss:// for TLS)")
    timeout_ms: float = Field(250.0, gt=0, le=60_000, description="per Redis operation")
    key_prefix: str = Field("plexus:", max_length=64, description="redis: prefix of every key")

    @model_validator(mode="after")
    def _url(self) -> StateConfig:
        if self.kind == "redis" and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("kind redis needs a url such as redis://127.0.0.1:6379/0")
        return self


class AuditConfig(_Strict):
    """A tenant's audit trail: one hash-chained record per request, durable before the answer.

    On by default: an audit that must be switched on is one that is missing when it is needed.
    """

    enabled: bool = True
    raw_text: bool = Field(
        False, description="also keep the prompt and answer text (as redacted), not only hashes"
    )
    checkpoint_records: int = Field(
        1000, ge=1, le=10_000_000, description="a signed checkpoint after this many records"
    )
    checkpoint_seconds: float = Field(
        60.0, gt=0, le=86_400, description="or this long after the first record it would cover"
    )
    segment_bytes: int = Field(
        64 * 1024 * 1024, ge=4096, description="a new segment file once one is this big"
    )


class TracingConfig(_Strict):
    """OpenTelemetry traces: a span per request and one per stage, exported over OTLP/gRPC.

    ``none`` (the default) exports nothing; a caller's ``traceparent`` is still passed on to
    the backends, so their logs share its trace id."""

    exporter: Literal["none", "otlp"] = "none"
    endpoint: str = Field(
        "",
        description="otlp: the collector's gRPC endpoint, e.g. http://127.0.0.1:4317 (empty: "
        "OTEL_EXPORTER_OTLP_ENDPOINT, else localhost:4317)",
    )
    sample_ratio: float = Field(
        0.1,
        ge=0,
        le=1,
        description="share of the traces started here that are kept (a caller's sampled flag "
        "decides for its own); every kept trace costs its OTLP encoding",
    )
    service_name: str = Field("plexus", min_length=1, max_length=128)


class ServerConfig(_Strict):
    address: str = "127.0.0.1:50051"
    max_text_chars: int = Field(2000, gt=0, le=1_000_000)
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_batch: int = Field(512, gt=0)
    max_concurrent_rpcs: int | None = Field(None, gt=0)
    grace_seconds: float = Field(5.0, ge=0)
    drain_delay_seconds: float = Field(
        1.0, ge=0, le=60, description="on a signal: keep serving this long as NOT_SERVING"
    )
    model_dir: Path = Path("models")
    data_dir: Path = Field(Path("data"), description="collections live here, per tenant")
    device: Literal["cpu", "cuda"] = "cpu"
    top_k: int = Field(3, ge=1, le=50)
    tls: TlsConfig | None = None
    state: StateConfig = StateConfig()
    http_address: str | None = Field(
        None, description="HOST:PORT of the OpenAI-compatible front door (off when unset)"
    )
    http_timeout_seconds: float = Field(
        120.0, gt=0, le=3600, description="an HTTP call's deadline (x-plexus-timeout may ask less)"
    )
    http_read_seconds: float = Field(10.0, gt=0, le=600, description="to send a request's body")
    metrics_address: str | None = Field(
        None, description="HOST:PORT of /metrics, /status and /healthz (off when unset)"
    )
    tracing: TracingConfig = TracingConfig()
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="plexus serve's log lines: auto is text on a terminal, else JSON"
    )
    audit_dir: Path = Field(Path("audit"), description="audit trails live here, per tenant")
    audit_key_env: str = Field(
        "", description="environment variable holding the Ed25519 checkpoint signing key"
    )
    audit_key_file: Path | None = Field(
        None, description="file holding the Ed25519 signing key (PEM or 32 raw bytes)"
    )

    @model_validator(mode="after")
    def _audit_key(self) -> ServerConfig:
        if self.audit_key_env and self.audit_key_file is not None:
            raise ValueError("give audit_key_env or audit_key_file, not both")
        if self.audit_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.audit_key_env):
            raise ValueError("audit_key_env: expected an environment variable name")
        return self

    @field_validator("address", "http_address", "metrics_address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None:
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:50051 (port 0 picks a free one)")
        return value


class ApiKeyConfig(_Strict):
    name: Name
    sha256: str = Field(description="hex SHA-256 of the key")
    admin: bool = False
    apps: list[Name] | None = None

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("expected 64 lowercase hex digits (sha256 of the key)")
        return value


class AppConfig(_Strict):
    description: str = ""
    routes: list[Name] | None = None


class HnswConfig(_Strict):
    m: int = Field(32, ge=4, le=256)
    ef_construction: int = Field(200, ge=8)
    ef_search: int = Field(96, ge=1)


class IvfConfig(_Strict):
    nlist: int | None = Field(None, ge=1, description="default: about 4 x sqrt(vectors)")
    nprobe: int = Field(16, ge=1)


class HybridConfig(_Strict):
    """How a collection mixes its vectors' cosine with BM25 over the chunks' words."""

    bm25_weight: float = Field(
        0.25, ge=0, le=1, description="the BM25 share of a hit's score; 0 searches vectors alone"
    )
    fusion: Literal["blend", "rrf"] = Field(
        "blend", description="blend: scaled scores mixed; rrf: reciprocal rank fusion"
    )
    candidates: int = Field(
        50, ge=1, le=1000, description="hits taken from each of the two searches before fusing"
    )


class CollectionConfig(_Strict):
    """One vector collection of a tenant: its index choice and how documents are chunked."""

    description: str = ""
    index: Literal["auto", "flat", "hnsw", "ivf"] = "auto"
    exact_max_vectors: int = Field(20_000, ge=0, description="auto: exact search up to this size")
    hnsw: HnswConfig = HnswConfig()
    ivf: IvfConfig = IvfConfig()
    hybrid: HybridConfig = HybridConfig()
    chunk_tokens: int = Field(200, ge=16, le=512)
    chunk_overlap: int = Field(40, ge=0)
    near_duplicate: float = Field(0.95, gt=0, le=1, description="cosine at which chunks merge")

    @model_validator(mode="after")
    def _overlap(self) -> CollectionConfig:
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError("chunk_overlap: must be smaller than chunk_tokens")
        return self


class SqlMirrorConfig(_Strict):
    """A read-only SQL mirror: a SQLite file, or any database a SQLAlchemy URL reaches."""

    url: str = Field(
        description="sqlite:///path.db (relative to the config file) or a SQLAlchemy URL"
    )
    timeout_seconds: float = Field(2.0, gt=0)


class CollectionSourceConfig(_Strict):
    kind: Literal["collection"] = "collection"
    collection: Name
    k: int = Field(4, ge=1, le=100)
    min_score: float = Field(0.0, ge=-1, le=1)
    tags: list[str] = Field(default_factory=list, description="chunks must carry all of these")


class SqlSourceConfig(_Strict):
    kind: Literal["sql"] = "sql"
    mirror: Name
    query: str = Field(description="a parameterised SELECT using :name placeholders")
    params: list[Name] = Field(default_factory=list, description="request metadata keys bound")
    max_rows: int = Field(20, ge=1, le=1000)
    title: str = ""


class StaticSourceConfig(_Strict):
    kind: Literal["static"] = "static"
    text: str = Field(min_length=1)
    source: str = "static"


class PacketSourceConfig(_Strict):
    kind: Literal["packets"] = "packets"
    max_packets: int = Field(4, ge=1, le=64)


SourceConfig = Annotated[
    CollectionSourceConfig | SqlSourceConfig | StaticSourceConfig | PacketSourceConfig,
    Field(discriminator="kind"),
]


class ContextConfig(_Strict):
    """Where a route's context comes from and how it is assembled."""

    sources: list[SourceConfig] = Field(min_length=1)
    budget_tokens: int = Field(512, ge=16, le=32_768)
    diversity: float = Field(0.9, gt=0, le=1, description="drop pieces this similar to a kept one")
    template: str = Field(
        "{context}\n\nQuestion: {question}",
        description="rendered with {context} (numbered pieces) and {question}",
    )


class RetryConfig(_Strict):
    attempts: int = Field(3, ge=1, le=10, description="tries in all, the first included")
    backoff_ms: float = Field(100.0, ge=0)
    max_backoff_ms: float = Field(2_000.0, ge=0)


class BreakerConfig(_Strict):
    failures: int = Field(5, ge=1, description="consecutive failures that open the breaker")
    reset_seconds: float = Field(30.0, gt=0, description="open this long, then probe half-open")


class PriceConfig(_Strict):
    input_per_1k: float = Field(0.0, ge=0)
    output_per_1k: float = Field(0.0, ge=0)


class BackendConfig(_Strict):
    """A generation backend: an OpenAI-compatible HTTP server, a gRPC Generator, or local."""

    kind: Literal["openai", "grpc", "local"]
    url: str = Field("", description="openai: base URL ending in /v1; grpc: HOST:PORT")
    model: str = ""
    api_key_env: str = Field("", description="environment variable holding the bearer key")
    timeout_seconds: float = Field(30.0, gt=0)
    max_concurrency: int = Field(16, ge=1)
    max_output_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.2, ge=0, le=2)
    retry: RetryConfig = RetryConfig()
    breaker: BreakerConfig = BreakerConfig()
    price: PriceConfig = PriceConfig()
    certifications: list[str] = Field(
        default_factory=list, description="e.g. pii: data this backend is certified to receive"
    )

    @model_validator(mode="after")
    def _url(self) -> BackendConfig:
        if self.kind == "openai" and not self.url.startswith(("http://", "https://")):
            raise ValueError("url: an openai backend needs an http(s) base URL, e.g. .../v1")
        if self.kind == "grpc" and ":" not in self.url:
            raise ValueError("url: a grpc backend needs HOST:PORT")
        return self


class RouteConfig(_Strict):
    name: Name
    description: str = ""
    target: Name
    fallbacks: list[Name] = Field(default_factory=list, description="backends tried in order")
    examples: list[str] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)
    context: ContextConfig | None = None


def compile_re2(pattern: str, where: str = "pattern") -> Any:
    """``pattern`` compiled by RE2 (linear-time matching); a ValueError naming ``where``."""
    import re2

    options = re2.Options()
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        detail = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
        raise ValueError(f"{where}: not a valid RE2 pattern: {detail}") from None


EXTRACTOR_KINDS = ("order_number", "store_id", "sku", "amount", "date", "email")


class ExtractorConfig(_Strict):
    """A field the prep stage lifts out of the request text into request metadata.

    Either a built-in ``kind`` or a ``pattern`` (RE2 syntax: matching time is linear in the
    text, whatever the pattern). The value is the pattern's first group if it has one, else the
    whole match.
    """

    name: Name = Field(description="the metadata key the value is stored under")
    kind: Literal["order_number", "store_id", "sku", "amount", "date", "email"] | None = None
    pattern: str | None = Field(None, min_length=1, max_length=1000)
    pad_digits: int = Field(0, ge=0, le=32, description="left-pad a numeric value with zeros")

    @model_validator(mode="after")
    def _one_source(self) -> ExtractorConfig:
        if (self.kind is None) == (self.pattern is None):
            raise ValueError(
                f"give exactly one of kind (one of {list(EXTRACTOR_KINDS)}) or pattern"
            )
        if self.pattern is not None and compile_re2(self.pattern).groups > 1:
            raise ValueError("pattern: use at most one capturing group (the value)")
        return self


class CalibrationConfig(_Strict):
    """How ``threshold: calibrated`` is chosen on the held-out examples.

    ``inscope_accuracy``: the best in-scope accuracy with out-of-scope recall at least
    ``min_oos_recall``; ``oos_recall``: the best out-of-scope recall within
    ``max_inscope_drop`` of the best in-scope accuracy; ``cost``: the lowest in-scope error
    rate plus ``oos_cost`` times the out-of-scope miss rate. Without out-of-scope examples held
    out: the highest threshold keeping ``keep_correct`` of the correct decisions.
    """

    target: Literal["inscope_accuracy", "oos_recall", "cost"] = "inscope_accuracy"
    min_oos_recall: float = Field(0.6, ge=0, le=1)
    max_inscope_drop: float = Field(0.03, ge=0, le=1)
    oos_cost: float = Field(1.0, gt=0, le=1000)
    keep_correct: float = Field(0.98, gt=0, le=1)


class ModelConfig(_Strict):
    family: Literal["fast", "accurate"] = "fast"
    version: str = "active"
    threshold: float | Literal["calibrated"] = "calibrated"
    fallback_route: Name
    swap_margin: float = Field(0.02, ge=0, le=1)
    seed: int = 0
    buckets_log2: int = Field(18, ge=8, le=24)
    heldout_fraction: float = Field(0.2, gt=0, lt=0.9)
    regularization: float | None = Field(
        None, gt=0, description="the head's inverse penalty C (default: the family's own)"
    )
    calibration: CalibrationConfig = CalibrationConfig()
    inscope_tolerance: float | None = Field(
        None, ge=0, le=1, description="older form of calibration: {target: oos_recall, ...}"
    )
    data: Path | None = None

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, value: float | str) -> float | str:
        if isinstance(value, float) and not 0.0 <= value <= 1.0:
            raise ValueError("expected a number in [0, 1] or 'calibrated'")
        return value

    @model_validator(mode="before")
    @classmethod
    def _older_tolerance(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("inscope_tolerance") is not None:
            if "calibration" in data:
                raise ValueError("give calibration or inscope_tolerance, not both")
            tolerance = data["inscope_tolerance"]
            data = {**data, "calibration": {"target": "oos_recall", "max_inscope_drop": tolerance}}
        return data


class DriftRatesConfig(_Strict):
    """Per drift statistic: the chance that a window of traffic like the held-out set exceeds
    its threshold (the threshold is computed from it at each window's sizes)."""

    labels: float = Field(0.001, gt=0, lt=0.5)
    confidence: float = Field(0.001, gt=0, lt=0.5)
    abstention: float = Field(0.001, gt=0, lt=0.5)


class DriftThresholdsConfig(_Strict):
    """Fixed thresholds that replace the computed ones (unset: computed from false_alarm)."""

    labels: float | None = Field(None, gt=0, le=1, description="Jensen-Shannon divergence, bits")
    confidence: float | None = Field(None, gt=0, le=1, description="Kolmogorov-Smirnov distance")
    abstention: float | None = Field(None, gt=0, le=1, description="abstention rate difference")


class DriftConfig(_Strict):
    """Drift detection: live decisions per model version against the model's held-out set
    (router/observe/drift.py, docs/operations.md "Drift")."""

    enabled: bool = True
    window: int = Field(500, ge=20, le=1_000_000, description="requests per tested window")
    min_requests: int = Field(
        100, ge=20, description="the sliding view (the last window requests) is tested from this"
    )
    oos_share: float | Literal["heldout"] = Field(
        0.0,
        description="the out-of-scope share of the reference: 0 (in-scope rows only) to 1, or "
        "heldout (the held-out set's own share)",
    )
    two_sample: bool | Literal["auto"] = Field(
        "auto",
        description="count the held-out set's own sampling error in every threshold too (wider "
        "thresholds: for new text from the held-out set's population, and small held-out sets); "
        "auto: when the held-out set has fewer than five windows' worth of rows",
    )
    false_alarm: DriftRatesConfig = DriftRatesConfig()
    thresholds: DriftThresholdsConfig = DriftThresholdsConfig()
    versions: int = Field(8, ge=1, le=64, description="model versions whose windows are kept")

    @field_validator("oos_share")
    @classmethod
    def _share(cls, value: float | str) -> float | str:
        if isinstance(value, float) and not 0.0 <= value <= 1.0:
            raise ValueError("expected a number in [0, 1] or 'heldout'")
        return value

    @model_validator(mode="after")
    def _sizes(self) -> DriftConfig:
        if self.min_requests > self.window:
            raise ValueError(f"min_requests {self.min_requests} exceeds window {self.window}")
        return self


PiiAction = Literal["redact", "mask", "allow", "block"]
OutputAction = Literal["block", "redact", "replace", "flag"]


class IdentifierConfig(_Strict):
    """A tenant's own identifier treated as PII (loyalty numbers, member ids)."""

    name: Annotated[str, Field(pattern=r"^[A-Z][A-Z0-9_]{0,31}$")]
    pattern: str = Field(min_length=1, max_length=1000, description="RE2; the whole match")
    action: PiiAction = "redact"

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        compile_re2(value)
        return value


class PiiConfig(_Strict):
    """What happens to each kind of PII before anything else sees the request."""

    default_action: PiiAction = "redact"
    actions: dict[str, PiiAction] = Field(
        default_factory=dict, description="per entity type, e.g. {CARD: redact, SSN: block}"
    )
    identifiers: list[IdentifierConfig] = Field(default_factory=list)
    learned: bool = Field(True, description="also tag names, places, organisations, addresses")
    min_score: float = Field(0.5, ge=0, le=1, description="learned spans below this are ignored")
    certifications: dict[str, str] = Field(
        default_factory=dict,
        description="entity type -> certification needed to receive it raw (default: pii)",
    )
    uncertified: Literal["skip", "refuse"] = Field(
        "skip", description="a backend lacking a needed certification: skip it, or refuse"
    )


class InjectionConfig(_Strict):
    action: Literal["block", "flag"] = "block"
    threshold: float | Literal["model"] = "model"
    model: Path | None = Field(None, description="a guard model file; default: the shipped one")

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, value: float | str) -> float | str:
        if isinstance(value, float) and not 0.0 <= value <= 1.0:
            raise ValueError("expected a number in [0, 1] or 'model'")
        return value


class AppRulesConfig(_Strict):
    refuse_abstained: bool = False
    message: str = "This assistant cannot help with that request."


class OutputRuleConfig(_Strict):
    """One check of the answer as it streams."""

    kind: Literal[
        "deny", "commitment", "grounding", "citations", "json_schema", "pii_leak", "max_length"
    ]
    action: OutputAction = "block"
    routes: list[Name] | None = Field(None, description="only these routes (default: all)")
    pattern: str | None = Field(None, description="deny: an RE2 pattern")
    what: Literal["amount", "percent"] | None = Field(None, description="commitment: what")
    max: float | None = Field(None, description="commitment: the highest value allowed")
    max_from_metadata: str | None = Field(
        None, description="commitment: a request metadata key holding the limit"
    )
    json_schema: dict[str, Any] | None = Field(None, description="json_schema: the schema")
    max_chars: int | None = Field(None, ge=1, description="max_length: the longest answer")

    @model_validator(mode="after")
    def _fields(self) -> OutputRuleConfig:
        needs = {
            "deny": ["pattern"],
            "commitment": ["what"],
            "json_schema": ["json_schema"],
            "max_length": ["max_chars"],
        }.get(self.kind, [])
        missing = [name for name in needs if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.kind} rule needs {missing}")
        if self.kind == "commitment" and self.max is None and self.max_from_metadata is None:
            raise ValueError("a commitment rule needs max or max_from_metadata")
        if self.pattern is not None:
            compile_re2(self.pattern)
        if self.json_schema is not None:
            import fastjsonschema

            try:
                fastjsonschema.compile(self.json_schema)
            except fastjsonschema.JsonSchemaDefinitionException as exc:
                raise ValueError(f"json_schema: not a valid JSON schema: {exc}") from None
        return self


class OutputConfig(_Strict):
    window: int | Literal["all"] = Field(
        64, description="characters held back from the caller while rules check them"
    )
    replacement: str = "I can't answer that here; a colleague will follow up with you."
    rules: list[OutputRuleConfig] = Field(default_factory=list)

    @field_validator("window")
    @classmethod
    def _window(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 0 <= value <= 1_000_000:
            raise ValueError("expected 0..1000000 characters or 'all'")
        return value


class GovernanceConfig(_Strict):
    """A tenant's rules before, in flight and after the model (reloadable while serving)."""

    pii: PiiConfig | None = None
    injection: InjectionConfig | None = None
    apps: dict[Name, AppRulesConfig] = Field(default_factory=dict)
    output: OutputConfig | None = None


class RuleWhenConfig(_Strict):
    """What a policy rule matches; every condition given must hold (an empty one matches all)."""

    apps: list[Name] = Field(default_factory=list, description="the caller's app is one of")
    keys: list[Name] = Field(default_factory=list, description="the API key's name is one of")
    routes: list[Name] = Field(default_factory=list, description="the decided route is one of")
    metadata: dict[str, list[str]] = Field(
        default_factory=dict,
        description="request metadata key -> allowed values ('*': any value, as long as it is set)",
    )
    min_confidence: float | None = Field(None, ge=0, le=1)
    max_confidence: float | None = Field(None, ge=0, le=1)
    abstained: bool | None = None
    findings: list[str] = Field(
        default_factory=list, description="a governance finding of one of these kinds was made"
    )


class RuleThenConfig(_Strict):
    """What a policy rule does when it matches."""

    chain: list[Name] | None = Field(
        None, min_length=1, description="the backends to try, in order, instead of the route's"
    )
    max_tokens: int | None = Field(None, ge=1, description="cap the answer's output tokens")
    context_budget_tokens: int | None = Field(None, ge=16, le=32_768)
    deny: str | None = Field(None, min_length=1, description="refuse, with this message")
    escalate_to: Name | None = Field(None, description="send the request to this route instead")
    priority: Literal["high", "normal", "low"] | None = None


class PolicyRuleConfig(_Strict):
    name: Name
    when: RuleWhenConfig = RuleWhenConfig()
    then: RuleThenConfig
    keep_going: bool = Field(
        False, alias="continue", description="after this rule applies, go on to the next ones"
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class RateConfig(_Strict):
    """``rate`` units per ``per_seconds``, ``burst`` at once above the steady rate."""

    rate: float = Field(gt=0)
    per_seconds: float = Field(60.0, gt=0, le=31 * 86400)
    burst: int | None = Field(None, ge=1, description="default: the rate, at least 1")

    @property
    def burst_units(self) -> int:
        return self.burst if self.burst is not None else max(1, int(self.rate))


class RateLimitConfig(_Strict):
    name: Name
    per: Literal["tenant", "key", "app", "user"]
    apps: list[Name] = Field(default_factory=list, description="only for these apps (default all)")
    requests: RateConfig | None = None
    tokens: RateConfig | None = Field(
        None, description="prompt plus max_tokens of generating calls, taken before the backend"
    )

    @model_validator(mode="after")
    def _some(self) -> RateLimitConfig:
        if self.requests is None and self.tokens is None:
            raise ValueError("a rate limit needs requests, tokens or both")
        return self


class BudgetConfig(_Strict):
    name: Name
    per: Literal["tenant", "app", "user"]
    period: Literal["day", "month"] = Field(description="UTC calendar day or month")
    apps: list[Name] = Field(default_factory=list, description="only for these apps (default all)")
    tokens: int | None = Field(None, ge=1)
    cost: float | None = Field(None, gt=0, description="in the currency of the backends' prices")

    @model_validator(mode="after")
    def _some(self) -> BudgetConfig:
        if self.tokens is None and self.cost is None:
            raise ValueError("a budget needs tokens, cost or both")
        return self


class PolicyConfig(_Strict):
    """A tenant's business rules, rate limits and budgets (see router/policy/)."""

    rules: list[PolicyRuleConfig] = Field(default_factory=list)
    rate_limits: list[RateLimitConfig] = Field(default_factory=list)
    budgets: list[BudgetConfig] = Field(default_factory=list)
    user_field: str = Field("user", description="the request metadata key that names the user")
    on_state_error: Literal["fail_open", "fail_closed"] | None = Field(
        None,
        description="when the limits' store cannot answer: admit (fail_open) or refuse with "
        "UNAVAILABLE (fail_closed); required with rate_limits or budgets",
    )

    @model_validator(mode="after")
    def _explicit(self) -> PolicyConfig:
        if (self.rate_limits or self.budgets) and self.on_state_error is None:
            raise ValueError(
                "on_state_error: choose fail_open or fail_closed for when the limits' store "
                "cannot answer"
            )
        for field_name in ("rules", "rate_limits", "budgets"):
            names = [item.name for item in getattr(self, field_name)]
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"{field_name}: duplicate names {duplicates}")
        return self


class TenantConfig(_Strict):
    api_keys: list[ApiKeyConfig] = Field(min_length=1)
    apps: dict[Name, AppConfig] = Field(min_length=1)
    routes: list[RouteConfig] = Field(min_length=2)
    model: ModelConfig
    collections: dict[Name, CollectionConfig] = Field(default_factory=dict)
    sql_mirrors: dict[Name, SqlMirrorConfig] = Field(default_factory=dict)
    backends: dict[Name, BackendConfig] = Field(default_factory=dict)
    extractors: list[ExtractorConfig] = Field(default_factory=list)
    governance: GovernanceConfig = GovernanceConfig()
    policy: PolicyConfig = PolicyConfig()
    audit: AuditConfig = AuditConfig()
    drift: DriftConfig = DriftConfig()

    @model_validator(mode="after")
    def _references(self) -> TenantConfig:
        names = [r.name for r in self.routes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"routes: duplicate route names {duplicates}")
        known = set(names)
        if self.model.fallback_route not in known:
            raise ValueError(
                f"model.fallback_route: {self.model.fallback_route!r} is not one of the routes "
                f"{sorted(known)}"
            )
        for app_name, app in self.apps.items():
            unknown = sorted(set(app.routes or ()) - known)
            if unknown:
                raise ValueError(f"apps.{app_name}.routes: unknown routes {unknown}")
        unknown_apps = sorted(set(self.governance.apps) - set(self.apps))
        if unknown_apps:
            raise ValueError(f"governance.apps: unknown apps {unknown_apps}")
        for j, rule in enumerate(self.governance.output.rules if self.governance.output else ()):
            unknown = sorted(set(rule.routes or ()) - known)
            if unknown:
                raise ValueError(f"governance.output.rules.{j}.routes: unknown routes {unknown}")
        self._policy_references(known)
        for i, key in enumerate(self.api_keys):
            unknown = sorted(set(key.apps or ()) - set(self.apps))
            if unknown:
                raise ValueError(f"api_keys.{i}.apps: unknown apps {unknown}")
        for i, route in enumerate(self.routes):
            if self.backends:
                unknown = [b for b in [route.target, *route.fallbacks] if b not in self.backends]
                if unknown:
                    raise ValueError(
                        f"routes.{i}: targets {unknown} are not backends of the tenant "
                        f"{sorted(self.backends)}"
                    )
            for j, source in enumerate(route.context.sources if route.context else ()):
                where = f"routes.{i}.context.sources.{j}"
                if isinstance(source, CollectionSourceConfig) and (
                    source.collection not in self.collections
                ):
                    raise ValueError(
                        f"{where}.collection: {source.collection!r} is not one of the tenant's "
                        f"collections {sorted(self.collections)}"
                    )
                if isinstance(source, SqlSourceConfig):
                    if source.mirror not in self.sql_mirrors:
                        raise ValueError(
                            f"{where}.mirror: {source.mirror!r} is not one of the tenant's "
                            f"sql_mirrors {sorted(self.sql_mirrors)}"
                        )
                    placeholders = set(re.findall(r"(?<!:):([A-Za-z_][A-Za-z0-9_]*)", source.query))
                    if placeholders != set(source.params):
                        raise ValueError(
                            f"{where}.params: {sorted(source.params)} must name exactly the "
                            f"query's placeholders {sorted(placeholders)}"
                        )
        return self

    def _policy_references(self, routes: set[str]) -> None:
        apps, keys = set(self.apps), {k.name for k in self.api_keys}
        for i, rule in enumerate(self.policy.rules):
            where = f"policy.rules.{i}"
            for field_name, names, known in (
                ("when.apps", rule.when.apps, apps),
                ("when.keys", rule.when.keys, keys),
                ("when.routes", rule.when.routes, routes),
                ("then.chain", rule.then.chain or (), set(self.backends)),
            ):
                unknown = sorted(set(names) - known)
                if unknown:
                    raise ValueError(
                        f"{where}.{field_name}: unknown {unknown}; known {sorted(known)}"
                    )
            if rule.then.escalate_to is not None and rule.then.escalate_to not in routes:
                raise ValueError(
                    f"{where}.then.escalate_to: {rule.then.escalate_to!r} is not one of the "
                    f"routes {sorted(routes)}"
                )
            if rule.then.chain and rule.then.escalate_to:
                raise ValueError(f"{where}.then: chain and escalate_to exclude each other")
        for field_name in ("rate_limits", "budgets"):
            for i, item in enumerate(getattr(self.policy, field_name)):
                unknown = sorted(set(item.apps) - apps)
                if unknown:
                    raise ValueError(f"policy.{field_name}.{i}.apps: unknown apps {unknown}")

    def route(self, name: str) -> RouteConfig:
        for route in self.routes:
            if route.name == name:
                return route
        raise KeyError(name)


class PlexusConfig(_Strict):
    server: ServerConfig = ServerConfig()
    tenants: dict[Name, TenantConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_keys(self) -> PlexusConfig:
        seen: dict[str, str] = {}
        for tenant_name, tenant in self.tenants.items():
            for key in tenant.api_keys:
                if key.sha256 in seen:
                    raise ValueError(
                        f"tenants.{tenant_name}.api_keys: the key {key.name!r} is also a key of "
                        f"tenant {seen[key.sha256]!r}; every key belongs to one tenant"
                    )
                seen[key.sha256] = tenant_name
        return self


class LoadedConfig:
    """A validated configuration plus where it came from (relative paths resolve against it)."""

    def __init__(self, config: PlexusConfig, path: Path):
        self.config = config
        self.path = path
        self.base_dir = path.parent

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    @property
    def model_dir(self) -> Path:
        return self.resolve(self.config.server.model_dir)

    @property
    def data_dir(self) -> Path:
        return self.resolve(self.config.server.data_dir)

    def tenant(self, name: str) -> TenantConfig:
        try:
            return self.config.tenants[name]
        except KeyError:
            raise ConfigError(
                f"{self.path}: tenants: no tenant {name!r} (have {sorted(self.config.tenants)})"
            ) from None


def hash_api_key(key: str) -> str:
    """The stored form of an API key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _format_error(path: Path, error: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    given = error.get("input")
    shown = (
        "" if isinstance(given, dict | list) or error["type"] == "missing" else f" (got {given!r})"
    )
    return f"{path}: {location}: {message}{shown}"


def parse_config(data: Any, path: Path) -> LoadedConfig:
    """Validate already-parsed YAML; ``path`` is used in messages and to resolve paths."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: (top level): expected a mapping, got {type(data).__name__}")
    try:
        config = PlexusConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_format_error(path, err) for err in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    return LoadedConfig(config, path.resolve())


def load_config(path: str | Path) -> LoadedConfig:
    """Read, parse and validate a YAML configuration file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, path)
