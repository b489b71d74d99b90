"""A benchmark server child: ``python -m bench.harness.serve {plexus,echo} CONFIG``.

``plexus`` is the Plexus server as ``plexus serve`` builds it (``PlexusServer(loaded)``).
``plexus-variants`` is the same server whose recorders the benchmark chooses between rounds
(``bench.observe``: a line ``use VARIANT`` on stdin, answered ``USING VARIANT``), so that
variants that differ only in their recorders run in one process.
``echo`` is the same-run baseline for Route: a bare grpc.aio server built by the same
``new_server(config.server)`` (same options and limits), serving the same method path
``/plexus.v1.Router/Route``; it parses the ``RouteRequest`` bytes and answers a small fixed
``RouteDecision``, so it measures what gRPC and Python cost without any routing.

Both listen on 127.0.0.1:0, print ``PORT N`` and serve until SIGTERM/SIGINT or until stdin
reaches EOF (the benchmark closed the pipe or died).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from bench import api
from bench.harness.processes import stop_when_parent_exits

KINDS = ("plexus", "plexus-variants", "echo")


def echo_handlers() -> list[Any]:
    import grpc

    pb = api.pb
    reply = pb.RouteDecision(
        route="echo", target="echo", confidence=1.0, model_version="echo", threshold=0.5
    ).SerializeToString()

    async def route(data: bytes, context: Any) -> bytes:
        pb.RouteRequest.FromString(data)  # the same parse Plexus does first
        return reply

    def identity(data: bytes) -> bytes:
        return data

    handler = grpc.unary_unary_rpc_method_handler(route, identity, identity)
    return [grpc.method_handlers_generic_handler("plexus.v1.Router", {"Route": handler})]


async def serve(kind: str, config_path: Path) -> None:
    loaded = api.load_config(config_path)
    plexus = None
    on_line = None
    if kind != "echo":
        plexus = api.PlexusServer(loaded, address="127.0.0.1:0")
        port = await plexus.start()
        if kind == "plexus-variants":
            from bench.observe import variant_switch

            on_line = variant_switch(plexus.plexus, loaded)
    else:
        server = api.new_server(loaded.config.server)
        server.add_generic_rpc_handlers(echo_handlers())
        port = server.add_insecure_port("127.0.0.1:0")
        if port == 0:
            raise OSError("cannot listen on 127.0.0.1:0")
        await server.start()
    print(f"PORT {port}", flush=True)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stop_when_parent_exits(loop, stop, on_line)
    await stop.wait()
    if plexus is not None:
        await plexus.stop(grace=0)
    else:
        await server.stop(0)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in KINDS:
        raise SystemExit(f"usage: python -m bench.harness.serve {{{','.join(KINDS)}}} CONFIG")
    asyncio.run(serve(sys.argv[1], Path(sys.argv[2])))
