"""The Python SDK for a Plexus server: ``PlexusClient`` (blocking) and ``AsyncPlexusClient``.

Both speak every RPC of ``protos/plexus/v1/plexus.proto``: ``Router`` (Route, RouteBatch,
RouteStream, Stitch, Orchestrate) and ``Admin`` (ListModels, LoadModel, Rollback,
ReloadCollection, which need an admin key). Results are small frozen dataclasses named after the
protobuf messages and with their field names; every failed call raises one exception class,
``PlexusClientError``, whose ``code`` is the gRPC status name::

    from router.client import PlexusClient, PlexusClientError

    with PlexusClient("127.0.0.1:50051", "retail-demo-key") as client:
        decision = client.route("storefront", "is the red kettle in stock at store 1432?")
        print(decision.route, decision.confidence, decision.model_version)
        try:
            client.route("no-such-app", "hello")
        except PlexusClientError as exc:
            print(exc.code, exc.message)  # NOT_FOUND ...

TLS: ``tls=True`` uses the system's root certificates; ``root_certificates`` (PEM bytes or a
file path) trusts a private CA; ``certificate_chain`` and ``private_key`` present a client
certificate for mutual TLS; ``server_name`` overrides the name checked against the server's
certificate.

This module imports only grpcio, protobuf and the generated ``plexus.v1`` messages (never
numpy, onnxruntime, FAISS or scikit-learn), so a process that only calls a server stays small.
"""

from __future__ import annotations

import math
import struct
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from router._generated.plexus.v1 import plexus_pb2 as pb
from router._generated.plexus.v1 import plexus_pb2_grpc as pb_grpc

__all__ = [
    "Alternative",
    "AsyncPlexusClient",
    "BudgetUsage",
    "CollectionStatus",
    "ContextEvent",
    "ContextPacket",
    "Decision",
    "DecisionEvent",
    "DeltaEvent",
    "DriftStatistic",
    "DriftView",
    "ErrorEvent",
    "FinalEvent",
    "ModelDrift",
    "ModelInfo",
    "ModelStatus",
    "OrchestrateEvent",
    "Piece",
    "PlexusClient",
    "PlexusClientError",
    "Request",
    "Stitched",
    "Usage",
]

ContextPacket = pb.ContextPacket
"""A signed context packet (``Stitched.packet``): opaque, handed back as it came."""

DEFAULT_TIMEOUT = 10.0
ADMIN_TIMEOUT = 120.0
"""Loading a model or a collection builds and checks it before the answer: it gets longer."""


class PlexusClientError(Exception):
    """A failed call: ``code`` is the gRPC status name (``NOT_FOUND``, ``UNAVAILABLE``, ...),
    ``message`` the server's explanation, ``debug`` gRPC's own detail (for logs)."""

    def __init__(self, code: str, message: str, debug: str = ""):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.debug = debug

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> PlexusClientError:
        code = error.code() if hasattr(error, "code") else None
        name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
        message = (error.details() if hasattr(error, "details") else None) or ""
        debug = error.debug_error_string() if hasattr(error, "debug_error_string") else ""
        return cls(name, message, debug or "")


# --------------------------------------------------------------------------------------------
# results


def _f32(value: float) -> float:
    """A float32 field's value with the fewest digits that still name the same float32."""
    if not math.isfinite(value):
        return value
    for digits in range(6, 10):
        short = float(f"{value:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", short))[0] == value:
            return short
    return value


def _timings(timings: Iterable[pb.StageTiming]) -> dict[str, int]:
    return {t.stage: t.micros for t in timings}


@dataclass(frozen=True)
class Request:
    """One routing request, for ``route_batch`` and ``route_stream``."""

    app: str
    text: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    user_tier: str = ""
    request_id: str = ""

    def to_proto(self) -> pb.RouteRequest:
        return pb.RouteRequest(
            app=self.app,
            text=self.text,
            metadata=dict(self.metadata),
            user_tier=self.user_tier,
            request_id=self.request_id,
        )


