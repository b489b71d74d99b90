"""A real redis-server on 127.0.0.1 at an ephemeral port, for tests.

It keeps nothing on disk (no RDB snapshots, no append-only file), so a restart comes back
empty, as after a crash: its script cache too. ``stop()`` and ``start()`` again reuse the same
port, so clients that knew the old server find the new one.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")


def require_redis_server() -> str:
    """The redis-server executable's path; the calling test skips, saying why, without one."""
    if REDIS_SERVER is None:
        pytest.skip(
            "redis-server is not installed (apt-get install redis-server): "
            "the Redis state store tests need a real one"
        )
    return REDIS_SERVER


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; ``url`` is where it listens."""

    def __init__(self, executable: str | None = None):
        self.executable = executable or require_redis_server()
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="plexus-redis-"))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start it (on a fresh ephemeral port the first time, on the same port after that)
        and wait until it answers PING."""
        if self.process is not None:
            raise RuntimeError("redis-server is already running")
        for _ in range(5):
            port = self.port or _free_port()
            self.process = subprocess.Popen(
                [
                    self.executable,
                    "--port", str(port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self._dir),
                    "--loglevel", "warning",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            end = time.monotonic() + timeout
            while time.monotonic() < end and self.process.poll() is None:
                if _ping(port):
                    self.port = port
                    return
                time.sleep(0.02)
            self.process.kill()
            self.process.wait()
            self.process = None
            if self.port:  # the same port was asked for: try again, it may be in TIME_WAIT
                time.sleep(0.2)
        raise RuntimeError(f"redis-server did not start (port {self.port or 'ephemeral'})")

    def stop(self) -> None:
        """Stop it at once (SIGKILL: like a crash, nothing is flushed)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
