"""Portable context packets: what one app gathered, handed to another app of the same tenant.

A packet carries its pieces (text, kind, source, position, score, citation, tags), the route
and question it was stitched for, and an HMAC-SHA256 signature over all of that plus the
tenant. A packet is accepted only by the tenant that produced it, unaltered and unexpired.
The key comes from ``PLEXUS_PACKET_KEY`` (so packets survive restarts and work across
replicas); without it each server process draws a random key at start.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
import time
from dataclasses import asdict, dataclass, field

from router.errors import InvalidArgument, PermissionDenied

PACKET_VERSION = 1


@dataclass(frozen=True)
class ContextPiece:
    text: str
    kind: str  # collection | sql | static | packet
    source: str  # e.g. "policies:returns.md", "sql:stores", "static"
    position: int
    score: float
    tags: tuple[str, ...] = ()
    title: str = ""

    @property
    def citation(self) -> str:
        if self.kind in ("static", "sql"):  # configured facts: no position, no similarity
            return self.source
        return f"{self.source} #{self.position}, score {self.score:.2f}"


@dataclass(frozen=True)
class ContextPacket:
    tenant: str
    app: str
    route: str
    question: str
    pieces: tuple[ContextPiece, ...]
    created_unix: float
    signature: str = field(default="", compare=False)

    def canonical(self) -> bytes:
        body = asdict(self)
        body.pop("signature")
        body["version"] = PACKET_VERSION
        return json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


CLOCK_SKEW_SECONDS = 60.0
"""How far in the future a packet's creation time may be (replicas' clocks differ a little)."""


class PacketSigner:
    def __init__(self, key: bytes | None = None, ttl_seconds: float = 3600.0):
        env = os.environ.get("PLEXUS_PACKET_KEY", "")
        self._key = key or (env.encode() if env else secrets.token_bytes(32))
        self.ttl_seconds = ttl_seconds

    def _mac(self, packet: ContextPacket) -> str:
        return hmac.new(self._key, packet.canonical(), hashlib.sha256).hexdigest()

    def sign(self, packet: ContextPacket) -> ContextPacket:
        return ContextPacket(**{**packet.__dict__, "signature": self._mac(packet)})

    def verify(self, packet: ContextPacket, tenant: str) -> ContextPacket:
        """The packet if it is intact, this tenant's and fresh; otherwise a clear error."""
        if not hmac.compare_digest(self._mac(packet), packet.signature):
            raise InvalidArgument("context packet signature does not match (altered or foreign)")
        if packet.tenant != tenant:
            raise PermissionDenied("context packet belongs to another tenant")
        age = time.time() - packet.created_unix
        if not math.isfinite(age) or age < -CLOCK_SKEW_SECONDS:
            raise InvalidArgument("context packet has an impossible creation time")
        if age > self.ttl_seconds:
            raise InvalidArgument("context packet has expired")
        return packet