@dataclass(frozen=True)
class Alternative:
    route: str
    target: str
    confidence: float


@dataclass(frozen=True)
class Decision:
    """A routing decision (``plexus.v1.RouteDecision``); ``timings`` maps stage -> µs."""

    route: str
    target: str
    confidence: float
    abstained: bool
    fallback_used: bool
    alternatives: tuple[Alternative, ...]
    model_version: str
    threshold: float
    route_metadata: Mapping[str, str]
    extracted: Mapping[str, str]
    timings: Mapping[str, int]
    server_micros: int
    request_id: str
    rules_applied: tuple[str, ...] = ()
    priority: str = "normal"

    @classmethod
    def from_proto(cls, message: pb.RouteDecision) -> Decision:
        return cls(
            route=message.route,
            target=message.target,
            confidence=_f32(message.confidence),
            abstained=message.abstained,
            fallback_used=message.fallback_used,
            alternatives=tuple(
                Alternative(a.route, a.target, _f32(a.confidence)) for a in message.alternatives
            ),
            model_version=message.model_version,
            threshold=_f32(message.threshold),
            route_metadata=dict(message.route_metadata),
            extracted=dict(message.extracted),
            timings=_timings(message.timings),
            server_micros=message.server_micros,
            request_id=message.request_id,
            rules_applied=tuple(message.rules_applied),
            priority=message.priority or "normal",
        )


@dataclass(frozen=True)
class Piece:
    """One piece of stitched context (``plexus.v1.ContextPiece``): ``number`` is its ``[n]``."""

    text: str
    kind: str
    source: str
    position: int
    score: float
    tags: tuple[str, ...]
    title: str
    citation: str
    number: int
    tokens: int
    truncated: bool

    @classmethod
    def from_proto(cls, message: pb.ContextPiece) -> Piece:
        return cls(
            text=message.text,
            kind=message.kind,
            source=message.source,
            position=message.position,
            score=_f32(message.score),
            tags=tuple(message.tags),
            title=message.title,
            citation=message.citation,
            number=message.number,
            tokens=message.tokens,
            truncated=message.truncated,
        )


@dataclass(frozen=True)
class Stitched:
    """A ``Stitch`` answer: the decision, the cited prompt, its pieces, and a packet to hand to
    another app of the tenant (``stitch(..., packets=[reply.packet])``)."""

    decision: Decision
    prompt: str
    pieces: tuple[Piece, ...]
    tokens_used: int
    budget_tokens: int
    timings: Mapping[str, int]
    packet: ContextPacket
    duplicates_dropped: int
    over_budget_dropped: int

    @classmethod
    def from_proto(cls, message: pb.StitchResponse) -> Stitched:
        return cls(
            decision=Decision.from_proto(message.decision),
            prompt=message.prompt,
            pieces=tuple(Piece.from_proto(p) for p in message.pieces),
            tokens_used=message.tokens_used,
            budget_tokens=message.budget_tokens,
            timings=_timings(message.timings),
            packet=message.packet,
            duplicates_dropped=message.duplicates_dropped,
            over_budget_dropped=message.over_budget_dropped,
        )


@dataclass(frozen=True)
class DecisionEvent:
    decision: Decision


@dataclass(frozen=True)
class ContextEvent:
    pieces: tuple[Piece, ...]
    tokens_used: int
    budget_tokens: int
    packet: ContextPacket


@dataclass(frozen=True)
class DeltaEvent:
    text: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class FinalEvent:
    """The end of a successful answer: usage, cost, the backend that answered, and timings."""

    usage: Usage
    cost: float
    backend: str
    fallbacks_tried: tuple[str, ...]
    attempts: int
    finish_reason: str
    timings: Mapping[str, int]
    breakers: Mapping[str, str]
    rules_applied: tuple[str, ...] = ()


