"""Server processes under test: spawn, wait for ``PORT N``, read CPU time and RSS, stop.

Every benchmark server (``bench.harness.serve`` for Plexus and the echo servicer,
``bench.instant_backend``) runs as ``python -m MODULE ...`` in the checkout, prints
``PORT N`` on stdout once it listens, and stops on SIGTERM or when its stdin (a pipe from
the benchmark) reaches EOF, so a benchmark that dies takes its servers with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def process_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process and all its threads (Linux /proc), else None."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def rss_mib(pid: int | None) -> float | None:
    """Resident set size (VmRSS) of a process in MiB, from /proc; None if unreadable."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


class Child:
    """One server process: started by the constructor, :meth:`ready` waits for its port."""

    def __init__(self, name: str, module: str, *args: str):
        self.name = name
        self.port = 0
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=REPO_ROOT,
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ready(self) -> int:
        """The port from the ``PORT N`` line; RuntimeError if the process exits or stalls."""
        process, stdout = self.process, self.process.stdout
        assert stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"the {self.name} server exited with status {process.returncode}"
                )
            if select.select([stdout], [], [], 0.5)[0]:
                line = stdout.readline().decode("utf-8", "replace").strip()
                if line.startswith("PORT "):
                    self.port = int(line.split()[1])
                    return self.port
        raise RuntimeError(
            f"the {self.name} server did not report its port in {START_TIMEOUT_S:.0f} s"
        )

    def cpu_seconds(self) -> float | None:
        return process_cpu_seconds(self.pid)

    def rss_mib(self) -> float | None:
        return rss_mib(self.pid)

    def stop(self) -> None:
        process = self.process
        if process.poll() is None:
            with contextlib.suppress(OSError):
                process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def stop_all(children: list[Child]) -> None:
    for child in children:
        child.stop()


def stop_when_parent_exits(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """In a server child: set ``stop`` when stdin (a pipe from the benchmark) reaches EOF."""
    import stat

    stdin = sys.stdin.fileno() if sys.stdin is not None else -1
    if stdin < 0 or not stat.S_ISFIFO(os.fstat(stdin).st_mode):
        return

    def stdin_readable() -> None:
        try:
            data = os.read(stdin, 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(stdin)
            stop.set()

    loop.add_reader(stdin, stdin_readable)
