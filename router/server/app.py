"""Building, starting and draining the grpc.aio server."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from router._generated.plexus.v1 import plexus_pb2 as pb
from router.config import ConfigError, LoadedConfig, ServerConfig
from router.observe.status import start_observer
from router.plexus import Plexus
from router.server.changes import ChangeNotices
from router.server.http import start_http
from router.server.servicers import AdminServicer, RouterServicer, generic_handlers

log = logging.getLogger("plexus.server")
SERVICE_NAMES = [service.full_name for service in pb.DESCRIPTOR.services_by_name.values()]


def server_options(config: ServerConfig, reuse_port: bool = False) -> list[tuple[str, Any]]:
    """Channel options shared by the Plexus server and the benchmark's echo server.

    ``reuse_port``: the workers of one ``serve --workers`` share the port (SO_REUSEPORT); a
    lone server does not, so a second server on its port fails instead of splitting traffic."""
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", int(reuse_port)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


def new_server(config: ServerConfig, reuse_port: bool = False) -> grpc.aio.Server:
    return grpc.aio.server(
        options=server_options(config, reuse_port),
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )


def server_credentials(loaded: LoadedConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from ``server.tls`` (None: plaintext); unreadable files name their key."""
    tls = loaded.config.server.tls
    if tls is None:
        return None

    def read(key: str, path: Path) -> bytes:
        try:
            return loaded.resolve(path).read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"{loaded.path}: server.tls.{key}: cannot read {path}: {exc.strerror}"
            ) from None

    client_ca = read("client_ca", tls.client_ca) if tls.client_ca else None
    return grpc.ssl_server_credentials(
        [(read("key", tls.key), read("cert", tls.cert))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class PlexusServer:
    """The Plexus gRPC server: Router and Admin services, health checking and reflection."""

    def __init__(
        self,
        loaded: LoadedConfig,
        plexus: Plexus | None = None,
        address: str | None = None,
        *,
        http_address: str | None = None,
        reuse_port: bool = False,
    ):
        """``address`` / ``http_address`` override the configuration's; ``reuse_port``: one
        of the workers of ``serve --workers`` (they share the ports)."""
        self.loaded = loaded
        self.config = loaded.config.server
        self.plexus = plexus or Plexus(loaded)
        self.address = address or self.config.address
        self.http_address = http_address or self.config.http_address
        self.reuse_port = reuse_port
        self.server = new_server(self.config, reuse_port)
        executor = self.plexus.executor
        self.changes = ChangeNotices(
            self.plexus,
            lambda fn, *args: asyncio.get_running_loop().run_in_executor(executor, fn, *args),
        )
        self.server.add_generic_rpc_handlers(
            generic_handlers(
                RouterServicer(self.plexus),
                AdminServicer(self.plexus, executor, self.changes),
            )
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self.port = 0
        self.http_runner: web.AppRunner | None = None
        self.http_port = 0
        self.metrics_runner: web.AppRunner | None = None
        self.metrics_port = 0
        self.serving = False

    async def start(self) -> int:
        await self.plexus.warm()
        await self.changes.start()  # before serving: a swap made meanwhile is not missed
        credentials = server_credentials(self.loaded)
        if credentials is None:
            self.port = self.server.add_insecure_port(self.address)
        else:
            self.port = self.server.add_secure_port(self.address, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.address}")
        await self.server.start()
        if self.http_address is not None:
            self.http_runner, self.http_port = await start_http(
                self.plexus, self.http_address, self.config.grace_seconds, self.reuse_port
            )
            log.info("plexus OpenAI-compatible front door on port %d", self.http_port)
        if self.config.metrics_address is not None and self.plexus.metrics is not None:
            self.metrics_runner, self.metrics_port = await start_observer(
                self.plexus, self.config.metrics_address, lambda: self.serving, self.reuse_port
            )
            log.info("plexus /metrics and /status on port %d", self.metrics_port)
        # Everything loaded so far (libraries, models) lives as long as the server: move it out
        # of the collector's sight so that full collections stay short on the request path.
        gc.collect()
        gc.freeze()
        for name in ["", *SERVICE_NAMES]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.serving = True
        log.info("plexus serving on port %d", self.port)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, let in-flight calls finish within the grace period, stop."""
        self.serving = False
        await self.health.enter_graceful_shutdown()
        grace = self.config.grace_seconds if grace is None else grace
        runner, self.http_runner = self.http_runner, None
        # Both fronts stop taking calls and let those in flight finish, at the same time.
        await asyncio.gather(
            self.server.stop(grace), *([runner.cleanup()] if runner is not None else [])
        )
        await self.changes.aclose()
        metrics, self.metrics_runner = self.metrics_runner, None
        if metrics is not None:  # scrapes go on while the calls drain
            await metrics.cleanup()
        await self.plexus.aclose()

    async def serve_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT, then drain and return."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        # Health turns NOT_SERVING at once so balancers stop sending, but the server keeps
        # taking calls for drain_delay_seconds: grpc's stop() cancels calls that reached the
        # transport and were not handed to a handler yet, so stopping at once answered calls
        # sent a millisecond before the signal with CANCELLED.
        self.serving = False
        await self.health.enter_graceful_shutdown()
        delay = self.config.drain_delay_seconds
        log.info(
            "signal received: NOT_SERVING; draining in %.1f s, for up to %.1f s",
            delay,
            self.config.grace_seconds,
        )
        await asyncio.sleep(delay)
        await self.stop()