@dataclass(frozen=True)
class ErrorEvent:
    """The end of a failed answer: ``code`` is INTERRUPTED, UNAVAILABLE, BLOCKED, ..."""

    code: str
    message: str
    backend: str


OrchestrateEvent = DecisionEvent | ContextEvent | DeltaEvent | FinalEvent | ErrorEvent
"""What ``orchestrate`` yields: a decision, the context, deltas, then a final or error event."""


def event_from_proto(message: pb.OrchestrateEvent) -> OrchestrateEvent:
    kind = message.WhichOneof("event")
    if kind == "decision":
        return DecisionEvent(Decision.from_proto(message.decision))
    if kind == "context":
        context = message.context
        return ContextEvent(
            tuple(Piece.from_proto(p) for p in context.pieces),
            context.tokens_used,
            context.budget_tokens,
            context.packet,
        )
    if kind == "delta":
        return DeltaEvent(message.delta)
    if kind == "final":
        final = message.final
        return FinalEvent(
            usage=Usage(final.usage.prompt_tokens, final.usage.completion_tokens),
            cost=final.cost,
            backend=final.backend,
            fallbacks_tried=tuple(final.fallbacks_tried),
            attempts=final.attempts,
            finish_reason=final.finish_reason,
            timings=_timings(final.timings),
            breakers=dict(final.breakers),
            rules_applied=tuple(final.rules_applied),
        )
    error = message.error
    return ErrorEvent(error.code, error.message, error.backend)


@dataclass(frozen=True)
class BudgetUsage:
    """One budget window (``plexus.v1.BudgetUsage``): tokens, or cost in the prices' currency."""

    budget: str
    per: str
    scope: str
    unit: str
    period: str
    window: str
    used: float
    reserved: float
    limit: float
    remaining: float

    @classmethod
    def from_proto(cls, message: pb.BudgetUsage) -> BudgetUsage:
        return cls(
            message.budget,
            message.per,
            message.scope,
            message.unit,
            message.period,
            message.window,
            message.used,
            message.reserved,
            message.limit,
            message.remaining,
        )


@dataclass(frozen=True)
class DriftStatistic:
    """One drift statistic (``plexus.v1.DriftStatistic``): ``labels``, ``confidence`` or
    ``abstention``, its value, the threshold it is held to, and whether it alarms."""

    name: str
    value: float
    threshold: float
    alarm: bool
    detail: str


@dataclass(frozen=True)
class DriftView:
    """Requests tested against the reference (``plexus.v1.DriftView``): a closed window or
    the sliding view; ``statistics`` is empty when nothing was tested (``note`` says why)."""

    requests: int
    statistics: tuple[DriftStatistic, ...]
    alarm: bool
    note: str

    @classmethod
    def from_proto(cls, message: pb.DriftView) -> DriftView:
        return cls(
            message.requests,
            tuple(
                DriftStatistic(s.name, s.value, s.threshold, s.alarm, s.detail)
                for s in message.statistics
            ),
            message.alarm,
            message.note,
        )


@dataclass(frozen=True)
class ModelDrift:
    """One model version's drift on the server (``plexus.v1.ModelDrift``); ``last_window`` is
    None before the first tested window, ``sliding`` None without a reference."""

    model_version: str
    active: bool
    requests: int
    window: int
    windows: int
    alarmed_windows: int
    alarms: Mapping[str, int]
    reference_rows: int
    reference: str
    last_window: DriftView | None
    sliding: DriftView | None
    alarm: bool

    @classmethod
    def from_proto(cls, message: pb.ModelDrift) -> ModelDrift:
        return cls(
            message.model_version,
            message.active,
            message.requests,
            message.window,
            message.windows,
            message.alarmed_windows,
            dict(message.alarms),
            message.reference_rows,
            message.reference,
            DriftView.from_proto(message.last_window) if message.HasField("last_window") else None,
            DriftView.from_proto(message.sliding) if message.HasField("sliding") else None,
            message.alarm,
        )


