"""Domain errors. Each names the status a caller should see; the server maps them to gRPC."""

from __future__ import annotations


def shown(value: object, limit: int = 80) -> str:
    """A client-supplied value for an error message: repr'd and cut short.

    Names and texts come from callers and may be hostile (a 1 MB app name): an error never
    echoes more than ``limit`` characters of one.
    """
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


class PlexusError(Exception):
    """Base class: ``status`` is the gRPC status name the error maps to."""

    status = "INTERNAL"
    recorded = False
    """Whether the request it ended has been recorded (audit, metrics, logs): the pipeline
    sets it, so a front that refuses a call records only what the pipeline did not."""


class InvalidArgument(PlexusError):
    status = "INVALID_ARGUMENT"


class NotFound(PlexusError):
    status = "NOT_FOUND"


class PermissionDenied(PlexusError):
    status = "PERMISSION_DENIED"


class Unauthenticated(PlexusError):
    status = "UNAUTHENTICATED"


class FailedPrecondition(PlexusError):
    status = "FAILED_PRECONDITION"


class DeadlineExceeded(PlexusError):
    status = "DEADLINE_EXCEEDED"
