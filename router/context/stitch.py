"""Stitching: the route's sources gathered, assembled into a cited prompt, and packaged.

``TenantStitcher.stitch`` is the synchronous core, handed a decision (it never routes); the
stitch stage (``router/stages/stitch.py``) encodes the question when a collection needs it and
runs the core in the bounded executor. ``ContextSources`` holds every tenant's stitcher.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from router.calls import RouteDecision
from router.config import (
    CollectionSourceConfig,
    ContextConfig,
    LoadedConfig,
    PacketSourceConfig,
    SqlSourceConfig,
    StaticSourceConfig,
    TenantConfig,
)
from router.context.assembly import Assembler, Assembly
from router.context.collections import Collection
from router.context.packets import ContextPacket, ContextPiece, PacketSigner
from router.context.sql import SqlMirror, bind_parameters, render_rows
from router.errors import FailedPrecondition, InvalidArgument
from router.routing.encoder import SERVING_ENCODER_NAME

NO_CONTEXT = ContextConfig.model_construct(
    sources=[], budget_tokens=32_768, diversity=1.0, template="{context}{question}"
)
"""The plan of a route without context: the prompt is the question alone."""


@dataclass(frozen=True)
class StitchResult:
    decision: RouteDecision
    assembly: Assembly
    timings_us: dict[str, int]
    packet: ContextPacket


class TenantStitcher:
    """One tenant's context sources: its collections, SQL mirrors and routes' context plans."""

    def __init__(
        self,
        name: str,
        config: TenantConfig,
        collection: Callable[[str], Collection],
        mirrors: dict[str, SqlMirror],
        assembler: Assembler,
        signer: PacketSigner,
    ):
        self.name = name
        self.config = config
        self.collection = collection  # NotFound for a collection never ingested
        self.mirrors = mirrors
        self.assembler = assembler
        self.signer = signer
        self.plans: dict[str, ContextConfig] = {
            route.name: route.context for route in config.routes if route.context is not None
        }

    def uses_encoder(self, route: str) -> bool:
        """Whether the route's context needs the question's embedding (a collection source)."""
        plan = self.plans.get(route)
        return plan is not None and any(isinstance(s, CollectionSourceConfig) for s in plan.sources)

    def blocks(self, route: str) -> bool:
        """Whether stitching the route's context waits on searches or SQL (then it runs in the
        executor; a route without such sources is assembled on the loop)."""
        plan = self.plans.get(route)
        return plan is not None and any(
            isinstance(s, CollectionSourceConfig | SqlSourceConfig) for s in plan.sources
        )

    def stitch(
        self,
        app: str,
        question: str,
        metadata: Mapping[str, str],
        decision: RouteDecision,
        *,
        embedding: np.ndarray | None,
        packets: Sequence[ContextPacket] = (),
        budget_tokens: int | None = None,
    ) -> StitchResult:
        """The route's context for ``question``; ``timings_us`` names each source's time."""
        timings: dict[str, int] = {}
        verified = [self.signer.verify(packet, self.name) for packet in packets]
        plan = self.plans.get(decision.route, NO_CONTEXT)
        pieces = self._gather(
            plan, question, metadata, decision.route, embedding, verified, timings
        )
        budget = plan.budget_tokens
        if budget_tokens:
            if budget_tokens > plan.budget_tokens:
                raise InvalidArgument(
                    f"budget_tokens {budget_tokens} exceeds route {decision.route!r}'s "
                    f"configured {plan.budget_tokens}"
                )
            budget = budget_tokens
        started = time.perf_counter_ns()
        assembly = self.assembler.assemble(
            question,
            pieces,
            template=plan.template,
            budget_tokens=budget,
            diversity=plan.diversity,
        )
        timings["stitch.assemble"] = (time.perf_counter_ns() - started) // 1000
        packet = self.signer.sign(
            ContextPacket(
                tenant=self.name,
                app=app,
                route=decision.route,
                question=question,
                pieces=tuple(p.piece for p in assembly.placed),
                created_unix=time.time(),
            )
        )
        return StitchResult(decision, assembly, timings, packet)

    def _gather(
        self,
        plan: ContextConfig,
        question: str,
        metadata: Mapping[str, str],
        route: str,
        embedding: np.ndarray | None,
        packets: Sequence[ContextPacket],
        timings: dict[str, int],
    ) -> list[ContextPiece]:
        if packets and not any(isinstance(s, PacketSourceConfig) for s in plan.sources):
            raise InvalidArgument(f"route {route!r} takes no context packets")
        request = _SourceRequest(route, question, metadata, embedding, packets)
        pieces: list[ContextPiece] = []
        for source in plan.sources:
            started = time.perf_counter_ns()
            label, read = _READERS[type(source)]
            pieces += read(self, source, request)
            key = f"stitch.{label(source)}"
            timings[key] = timings.get(key, 0) + (time.perf_counter_ns() - started) // 1000
        return pieces

    def _read_collection(
        self, source: CollectionSourceConfig, request: _SourceRequest
    ) -> list[ContextPiece]:
        if request.embedding is None:
            raise RuntimeError("a collection source needs the question's embedding")
        collection = self.collection(source.collection)
        if collection.encoder and collection.encoder != SERVING_ENCODER_NAME:
            raise FailedPrecondition(
                f"collection {source.collection!r} was embedded with "
                f"{collection.encoder!r}, not {SERVING_ENCODER_NAME!r}: re-ingest it"
            )
        hits = collection.search_hits(
            request.embedding.reshape(-1),
            source.k,
            source.min_score,
            source.tags,
            text=request.question,
        )
        return [
            ContextPiece(
                text=hit.chunk.text,
                kind="collection",
                source=f"{source.collection}:{hit.chunk.source}",
                position=hit.chunk.position,
                score=float(hit.score),
                tags=tuple(hit.chunk.tags),
                title=hit.chunk.title,
            )
            for hit in hits
        ]

    def _read_sql(self, source: SqlSourceConfig, request: _SourceRequest) -> list[ContextPiece]:
        params = bind_parameters(request.route, source.params, request.metadata)
        columns, rows = self.mirrors[source.mirror].query(source.query, params, source.max_rows)
        title = f"{source.title}\n" if source.title else ""
        text = title + render_rows(columns, rows)
        return [
            ContextPiece(text, kind="sql", source=f"sql:{source.mirror}", position=0, score=1.0)
        ]

    def _read_static(
        self, source: StaticSourceConfig, _request: _SourceRequest
    ) -> list[ContextPiece]:
        return [
            ContextPiece(source.text, kind="static", source=source.source, position=0, score=1.0)
        ]

    def _read_packets(
        self, source: PacketSourceConfig, request: _SourceRequest
    ) -> list[ContextPiece]:
        return [
            ContextPiece(
                text=p.text,
                kind="packet",
                source=f"{packet.app}>{p.source}",
                position=p.position,
                score=p.score,
                tags=p.tags,
                title=p.title,
            )
            for packet in request.packets[: source.max_packets]
            for p in packet.pieces
        ]


@dataclass(frozen=True)
class _SourceRequest:
    """What a source reader may use of the request."""

    route: str
    question: str  # the prepared text: what a hybrid collection search matches words with
    metadata: Mapping[str, str]
    embedding: np.ndarray | None
    packets: Sequence[ContextPacket]


_READERS: dict[type, tuple[Callable[[Any], str], Callable[..., list[ContextPiece]]]] = {
    CollectionSourceConfig: (
        lambda s: f"collection:{s.collection}",
        TenantStitcher._read_collection,
    ),
    SqlSourceConfig: (lambda s: f"sql:{s.mirror}", TenantStitcher._read_sql),
    StaticSourceConfig: (lambda s: f"static:{s.source}", TenantStitcher._read_static),
    PacketSourceConfig: (lambda _s: "packets", TenantStitcher._read_packets),
}
"""Per source kind: its timing label and its reader."""


class ContextSources:
    """Every tenant's stitcher: its collections, SQL mirrors, assembler and packet signer."""

    def __init__(
        self,
        loaded: LoadedConfig,
        collections_of: Callable[[str], Callable[[str], Collection]],
        signer: PacketSigner | None = None,
    ):
        from router.routing.encoder import plain_tokenizer

        self.signer = signer or PacketSigner()
        assembler = Assembler(plain_tokenizer())
        self.tenants: dict[str, TenantStitcher] = {}
        for name, tenant in loaded.config.tenants.items():
            mirrors = {m: SqlMirror(m, cfg, loaded) for m, cfg in tenant.sql_mirrors.items()}
            self.tenants[name] = TenantStitcher(
                name, tenant, collections_of(name), mirrors, assembler, self.signer
            )

    def uses_encoder(self) -> bool:
        """Whether any route of any tenant retrieves from a collection."""
        return any(
            stitcher.uses_encoder(route)
            for stitcher in self.tenants.values()
            for route in stitcher.plans
        )

    def close(self) -> None:
        for stitcher in self.tenants.values():
            for mirror in stitcher.mirrors.values():
                mirror.close()
