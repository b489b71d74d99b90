"""Protobuf <-> domain conversion: the only place protobuf types meet domain types."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from router._generated.plexus.v1 import plexus_pb2 as pb
from router.calls import RouteDecision, RouteQuery
from router.context.assembly import PlacedPiece
from router.context.collections import Collection
from router.context.packets import ContextPacket, ContextPiece
from router.context.stitch import StitchResult
from router.observe.drift import DriftReading, DriftView
from router.pipeline import (
    ContextEvent,
    DecisionEvent,
    DeltaEvent,
    FinalEvent,
    Finding,
    OrchestrateEvent,
)
from router.policy.limits import BudgetUse
from router.routing.decider import ModelInfo, ModelStatus


def query_from_proto(request: pb.RouteRequest) -> RouteQuery:
    return RouteQuery(
        app=request.app,
        text=request.text,
        metadata=dict(request.metadata),
        user_tier=request.user_tier,
        request_id=request.request_id,
    )


def decision_to_proto(decision: RouteDecision) -> pb.RouteDecision:
    message = pb.RouteDecision(
        route=decision.route,
        target=decision.target,
        confidence=decision.confidence,
        abstained=decision.abstained,
        fallback_used=decision.fallback_used,
        model_version=decision.model_version,
        server_micros=decision.server_us,
        request_id=decision.request_id,
        threshold=decision.threshold,
    )
    # Nested messages are made in place (``add``): building them apart and passing them in
    # copies each one, about 10 µs of a Route's 30 µs conversion.
    add = message.alternatives.add
    for a in decision.alternatives:
        add(route=a.route, target=a.target, confidence=a.confidence)
    _add_timings(message.timings, decision.timings_us)
    if decision.route_metadata:
        message.route_metadata.update(decision.route_metadata)
    # Filled only when there is something to say: an empty map still costs ~3 µs to build.
    if decision.extracted:
        message.extracted.update(decision.extracted)
    if decision.findings:
        message.findings.extend(findings_to_proto(decision.findings))
    if decision.rules_applied:
        message.rules_applied.extend(decision.rules_applied)
    if decision.priority != "normal":
        message.priority = decision.priority
    return message


def status_to_proto(status: ModelStatus) -> pb.ModelStatus:
    return pb.ModelStatus(
        active_version=status.active_version,
        previous_version=status.previous_version,
        heldout_accuracy=status.heldout_accuracy,
        previous_accuracy=status.previous_accuracy,
        message=status.message,
    )


def models_to_proto(infos: Sequence[ModelInfo]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(
        models=[
            pb.ModelInfo(
                version=i.version,
                family=i.family,
                created_at=i.created_at,
                training_data_sha256=i.training_data_sha256,
                metrics=i.metrics,
                active=i.active,
            )
            for i in infos
        ]
    )


def collection_status_to_proto(collection: Collection) -> pb.CollectionStatus:
    return pb.CollectionStatus(
        collection=collection.name,
        version=collection.version,
        size=collection.size,
        index_kind=collection.index_kind,
    )


def findings_to_proto(findings: Sequence[Finding]) -> list[pb.Finding]:
    return [
        pb.Finding(
            stage=f.stage,
            kind=f.kind,
            action=f.action,
            detail=f.detail,
            start=f.start,
            end=f.end,
            score=f.score,
        )
        for f in findings
    ]


def _add_timings(target: Any, timings_us: dict[str, int]) -> None:
    add = target.add
    for stage, micros in timings_us.items():
        add(stage=stage, micros=micros)


def piece_to_proto(piece: ContextPiece, placed: PlacedPiece | None = None) -> pb.ContextPiece:
    return pb.ContextPiece(
        text=piece.text,
        kind=piece.kind,
        source=piece.source,
        position=piece.position,
        score=piece.score,
        tags=list(piece.tags),
        title=piece.title,
        citation=piece.citation,
        number=placed.number if placed else 0,
        tokens=placed.tokens if placed else 0,
        truncated=placed.truncated if placed else False,
    )


def piece_from_proto(piece: pb.ContextPiece) -> ContextPiece:
    return ContextPiece(
        text=piece.text,
        kind=piece.kind,
        source=piece.source,
        position=piece.position,
        score=piece.score,
        tags=tuple(piece.tags),
        title=piece.title,
    )


def packet_to_proto(packet: ContextPacket) -> pb.ContextPacket:
    return pb.ContextPacket(
        tenant=packet.tenant,
        app=packet.app,
        route=packet.route,
        question=packet.question,
        pieces=[piece_to_proto(p) for p in packet.pieces],
        created_unix=packet.created_unix,
        signature=packet.signature,
    )


def packet_from_proto(packet: pb.ContextPacket) -> ContextPacket:
    return ContextPacket(
        tenant=packet.tenant,
        app=packet.app,
        route=packet.route,
        question=packet.question,
        pieces=tuple(piece_from_proto(p) for p in packet.pieces),
        created_unix=packet.created_unix,
        signature=packet.signature,
    )


def stitch_to_proto(result: StitchResult) -> pb.StitchResponse:
    assembly = result.assembly
    message = pb.StitchResponse(
        decision=decision_to_proto(result.decision),
        prompt=assembly.prompt,
        pieces=[piece_to_proto(p.piece, p) for p in assembly.placed],
        tokens_used=assembly.tokens_used,
        budget_tokens=assembly.budget_tokens,
        packet=packet_to_proto(result.packet),
        duplicates_dropped=assembly.duplicates_dropped,
        over_budget_dropped=assembly.over_budget_dropped,
    )
    _add_timings(message.timings, result.timings_us)
    return message


def orchestrate_event_to_proto(event: OrchestrateEvent) -> pb.OrchestrateEvent:
    if isinstance(event, DecisionEvent):
        return pb.OrchestrateEvent(decision=decision_to_proto(event.decision))
    if isinstance(event, ContextEvent):
        assembly = event.result.assembly
        return pb.OrchestrateEvent(
            context=pb.ContextSummary(
                pieces=[piece_to_proto(p.piece, p) for p in assembly.placed],
                tokens_used=assembly.tokens_used,
                budget_tokens=assembly.budget_tokens,
                packet=packet_to_proto(event.result.packet),
            )
        )
    if isinstance(event, DeltaEvent):
        return pb.OrchestrateEvent(delta=event.text)
    if isinstance(event, FinalEvent):
        message = pb.OrchestrateEvent()
        final = message.final
        final.usage.prompt_tokens = event.usage.prompt_tokens
        final.usage.completion_tokens = event.usage.completion_tokens
        final.cost = event.cost
        final.backend = event.backend
        final.fallbacks_tried.extend(event.fallbacks_tried)
        final.attempts = event.attempts
        final.finish_reason = event.finish_reason
        _add_timings(final.timings, event.timings_us)
        final.breakers.update(event.breakers)
        if event.findings:
            final.findings.extend(findings_to_proto(event.findings))
        final.rules_applied.extend(event.rules_applied)
        return message
    return pb.OrchestrateEvent(
        error=pb.ErrorEvent(code=event.code, message=event.message, backend=event.backend)
    )


def usage_to_proto(tenant: str, rows: Sequence[BudgetUse]) -> pb.GetUsageResponse:
    return pb.GetUsageResponse(
        tenant=tenant,
        budgets=[
            pb.BudgetUsage(
                budget=r.budget,
                per=r.per,
                scope=r.scope,
                unit=r.unit,
                period=r.period,
                window=r.window,
                used=r.used,
                reserved=r.reserved,
                limit=r.limit,
                remaining=r.remaining,
            )
            for r in rows
        ],
    )


def _drift_view_to_proto(view: DriftView) -> pb.DriftView:
    return pb.DriftView(
        requests=view.requests,
        statistics=[
            pb.DriftStatistic(
                name=s.name, value=s.value, threshold=s.threshold, alarm=s.alarm, detail=s.detail
            )
            for s in view.statistics
        ],
        alarm=view.alarm,
        note=view.note,
    )


def drift_to_proto(reading: DriftReading) -> pb.ModelDrift:
    message = pb.ModelDrift(
        model_version=reading.model_version,
        active=reading.active,
        requests=reading.requests,
        window=reading.window,
        windows=reading.windows,
        alarmed_windows=reading.alarmed_windows,
        alarms=reading.alarms,
        reference_rows=reading.reference_rows,
        reference=reading.reference,
        alarm=reading.alarm,
    )
    if reading.last_window is not None:
        message.last_window.CopyFrom(_drift_view_to_proto(reading.last_window))
    if reading.sliding is not None:
        message.sliding.CopyFrom(_drift_view_to_proto(reading.sliding))
    return message
