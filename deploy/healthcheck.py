"""The container's health check: exit 0 when the Plexus server at ADDRESS answers SERVING
through the standard gRPC health service, 1 otherwise (one line on stderr says why).

    python healthcheck.py [ADDRESS] [TIMEOUT_SECONDS]    # default 127.0.0.1:50051, 3 s

Kubernetes probes gRPC health by itself (``grpc:`` probes); container engines and compose use
this script. It speaks plaintext: a server with ``server.tls`` is probed by the platform.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, timeout: float) -> str | None:
    """None when ``address`` reports SERVING; otherwise what it reported instead."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as exc:
            return f"{exc.code().name} from {address}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return (
            f"{address} reports {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        )
    return None


def main(argv: list[str]) -> int:
    address = argv[1] if len(argv) > 1 else "127.0.0.1:50051"
    try:
        timeout = float(argv[2]) if len(argv) > 2 else 3.0
    except ValueError:
        print(f"unhealthy: timeout {argv[2]!r} is not a number of seconds", file=sys.stderr)
        return 1
    problem = check(address, timeout)
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