@dataclass(frozen=True)
class ModelInfo:
    version: str
    family: str
    created_at: str
    training_data_sha256: str
    metrics: Mapping[str, float]
    active: bool

    @classmethod
    def from_proto(cls, message: pb.ModelInfo) -> ModelInfo:
        return cls(
            message.version,
            message.family,
            message.created_at,
            message.training_data_sha256,
            dict(message.metrics),
            message.active,
        )


@dataclass(frozen=True)
class ModelStatus:
    """After a load or a rollback: the version now served and the one before it."""

    active_version: str
    previous_version: str
    heldout_accuracy: float
    previous_accuracy: float
    message: str

    @classmethod
    def from_proto(cls, message: pb.ModelStatus) -> ModelStatus:
        return cls(
            message.active_version,
            message.previous_version,
            message.heldout_accuracy,
            message.previous_accuracy,
            message.message,
        )


@dataclass(frozen=True)
class CollectionStatus:
    collection: str
    version: str
    size: int
    index_kind: str

    @classmethod
    def from_proto(cls, message: pb.CollectionStatus) -> CollectionStatus:
        return cls(message.collection, message.version, message.size, message.index_kind)


# --------------------------------------------------------------------------------------------
# requests and channels

PemSource = bytes | str | Path | None
"""PEM data as bytes, or the path of a PEM file."""


def _pem(value: PemSource, what: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    path = Path(value)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PlexusClientError(
            "INVALID_ARGUMENT", f"{what}: cannot read {path}: {exc.strerror}"
        ) from None


def channel_credentials(
    root_certificates: PemSource = None,
    certificate_chain: PemSource = None,
    private_key: PemSource = None,
) -> grpc.ChannelCredentials:
    """TLS credentials: the given roots (else the system's), and a client certificate and key
    for mutual TLS when both are given."""
    if (certificate_chain is None) != (private_key is None):
        raise PlexusClientError(
            "INVALID_ARGUMENT", "mutual TLS needs both certificate_chain and private_key"
        )
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(root_certificates, "root_certificates"),
        private_key=_pem(private_key, "private_key"),
        certificate_chain=_pem(certificate_chain, "certificate_chain"),
    )


def _channel_options(
    server_name: str | None, options: Sequence[tuple[str, Any]]
) -> list[tuple[str, Any]]:
    chosen = list(options)
    if server_name:
        chosen.append(("grpc.ssl_target_name_override", server_name))
    return chosen


def _uses_tls(tls: bool, *pems: PemSource) -> bool:
    return tls or any(p is not None for p in pems)


def _route_request(
    app: str, text: str, metadata: Mapping[str, str] | None, user_tier: str, request_id: str
) -> pb.RouteRequest:
    return Request(app, text, dict(metadata or {}), user_tier, request_id).to_proto()


def _stitch_request(
    app: str,
    text: str,
    metadata: Mapping[str, str] | None,
    packets: Iterable[ContextPacket],
    budget_tokens: int,
    user_tier: str,
    request_id: str,
) -> pb.StitchRequest:
    return pb.StitchRequest(
        request=_route_request(app, text, metadata, user_tier, request_id),
        packets=list(packets),
        budget_tokens=budget_tokens,
    )


def _orchestrate_request(
    app: str,
    text: str,
    metadata: Mapping[str, str] | None,
    packets: Iterable[ContextPacket],
    max_tokens: int,
    user_tier: str,
    request_id: str,
) -> pb.OrchestrateRequest:
    return pb.OrchestrateRequest(
        request=_route_request(app, text, metadata, user_tier, request_id),
        packets=list(packets),
        max_tokens=max_tokens,
    )


class _Base:
    def __init__(self, api_key: str, timeout: float):
        if not api_key:
            raise PlexusClientError("UNAUTHENTICATED", "no API key given")
        self.metadata: tuple[tuple[str, str], ...] = (("x-api-key", api_key),)
        self.timeout = timeout

    def _timeout(self, timeout: float | None, floor: float = 0.0) -> float:
        return timeout if timeout is not None else max(self.timeout, floor)


