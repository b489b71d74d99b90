"""Structured logs: one line per request, JSON for log collectors or text for a terminal.

:class:`RequestLog` is a recorder that logs each finished request at INFO on the
``plexus.requests`` logger: request id, trace id, tenant, app, RPC, route, outcome and server
time (never the text, never the key). When that logger is not enabled for INFO it costs one
level check. :func:`configure_logging` is what ``plexus serve`` calls: one handler on stderr
whose formatter ``server.log_format`` chooses (``auto``: text on a terminal, else JSON), at the
command's level (``plexus serve -v`` is INFO, and so writes the request lines).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any, Literal

from router.errors import shown

if TYPE_CHECKING:
    from router.pipeline import RequestState

REQUESTS_LOGGER = "plexus.requests"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LogFormat = Literal["auto", "json", "text"]

# The attributes every LogRecord has: anything else a call passed in ``extra`` is a field.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """A log record as one JSON object on one line: ``time`` (UTC, ISO 8601 with
    milliseconds), ``level``, ``logger``, ``message``, the fields passed in ``extra``, and
    ``error`` (the exception's type and message) when the record carries one."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC)
        line: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            line["error"] = f"{type(exc).__name__}: {exc}"
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str, separators=(",", ":"))


def wants_json(log_format: LogFormat, stream: IO[str]) -> bool:
    """Whether ``log_format`` means JSON on ``stream`` (``auto``: unless it is a terminal)."""
    if log_format == "auto":
        isatty = getattr(stream, "isatty", None)
        return not (callable(isatty) and isatty())
    return log_format == "json"


def configure_logging(
    log_format: LogFormat = "auto", level: int = logging.WARNING, stream: IO[str] | None = None
) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) in ``log_format``: the root logger gets
    this one handler at ``level`` (the request lines need INFO)."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        JsonFormatter() if wants_json(log_format, stream) else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def _safe(value: str, limit: int = 64) -> str:
    """A caller's value fit for one log line: as it is when short and printable, else repr'd
    and cut (no newline can forge a second line)."""
    return value if len(value) <= limit and value.isprintable() else shown(value, limit)


def request_fields(state: RequestState) -> dict[str, Any]:
    """What a request's log line says about it (no text, no key, no user id)."""
    decision = state.decision
    final = state.final
    fields: dict[str, Any] = {
        "request_id": _safe(state.query.request_id),
        "trace_id": state.trace.trace_id,
        "tenant": state.caller.tenant,
        "key_name": state.caller.key_name,
        "app": _safe(state.query.app),
        "rpc": state.rpc,
        "route": decision.route if decision is not None else "",
        "outcome": state.outcome,
        "server_us": sum(us for stage, us in state.timings_us.items() if "." not in stage),
    }
    if decision is not None:
        fields["model_version"] = decision.model_version
        fields["abstained"] = bool(decision.abstained)
    if final is not None:
        fields["backend"] = final.backend
        fields["attempts"] = final.attempts
        fields["completion_tokens"] = final.usage.completion_tokens
    if state.error is not None and state.outcome != "OK":
        fields["error"] = type(state.error).__name__
    return fields


class RequestLog:
    """The request-log recorder: one INFO line per finished request on ``plexus.requests``."""

    def __init__(self, logger: logging.Logger | None = None):
        self.log = logger or logging.getLogger(REQUESTS_LOGGER)

    async def record(self, state: RequestState) -> None:
        log = self.log
        if not log.isEnabledFor(logging.INFO):
            return
        try:
            fields = request_fields(state)
        except Exception:  # noqa: BLE001 - a log line must not fail the request
            log.exception("describing a request for the log failed")
            return
        log.info(
            "%s %s/%s -> %s %s %d us (request %s, trace %s)",
            fields["rpc"],
            fields["tenant"],
            fields["app"],
            fields["route"] or "-",
            fields["outcome"],
            fields["server_us"],
            fields["request_id"] or "-",
            fields["trace_id"],
            extra=fields,
        )
