"""Stitching: the route's sources gathered, assembled into a cited prompt, and packaged.

``TenantStitcher.stitch`` is the synchronous core; ``Stitcher.stitch`` (async, used in process
and by the gRPC servicer) encodes the question through the micro-batcher and runs the core in
the bounded executor.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

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
from router.context.batching import BatchingEncoder
from router.context.packets import ContextPacket, ContextPiece, PacketSigner
from router.context.sql import SqlMirror, bind_parameters, render_rows
from router.errors import FailedPrecondition, InvalidArgument
from router.routing.encoder import SERVING_ENCODER_NAME
from router.routing.service import Caller, RouteDecision, RouteQuery, Router

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
        collection: Callable[[str], object],
        mirrors: dict[str, SqlMirror],
        assembler: Assembler,
        signer: PacketSigner,
    ):
        self.name = name
        self.config = config
        self.collection = collection  # name -> Collection (NotFound if absent)
        self.mirrors = mirrors
        self.assembler = assembler
        self.signer = signer
        self.plans: dict[str, ContextConfig] = {
            route.name: route.context for route in config.routes if route.context is not None
        }

    def needs_embedding(self, route: str) -> bool:
        plan = self.plans.get(route)
        return plan is not None and any(isinstance(s, CollectionSourceConfig) for s in plan.sources)

    def stitch(
        self,
        query: RouteQuery,
        decision: RouteDecision,
        *,
        embedding: np.ndarray | None,
        packets: Sequence[ContextPacket] = (),
        budget_tokens: int | None = None,
        timings_us: dict[str, int] | None = None,
    ) -> StitchResult:
        timings = dict(timings_us or {})
        verified = [self.signer.verify(packet, self.name) for packet in packets]
        plan = self.plans.get(decision.route, NO_CONTEXT)
        pieces = self._gather(plan, query, decision.route, embedding, verified, timings)
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
            query.text,
            pieces,
            template=plan.template,
            budget_tokens=budget,
            diversity=plan.diversity,
        )
        timings["assemble"] = (time.perf_counter_ns() - started) // 1000
        packet = self.signer.sign(
            ContextPacket(
                tenant=self.name,
                app=query.app,
                route=decision.route,
                question=query.text,
                pieces=tuple(p.piece for p in assembly.placed),
                created_unix=time.time(),
            )
        )
        return StitchResult(decision, assembly, timings, packet)

    def _gather(
        self,
        plan: ContextConfig,
        query: RouteQuery,
        route: str,
        embedding: np.ndarray | None,
        packets: Sequence[ContextPacket],
        timings: dict[str, int],
    ) -> list[ContextPiece]:
        pieces: list[ContextPiece] = []
        takes_packets = False
        for source in plan.sources:
            started = time.perf_counter_ns()
            if isinstance(source, CollectionSourceConfig):
                label = f"collection:{source.collection}"
                if embedding is None:
                    raise RuntimeError("a collection source needs the question's embedding")
                collection = self.collection(source.collection)
                if collection.encoder and collection.encoder != SERVING_ENCODER_NAME:
                    raise FailedPrecondition(
                        f"collection {source.collection!r} was embedded with "
                        f"{collection.encoder!r}, not {SERVING_ENCODER_NAME!r}: re-ingest it"
                    )
                hits = collection.search_hits(
                    embedding.reshape(-1), source.k, source.min_score, source.tags
                )
                pieces += [
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
            elif isinstance(source, SqlSourceConfig):
                label = f"sql:{source.mirror}"
                params = bind_parameters(route, source.params, query.metadata)
                columns, rows = self.mirrors[source.mirror].query(
                    source.query, params, source.max_rows
                )
                title = f"{source.title}\n" if source.title else ""
                pieces.append(
                    ContextPiece(
                        text=title + render_rows(columns, rows),
                        kind="sql",
                        source=label,
                        position=0,
                        score=1.0,
                    )
                )
            elif isinstance(source, StaticSourceConfig):
                label = f"static:{source.source}"
                pieces.append(
                    ContextPiece(
                        text=source.text, kind="static", source=source.source, position=0, score=1.0
                    )
                )
            else:
                assert isinstance(source, PacketSourceConfig)
                label = "packets"
                takes_packets = True
                for packet in packets[: source.max_packets]:
                    pieces += [
                        ContextPiece(
                            text=p.text,
                            kind="packet",
                            source=f"{packet.app}>{p.source}",
                            position=p.position,
                            score=p.score,
                            tags=p.tags,
                            title=p.title,
                        )
                        for p in packet.pieces
                    ]
            timings[label] = timings.get(label, 0) + (time.perf_counter_ns() - started) // 1000
        if packets and not takes_packets:
            raise InvalidArgument(f"route {route!r} takes no context packets")
        return pieces


class Stitcher:
    """Every tenant's stitcher, and the ``stitch`` call (in process, and behind gRPC).

    Encoding goes through the micro-batching encoder; gathering and assembly (FAISS searches,
    SQL queries) run in the bounded executor, so the event loop only coordinates.
    """

    def __init__(
        self,
        loaded: LoadedConfig,
        router: Router,
        collections_of: Callable[[str], Callable[[str], object]],
        batcher: BatchingEncoder,
        executor: Executor,
        signer: PacketSigner | None = None,
    ):
        from router.routing.encoder import plain_tokenizer

        self.router = router
        self.batcher = batcher
        self.executor = executor
        self.signer = signer or PacketSigner()
        assembler = Assembler(plain_tokenizer())
        self.tenants: dict[str, TenantStitcher] = {}
        for name, tenant in loaded.config.tenants.items():
            mirrors = {m: SqlMirror(m, cfg, loaded) for m, cfg in tenant.sql_mirrors.items()}
            self.tenants[name] = TenantStitcher(
                name, tenant, collections_of(name), mirrors, assembler, self.signer
            )

    async def _encode(self, text: str, timings: dict[str, int]) -> np.ndarray:
        started = time.perf_counter_ns()
        embedding = await self.batcher.encode(text)
        timings["encode"] = (time.perf_counter_ns() - started) // 1000
        return embedding.reshape(1, -1)

    async def stitch(
        self,
        caller: Caller,
        query: RouteQuery,
        packets: Sequence[ContextPacket] = (),
        budget_tokens: int | None = None,
        timeout: float | None = None,
    ) -> StitchResult:
        """Route, encode once if the model or a collection needs it, gather, assemble."""
        tenant_router = self.router.tenant(caller)
        stitcher = self.tenants[caller.tenant]
        tenant_router.check_query(query, caller)
        timings: dict[str, int] = {}
        embedding = await self._encode(query.text, timings) if tenant_router.heavy else None
        decision = tenant_router.decide(query, caller, embedding)
        if embedding is None and stitcher.needs_embedding(decision.route):
            embedding = await self._encode(query.text, timings)
        work = asyncio.get_running_loop().run_in_executor(
            self.executor,
            functools.partial(
                stitcher.stitch,
                query,
                decision,
                embedding=embedding,
                packets=packets,
                budget_tokens=budget_tokens,
                timings_us=timings,
            ),
        )
        return await asyncio.wait_for(work, timeout)

    def close(self) -> None:
        for stitcher in self.tenants.values():
            for mirror in stitcher.mirrors.values():
                mirror.close()
