"""``plexus serve --workers N``: N serving processes on the same ports, one supervisor.

Each worker is a whole ``plexus serve`` (gRPC, and the HTTP front door when configured) bound
with SO_REUSEPORT to the same address, so the kernel spreads new connections over them and a
machine's cores all serve. Workers share what must be shared through ``server.state`` (Redis):
rate limits, budgets and the notices that carry a hot swap or a reload from the worker that
took the Admin call to the others, exactly as separate replicas do. So more than one worker
needs ``server.state.kind: redis``; with the in-process store each worker would count its own
limits and miss the others' swaps, and the supervisor refuses to start them.

The supervisor binds nothing itself. It resolves a port 0 to a free port first (all workers
need the same one), starts the workers, prints one ``plexus serving on`` line when every one is
ready, forwards SIGTERM / SIGINT to them (each drains as a single server does) and exits 0 when
they have stopped. A worker that dies while serving is restarted, with a growing pause; one
that fails before it is ready stops the whole start, with its exit status.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("plexus.workers")

READY = "plexus serving on"
FRONT_DOOR = "plexus OpenAI-compatible front door on"
RESTART_PAUSE_SECONDS = (1.0, 30.0)  # first pause after a crash, and the most it grows to


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def concrete_address(address: str) -> str:
    """``address`` with port 0 replaced by a port free right now (every worker binds it)."""
    host, _, port = address.rpartition(":")
    if port != "0":
        return address
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host.strip("[]"), 0))
        return f"{host}:{probe.getsockname()[1]}"


@dataclass
class _Worker:
    index: int
    command: list[str]
    process: subprocess.Popen[str] | None = None
    ready: bool = False
    lines: list[str] = field(default_factory=list)

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PLEXUS_WORKER": str(self.index)}
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
        )
        self.ready = False


class Supervisor:
    """Starts, watches and stops the workers."""

    def __init__(self, config: Path, count: int, address: str, http_address: str | None):
        base = [sys.executable, "-m", "router.cli", "serve", str(config), "--address", address]
        if http_address is not None:
            base += ["--http-address", http_address]
        self.workers = [_Worker(i, [*base, "--workers", "1", "--worker"]) for i in range(count)]
        self.stopping = threading.Event()

    def _wait_ready(self, worker: _Worker) -> bool:
        """Read the worker's start lines; False when it exited before it was ready."""
        process = worker.process
        assert process is not None and process.stdout is not None
        for line in process.stdout:
            worker.lines.append(line.rstrip("\n"))
            if line.startswith(READY):
                worker.ready = True
                threading.Thread(target=self._drain, args=(worker,), daemon=True).start()
                return True
        return False

    @staticmethod
    def _drain(worker: _Worker) -> None:
        """Keep reading the worker's stdout, so that it never blocks on a full pipe."""
        process = worker.process
        assert process is not None and process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)

    def start(self) -> int:
        """Start every worker; 0 when all are ready, else the first failure's exit status."""
        for worker in self.workers:
            worker.start()
        for worker in self.workers:
            if not self._wait_ready(worker):
                assert worker.process is not None
                code = worker.process.wait()
                self.stop()
                return code or 1
        return 0

    def signal_all(self, sig: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(sig)

    def watch(self) -> None:
        """Until asked to stop: restart any worker that died, with a growing pause."""
        pauses = {w.index: RESTART_PAUSE_SECONDS[0] for w in self.workers}
        while not self.stopping.wait(0.5):
            for worker in self.workers:
                process = worker.process
                if process is None or process.poll() is None:
                    continue
                pause = pauses[worker.index]
                log.warning(
                    "worker %d exited with %s; restarting it in %.0fs",
                    worker.index,
                    process.returncode,
                    pause,
                )
                if self.stopping.wait(pause):
                    return
                worker.start()
                if self._wait_ready(worker):
                    pauses[worker.index] = RESTART_PAUSE_SECONDS[0]
                else:
                    pauses[worker.index] = min(pause * 2, RESTART_PAUSE_SECONDS[1])

    def stop(self, timeout: float = 60.0) -> None:
        self.stopping.set()
        self.signal_all(signal.SIGTERM)
        end = time.monotonic() + timeout
        for worker in self.workers:
            if worker.process is None:
                continue
            try:
                worker.process.wait(max(end - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop in time; killing it", worker.index)
                worker.process.kill()
                worker.process.wait()

    def pids(self) -> Sequence[int]:
        return [w.process.pid for w in self.workers if w.process is not None]


def serve_workers(
    config: Path, count: int, address: str, http_address: str | None, stop_timeout: float
) -> int:
    """Run ``count`` workers until SIGTERM / SIGINT; the exit status."""
    supervisor = Supervisor(config, count, address, http_address)
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        code = supervisor.start()
        if code:
            return code
        front = next(
            (line for line in supervisor.workers[0].lines if line.startswith(FRONT_DOOR)), None
        )
        if front:  # as one server prints them: "serving on" last, with the bare address
            print(front, flush=True)
        pids = ", ".join(str(pid) for pid in supervisor.pids())
        print(f"plexus workers: {count} (pids {pids})", flush=True)
        print(f"{READY} {address}", flush=True)
        watcher = threading.Thread(target=supervisor.watch, daemon=True)
        watcher.start()
        stop.wait()
        log.info("signal received: stopping %d workers", count)
        supervisor.stop(stop_timeout)
        watcher.join(timeout=5)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
