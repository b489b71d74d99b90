"""What a call is: who is calling, what they asked, and the routing decision it got.

These are the domain types every stage of the pipeline shares; protobuf never reaches them
(``router/server/convert.py`` is the only place the two meet).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Caller:
    """Who is calling, resolved from the API key: never from the request body."""

    tenant: str
    key_name: str
    admin: bool
    apps: frozenset[str] | None


@dataclass
class RouteQuery:
    app: str
    text: str
    metadata: dict[str, str] = field(default_factory=dict)
    user_tier: str = ""
    request_id: str = ""


@dataclass
class Alternative:
    route: str
    target: str
    confidence: float


@dataclass
class RouteDecision:
    route: str
    target: str
    confidence: float
    abstained: bool
    fallback_used: bool
    alternatives: list[Alternative]
    model_version: str
    threshold: float
    route_metadata: dict[str, str]
    request_id: str = ""
    extracted: dict[str, str] = field(default_factory=dict)
    """Fields the prep stage lifted out of the text (see ``router/stages/prep.py``)."""
    timings_us: dict[str, int] = field(default_factory=dict)
    """Per-stage server time of the request so far, filled by the pipeline."""
    findings: list[Any] = field(default_factory=list)
    """What the guards noticed (``router.pipeline.Finding``: types and spans, never values)."""
    rules_applied: list[str] = field(default_factory=list)
    """The policy rules that applied, in order."""
    priority: str = "normal"
    """The request's priority (``high``, ``normal``, ``low``), as policy set it."""

    @property
    def server_us(self) -> int:
        """The stages' total (finer ``stage.detail`` entries are already inside their stage)."""
        return sum(us for stage, us in self.timings_us.items() if "." not in stage)
