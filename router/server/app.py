"""Building, starting and draining the grpc.aio server."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faiss
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from router._generated.plexus.v1 import plexus_pb2 as pb
from router.backends.resilience import BackendPool
from router.config import LoadedConfig, ServerConfig
from router.context.batching import BatchingEncoder
from router.context.collections import TenantCollections
from router.context.stitch import Stitcher
from router.pipeline import Orchestrator
from router.routing.encoder import shared_encoder
from router.routing.service import Router
from router.server.servicers import AdminServicer, RouterServicer, generic_handlers

log = logging.getLogger("plexus.server")
SERVICE_NAMES = [service.full_name for service in pb.DESCRIPTOR.services_by_name.values()]


def server_options(config: ServerConfig) -> list[tuple[str, Any]]:
    """Channel options shared by the Plexus server and the benchmark's echo server."""
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


def new_server(
    config: ServerConfig, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
) -> grpc.aio.Server:
    return grpc.aio.server(
        interceptors=list(interceptors),
        options=server_options(config),
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )


class PlexusServer:
    """The Plexus gRPC server: Router and Admin services, health checking and reflection."""

    def __init__(
        self, loaded: LoadedConfig, router: Router | None = None, address: str | None = None
    ):
        self.loaded = loaded
        self.config = loaded.config.server
        self.router = router or Router(loaded)
        self.address = address or self.config.address
        # Searches are single queries on the executor's threads: FAISS's OpenMP pool would only
        # add hand-offs and oversubscribe the cores.
        faiss.omp_set_num_threads(1)
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="plexus-work")
        self.collections = {
            name: TenantCollections.from_config(loaded, name) for name in loaded.config.tenants
        }
        self.batcher = BatchingEncoder(lambda: shared_encoder(self.config.device), self.executor)
        self.stitcher = Stitcher(
            loaded,
            self.router,
            lambda tenant: self.collections[tenant].get,
            self.batcher,
            self.executor,
        )
        self.backend_pools = {
            name: BackendPool(tenant.backends) for name, tenant in loaded.config.tenants.items()
        }
        self.orchestrator = Orchestrator(
            self.stitcher,
            self.backend_pools,
            {name: tenant.backends for name, tenant in loaded.config.tenants.items()},
        )
        self.server = new_server(self.config)
        self.server.add_generic_rpc_handlers(
            generic_handlers(
                RouterServicer(self.router, self.stitcher, self.orchestrator, self.executor),
                AdminServicer(self.router, self.collections, self.executor),
            )
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self.port = 0

    def needs_encoder(self) -> bool:
        """Whether any tenant's model or context sources use the sentence encoder."""
        return any(t.heavy for t in self.router.tenants.values()) or any(
            stitcher.plans and any(stitcher.needs_embedding(r) for r in stitcher.plans)
            for stitcher in self.stitcher.tenants.values()
        )

    async def start(self) -> int:
        if self.needs_encoder():  # load and warm it now, not on the first request
            await self.batcher.encode("warm up")
        self.port = self.server.add_insecure_port(self.address)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.address}")
        await self.server.start()
        # Everything loaded so far (libraries, models) lives as long as the server: move it out
        # of the collector's sight so that full collections stay short on the request path.
        gc.collect()
        gc.freeze()
        for name in ["", *SERVICE_NAMES]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("plexus serving on port %d", self.port)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, let in-flight calls finish within the grace period, stop."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.grace_seconds if grace is None else grace)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.stitcher.close()
        for pool in self.backend_pools.values():
            await pool.aclose()
        self.stitcher.close()
        for pool in self.backend_pools.values():
            await pool.aclose()

    async def serve_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT, then drain and return."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("signal received: draining for up to %.1f s", self.config.grace_seconds)
        await self.stop()