# --------------------------------------------------------------------------------------------
# the blocking client


class PlexusClient(_Base):
    """A blocking client; thread-safe (one channel, shared by every call). Use it as a context
    manager or call ``close()``."""

    def __init__(
        self,
        address: str,
        api_key: str,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        tls: bool = False,
        root_certificates: PemSource = None,
        certificate_chain: PemSource = None,
        private_key: PemSource = None,
        server_name: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ):
        super().__init__(api_key, timeout)
        self.address = address
        chosen = _channel_options(server_name, options)
        if _uses_tls(tls, root_certificates, certificate_chain, private_key):
            credentials = channel_credentials(root_certificates, certificate_chain, private_key)
            self.channel = grpc.secure_channel(address, credentials, options=chosen)
        else:
            self.channel = grpc.insecure_channel(address, options=chosen)
        self._router = pb_grpc.RouterStub(self.channel)
        self._admin = pb_grpc.AdminStub(self.channel)

    def _call(self, method: Any, request: Any, timeout: float) -> Any:
        try:
            return method(request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise PlexusClientError.from_rpc_error(exc) from None

    @staticmethod
    def _stream(call: Any) -> Iterator[Any]:
        try:
            yield from call
        except grpc.RpcError as exc:
            raise PlexusClientError.from_rpc_error(exc) from None
        finally:
            call.cancel()  # a caller that stops reading ends the call

    def route(
        self,
        app: str,
        text: str,
        metadata: Mapping[str, str] | None = None,
        user_tier: str = "",
        *,
        request_id: str = "",
        timeout: float | None = None,
    ) -> Decision:
        request = _route_request(app, text, metadata, user_tier, request_id)
        return Decision.from_proto(self._call(self._router.Route, request, self._timeout(timeout)))

    def route_batch(
        self, requests: Iterable[Request], *, timeout: float | None = None
    ) -> list[Decision]:
        """One decision per request, in order (at most the server's ``max_batch``)."""
        batch = pb.RouteBatchRequest(requests=[r.to_proto() for r in requests])
        reply = self._call(self._router.RouteBatch, batch, self._timeout(timeout))
        return [Decision.from_proto(d) for d in reply.decisions]

    def route_stream(
        self, requests: Iterable[Request], *, timeout: float | None = None
    ) -> Iterator[Decision]:
        """Decisions as the requests stream in (bidirectional ``RouteStream``)."""
        call = self._router.RouteStream(
            (r.to_proto() for r in requests),
            metadata=self.metadata,
            timeout=self._timeout(timeout),
        )
        for message in self._stream(call):
            yield Decision.from_proto(message)

    def stitch(
        self,
        app: str,
        text: str,
        metadata: Mapping[str, str] | None = None,
        packets: Iterable[ContextPacket] = (),
        budget_tokens: int = 0,
        *,
        user_tier: str = "",
        request_id: str = "",
        timeout: float | None = None,
    ) -> Stitched:
        request = _stitch_request(
            app, text, metadata, packets, budget_tokens, user_tier, request_id
        )
        return Stitched.from_proto(self._call(self._router.Stitch, request, self._timeout(timeout)))

    def orchestrate(
        self,
        app: str,
        text: str,
        metadata: Mapping[str, str] | None = None,
        packets: Iterable[ContextPacket] = (),
        max_tokens: int = 0,
        *,
        user_tier: str = "",
        request_id: str = "",
        timeout: float | None = None,
    ) -> Iterator[OrchestrateEvent]:
        """The event stream: a decision, the context, deltas, then a final (or error) event;
        ``timeout`` bounds the whole stream."""
        request = _orchestrate_request(
            app, text, metadata, packets, max_tokens, user_tier, request_id
        )
        call = self._router.Orchestrate(
            request, metadata=self.metadata, timeout=self._timeout(timeout)
        )
        for message in self._stream(call):
            yield event_from_proto(message)

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        reply = self._call(self._admin.ListModels, pb.ListModelsRequest(), self._timeout(timeout))
        return [ModelInfo.from_proto(m) for m in reply.models]

    def get_usage(self, user: str = "", *, timeout: float | None = None) -> list[BudgetUsage]:
        """The tenant's budgets in their current windows (and ``user``'s per-user ones)."""
        request = pb.GetUsageRequest(user=user)
        reply = self._call(self._admin.GetUsage, request, self._timeout(timeout))
        return [BudgetUsage.from_proto(b) for b in reply.budgets]

    def get_drift(self, *, timeout: float | None = None) -> list[ModelDrift]:
        """The tenant's model drift on this server: one entry per model version it has seen."""
        reply = self._call(self._admin.GetDrift, pb.GetDriftRequest(), self._timeout(timeout))
        return [ModelDrift.from_proto(m) for m in reply.models]

    def load_model(
        self, version: str = "", force: bool = False, *, timeout: float | None = None
    ) -> ModelStatus:
        """Load ``version`` (empty: the newest) and swap it in; ``force`` skips the held-out
        accuracy check."""
        request = pb.LoadModelRequest(version=version, force=force)
        reply = self._call(self._admin.LoadModel, request, self._timeout(timeout, ADMIN_TIMEOUT))
        return ModelStatus.from_proto(reply)

    def rollback(self, *, timeout: float | None = None) -> ModelStatus:
        reply = self._call(
            self._admin.Rollback, pb.RollbackRequest(), self._timeout(timeout, ADMIN_TIMEOUT)
        )
        return ModelStatus.from_proto(reply)

    def reload_collection(self, name: str, *, timeout: float | None = None) -> CollectionStatus:
        """Swap in the newest ingested version of the tenant's collection ``name``."""
        request = pb.ReloadCollectionRequest(collection=name)
        reply = self._call(
            self._admin.ReloadCollection, request, self._timeout(timeout, ADMIN_TIMEOUT)
        )
        return CollectionStatus.from_proto(reply)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> PlexusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# the asyncio client


class AsyncPlexusClient(_Base):
    """The asyncio client (``grpc.aio``): the same methods as ``PlexusClient``, as coroutines;
    ``route_stream`` and ``orchestrate`` are async iterators. Create it inside a running event
    loop; use ``async with`` or ``await close()``."""

    def __init__(
        self,
        address: str,
        api_key: str,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        tls: bool = False,
        root_certificates: PemSource = None,
        certificate_chain: PemSource = None,
        private_key: PemSource = None,
        server_name: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ):
        super().__init__(api_key, timeout)
        self.address = address
        chosen = _channel_options(server_name, options)
        if _uses_tls(tls, root_certificates, certificate_chain, private_key):
            credentials = channel_credentials(root_certificates, certificate_chain, private_key)
            self.channel = grpc.aio.secure_channel(address, credentials, options=chosen)
        else:
            self.channel = grpc.aio.insecure_channel(address, options=chosen)
        self._router = pb_grpc.RouterStub(self.channel)
        self._admin = pb_grpc.AdminStub(self.channel)

    async def _call(self, method: Any, request: Any, timeout: float) -> Any:
        try:
            return await method(request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise PlexusClientError.from_rpc_error(exc) from None

    @staticmethod
    async def _stream(call: Any) -> AsyncIterator[Any]:
        try:
            async for message in call:
                yield message
        except grpc.RpcError as exc:
            raise PlexusClientError.from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def route(
        self,
        app: str,
        text: str,
        metadata: Mapping[str, str] | None = None,
        user_tier: str = "",
        *,
        request_id: str = "",
        timeout: float | None = None,
    ) -> Decision:
        request = _route_request(app, text, metadata, user_tier, request_id)
        reply = await self._call(self._router.Route, request, self._timeout(timeout))
        return Decision.from_proto(reply)

    async def route_batch(
        self, requests: Iterable[Request], *, timeout: float | None = None
    ) -> list[Decision]:
        batch = pb.RouteBatchRequest(requests=[r.to_proto() for r in requests])
        reply = await self._call(self._router.RouteBatch, batch, self._timeout(timeout))
        return [Decision.from_proto(d) for d in reply.decisions]

    async def route_stream(
        self,
        requests: Iterable[Request] | AsyncIterable[Request],
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[Decision]:
        async def messages() -> AsyncIterator[pb.RouteRequest]:
            if isinstance(requests, AsyncIterable):
                async for r in requests:
                    yield r.to_proto()
            else:
                for r in requests:
                    yield r.to_proto()

        call = self._router.RouteStream(
            messages(), metadata=self.metadata, timeout=self._timeout(timeout)
        )
        async for message in self._stream(call):
            yield Decision.from_proto(message)

    async def stitch(
        self,
        app: str,
        text: str,
        metadata: Mapping[str, str] | None = None,
        packets: Iterable[ContextPacket] = (),
        budget_tokens: int = 0,
        *,
        user_tier: str = "",
        request_id: str = "",
        timeout: float | None = None,
    ) -> Stitched:
        request = _stitch_request(
            app, text, metadata, packets, budget_tokens, user_tier, request_id
        )
        reply = await self._call(self._router.Stitch, request, self._timeout(timeout))
        return Stitched.from_proto(reply)

    async def orchestrate(
        self,
        app: str,
        text: str,
        metadata: Mapping[str, str] | None = None,
        packets: Iterable[ContextPacket] = (),
        max_tokens: int = 0,
        *,
        user_tier: str = "",
        request_id: str = "",
        timeout: float | None = None,
    ) -> AsyncIterator[OrchestrateEvent]:
        request = _orchestrate_request(
            app, text, metadata, packets, max_tokens, user_tier, request_id
        )
        call = self._router.Orchestrate(
            request, metadata=self.metadata, timeout=self._timeout(timeout)
        )
        async for message in self._stream(call):
            yield event_from_proto(message)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        reply = await self._call(
            self._admin.ListModels, pb.ListModelsRequest(), self._timeout(timeout)
        )
        return [ModelInfo.from_proto(m) for m in reply.models]

    async def get_usage(self, user: str = "", *, timeout: float | None = None) -> list[BudgetUsage]:
        request = pb.GetUsageRequest(user=user)
        reply = await self._call(self._admin.GetUsage, request, self._timeout(timeout))
        return [BudgetUsage.from_proto(b) for b in reply.budgets]

    async def get_drift(self, *, timeout: float | None = None) -> list[ModelDrift]:
        reply = await self._call(self._admin.GetDrift, pb.GetDriftRequest(), self._timeout(timeout))
        return [ModelDrift.from_proto(m) for m in reply.models]

    async def load_model(
        self, version: str = "", force: bool = False, *, timeout: float | None = None
    ) -> ModelStatus:
        request = pb.LoadModelRequest(version=version, force=force)
        reply = await self._call(
            self._admin.LoadModel, request, self._timeout(timeout, ADMIN_TIMEOUT)
        )
        return ModelStatus.from_proto(reply)

    async def rollback(self, *, timeout: float | None = None) -> ModelStatus:
        reply = await self._call(
            self._admin.Rollback, pb.RollbackRequest(), self._timeout(timeout, ADMIN_TIMEOUT)
        )
        return ModelStatus.from_proto(reply)

    async def reload_collection(
        self, name: str, *, timeout: float | None = None
    ) -> CollectionStatus:
        request = pb.ReloadCollectionRequest(collection=name)
        reply = await self._call(
            self._admin.ReloadCollection, request, self._timeout(timeout, ADMIN_TIMEOUT)
        )
        return CollectionStatus.from_proto(reply)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncPlexusClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
