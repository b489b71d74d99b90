"""A deterministic in-process backend, for demos and tests only."""

from __future__ import annotations

from collections.abc import AsyncIterator

from router.backends.common import output_limit
from router.backends.types import (
    Finished,
    GenerationEvent,
    GenerationRequest,
    TokenDelta,
    Usage,
)
from router.config import BackendConfig

_SHOWN_CHARS = 200


class LocalBackend:
    """A stand-in for a model, for demos and tests: it runs no model and calls nothing.

    It streams, word by word, a reply that shows which backend and route served the call and the
    prompt it was given, e.g. ``[local:NAME] route=R I was given 1 messages; the last says:
    ...``. The answer is a pure function of the request; usage counts are whitespace-separated
    words of the prompt and of the reply, and the reply stops at ``max_tokens`` words (finish
    reason ``length``).
    """

    def __init__(self, name: str, config: BackendConfig | None = None):
        self.name = name
        self.config = config or BackendConfig.model_validate({"kind": "local"})

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        last = request.messages[-1].content if request.messages else ""
        shown = last[:_SHOWN_CHARS] + ("..." if len(last) > _SHOWN_CHARS else "")
        route = request.metadata.get("route", "-")
        reply = (
            f"[local:{self.name}] route={route} I was given {len(request.messages)} messages; "
            f"the last says: {shown}"
        )
        words = reply.split()
        sent = words[: output_limit(request.max_tokens, self.config.max_output_tokens)]
        for i, word in enumerate(sent):
            yield TokenDelta(word if i == 0 else " " + word)
        prompt_tokens = sum(len(m.content.split()) for m in request.messages)
        reason = "length" if len(sent) < len(words) else "stop"
        yield Finished(reason, Usage(prompt_tokens, len(sent)))

    async def aclose(self) -> None:
        return None
