"""Protobuf <-> domain conversion: the only place protobuf types meet domain types."""

from __future__ import annotations

from router._generated.plexus.v1 import plexus_pb2 as pb
from router.routing.service import ModelStatus, RouteDecision, RouteQuery


def query_from_proto(request: pb.RouteRequest) -> RouteQuery:
    return RouteQuery(
        app=request.app,
        text=request.text,
        metadata=dict(request.metadata),
        user_tier=request.user_tier,
        request_id=request.request_id,
    )


def decision_to_proto(decision: RouteDecision) -> pb.RouteDecision:
    return pb.RouteDecision(
        route=decision.route,
        target=decision.target,
        confidence=decision.confidence,
        abstained=decision.abstained,
        fallback_used=decision.fallback_used,
        alternatives=[
            pb.Alternative(route=a.route, target=a.target, confidence=a.confidence)
            for a in decision.alternatives
        ],
        model_version=decision.model_version,
        timings=[pb.StageTiming(stage=k, micros=v) for k, v in decision.timings_us.items()],
        server_micros=decision.server_us,
        request_id=decision.request_id,
        route_metadata=decision.route_metadata,
        threshold=decision.threshold,
    )


def status_to_proto(status: ModelStatus) -> pb.ModelStatus:
    return pb.ModelStatus(
        active_version=status.active_version,
        previous_version=status.previous_version,
        heldout_accuracy=status.heldout_accuracy,
        previous_accuracy=status.previous_accuracy,
        message=status.message,
    )
