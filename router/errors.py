"""Domain errors. Each names the status a caller should see; the server maps them to gRPC."""

from __future__ import annotations


class PlexusError(Exception):
    """Base class: ``status`` is the gRPC status name the error maps to."""

    status = "INTERNAL"


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
