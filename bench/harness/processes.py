"""Server processes under test: spawn, wait for ``PORT N``, read CPU time and RSS, stop.

Every benchmark server (``bench.harness.serve`` for Plexus and the echo servicer,
``bench.instant_backend``) runs as ``python -m MODULE ...`` in the checkout, prints
``PORT N`` on stdout once it listens, and stops on SIGTERM or when its stdin (a pipe from
the benchmark) reaches EOF, so a benchmark that dies takes its servers with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _cpu_clock_seconds(pid: int) -> float | None:
    """The process's CPU clock (every thread, those that ended too), to the nanosecond."""
    clock = ctypes.c_int()
    getter = getattr(_libc, "clock_getcpuclockid", None)
    if getter is None or getter(pid, ctypes.byref(clock)) != 0:
        return None
    try:
        return time.clock_gettime(clock.value)
    except OSError:  # the process is gone
        return None


def process_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process and all its threads, else None.

    From the process's POSIX CPU clock (nanoseconds), where the C library has one, rather than
    ``/proc/PID/stat``, whose 10 ms ticks put a round of a few hundred calls 2-3% off."""
    if pid is None:
        return None
    precise = _cpu_clock_seconds(pid)
    if precise is not None:
        return precise
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

    def command(self, line: str, timeout: float = 30.0) -> str:
        """Send one line to the server's stdin and return its one-line reply."""
        process = self.process
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(line.encode("utf-8") + b"\n")
        process.stdin.flush()
        if not select.select([process.stdout], [], [], timeout)[0]:
            raise RuntimeError(f"the {self.name} server did not answer {line!r} in {timeout:.0f} s")
        return process.stdout.readline().decode("utf-8", "replace").strip()

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


def stop_when_parent_exits(
    loop: asyncio.AbstractEventLoop,
    stop: asyncio.Event,
    on_line: Callable[[str], str] | None = None,
) -> None:
    """In a server child: set ``stop`` when stdin (a pipe from the benchmark) reaches EOF.

    ``on_line``: each line the benchmark writes (:meth:`Child.command`) is handed to it, and
    what it returns is printed as the reply (one line)."""
    import stat

    stdin = sys.stdin.fileno() if sys.stdin is not None else -1
    if stdin < 0 or not stat.S_ISFIFO(os.fstat(stdin).st_mode):
        return
    pending = bytearray()

    def stdin_readable() -> None:
        try:
            data = os.read(stdin, 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(stdin)
            stop.set()
            return
        pending.extend(data)
        while on_line is not None and b"\n" in pending:
            line, _, rest = bytes(pending).partition(b"\n")
            pending[:] = rest
            print(on_line(line.decode("utf-8", "replace").strip()), flush=True)

    loop.add_reader(stdin, stdin_readable)
