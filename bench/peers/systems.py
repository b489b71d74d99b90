"""The servers of the peers suite: Plexus as ``plexus serve`` runs it, the LiteLLM proxy in its
own virtual environment, and the CPU time of a server's whole process tree.

The peer is never installed into Plexus's environment: :func:`install_peer` makes a virtual
environment under the peers folder (``--peers-dir``, by default a cache folder) and installs
the pinned ``litellm[proxy]`` there with pip; :func:`find_peer` finds one made earlier.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench.harness.processes import REPO_ROOT, child_env, process_cpu_seconds
from bench.report import say

PEER_SPEC = "litellm[proxy]==1.108.7"
"""What ``--install-peers`` installs unless ``--peer-spec`` says otherwise: one version, so two
runs of the suite measure the same peer."""
PEER_MODEL = "instant"
START_TIMEOUT_S = 180.0
INSTALL_TIMEOUT_S = 1800.0


def default_peers_dir() -> Path:
    """``$XDG_CACHE_HOME/plexus/bench-peers`` (``~/.cache/plexus/bench-peers``)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "plexus" / "bench-peers"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ----------------------------------------------------------------------------- process trees


def children_of(pid: int) -> list[int]:
    """The live descendants of ``pid`` (from /proc), depth first."""
    parents: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                ppid = int(handle.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents[ppid].append(int(entry))
    out, todo = [], list(parents.get(pid, []))
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(parents.get(child, []))
    return out


@dataclass
class Server:
    """One server under test: its process (and the processes it started), where it listens."""

    name: str
    process: subprocess.Popen[bytes]
    ports: dict[str, int] = field(default_factory=dict)  # "grpc", "http"
    log: Path | None = None
    lines: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=40))

    @property
    def pid(self) -> int:
        return self.process.pid

    def pids(self) -> list[int]:
        """The server's process and its descendants (``--workers``: the supervisor and each
        worker), read once the server is ready."""
        return [self.pid, *children_of(self.pid)]

    def watch(self) -> dict[str, int]:
        """``{name: pid}`` for every process whose CPU time counts as this server's."""
        return {f"{self.name}#{i}": pid for i, pid in enumerate(self.pids())}

    def cpu_seconds(self) -> float | None:
        values = [process_cpu_seconds(pid) for pid in self.pids()]
        return None if any(v is None for v in values) else sum(values)  # type: ignore[misc]

    def tail(self) -> str:
        text = "\n".join(self.lines)
        if self.log is not None and self.log.is_file():
            text += "\n" + "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        return text.strip()

    def stop(self) -> None:
        process = self.process
        if process.poll() is None:
            with contextlib.suppress(OSError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if process.stdout is not None:
            with contextlib.suppress(OSError):
                process.stdout.close()


def stop_servers(servers: list[Server]) -> None:
    for server in reversed(servers):
        server.stop()


def _drain(server: Server) -> None:
    """Keep reading the server's stdout so that it never blocks on a full pipe."""
    stdout = server.process.stdout
    assert stdout is not None
    with contextlib.suppress(OSError, ValueError):
        for raw in stdout:
            server.lines.append(raw.decode("utf-8", "replace").rstrip())


# ----------------------------------------------------------------------------- Plexus


def start_plexus(name: str, config: Path, workers: int, log_dir: Path) -> Server:
    """``plexus serve CONFIG --workers N`` with gRPC and the HTTP front door on free loopback
    ports; returns once both are served."""
    log = log_dir / f"{name}.log"
    command = [sys.executable, "-m", "router.cli", "serve", str(config)]
    command += ["--address", "127.0.0.1:0", "--http-address", "127.0.0.1:0"]
    command += ["--workers", str(workers)]
    with log.open("wb") as errors:
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env={**child_env(), "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errors,
            start_new_session=True,
        )
    server = Server(name, process, log=log)
    stdout = process.stdout
    assert stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while "grpc" not in server.ports or "http" not in server.ports:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: not serving after {START_TIMEOUT_S:.0f} s")
            raw = stdout.readline()
            if not raw:
                raise RuntimeError(
                    f"{name}: plexus serve exited with status {process.wait()}:\n{server.tail()}"
                )
            line = raw.decode("utf-8", "replace").strip()
            server.lines.append(line)
            if line.startswith("plexus OpenAI-compatible front door on"):
                server.ports["http"] = int(line.rstrip("/").removesuffix("/v1").rsplit(":", 1)[1])
            elif line.startswith("plexus serving on"):
                server.ports["grpc"] = int(line.split()[3].rsplit(":", 1)[1])
    except BaseException:
        server.stop()
        raise
    threading.Thread(target=_drain, args=(server,), daemon=True).start()
    return server


# ----------------------------------------------------------------------------- LiteLLM


@dataclass
class Peer:
    """A virtual environment holding the LiteLLM proxy."""

    venv: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def executable(self) -> Path:
        return self.venv / "bin" / "litellm"

    def versions(self) -> dict[str, str]:
        """The peer's litellm, Python and server library versions, read in its environment."""
        script = (
            "import importlib.metadata as m, json, platform\n"
            "def v(n):\n"
            "    try: return m.version(n)\n"
            "    except m.PackageNotFoundError: return 'not installed'\n"
            "print(json.dumps({'litellm': v('litellm'), 'python': platform.python_version(),"
            " 'uvicorn': v('uvicorn'), 'fastapi': v('fastapi'), 'uvloop': v('uvloop'),"
            " 'httpx': v('httpx'), 'openai': v('openai'), 'aiohttp': v('aiohttp')}))\n"
        )
        out = subprocess.run(
            [str(self.python), "-c", script], capture_output=True, text=True, timeout=60
        )
        if out.returncode != 0:
            raise RuntimeError(f"{self.python}: cannot read the peer's versions: {out.stderr}")
        return json.loads(out.stdout)


def peer_venv(peers_dir: Path) -> Path:
    return peers_dir / "litellm"


def find_peer(peers_dir: Path) -> Peer | None:
    """The LiteLLM environment under ``peers_dir`` when it holds a ``litellm`` command."""
    peer = Peer(peer_venv(peers_dir))
    return peer if peer.executable.is_file() and peer.python.is_file() else None


def how_to_install(peers_dir: Path) -> str:
    return (
        f"no LiteLLM proxy in {peer_venv(peers_dir)}: run with --install-peers (a virtual "
        f"environment there with {PEER_SPEC}), or make one yourself: python -m venv "
        f"{peer_venv(peers_dir)} && {peer_venv(peers_dir)}/bin/pip install '{PEER_SPEC}'"
    )


def _pip(venv: Path, *packages: str) -> None:
    if not (venv / "bin" / "python").is_file():
        say(f"creating the virtual environment {venv}")
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    say(f"installing {' '.join(packages)} into {venv} (pip)")
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *packages],
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip install {' '.join(packages)} into {venv} failed")


def install_peer(peers_dir: Path, spec: str = PEER_SPEC) -> Peer:
    """The LiteLLM environment under ``peers_dir``, made and filled with ``spec`` if needed."""
    peer = find_peer(peers_dir)
    if peer is not None:
        installed = peer.versions()["litellm"]
        wanted = spec.partition("==")[2]
        if not wanted or installed == wanted:
            return peer
        say(f"the peer environment holds litellm {installed}; {spec} asked for")
    _pip(peer_venv(peers_dir), spec)
    peer = find_peer(peers_dir)
    if peer is None:
        raise RuntimeError(f"{spec} installed into {peer_venv(peers_dir)} but no litellm command")
    return peer


def py_spy(peers_dir: Path, install: bool) -> Path | None:
    """A py-spy executable: on PATH, beside this Python, in the peers folder's tools
    environment, or (``install``) installed there now; None without one."""
    import shutil

    for candidate in (
        shutil.which("py-spy"),
        str(Path(sys.executable).parent / "py-spy"),
        str(peers_dir / "tools" / "bin" / "py-spy"),
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    if not install:
        return None
    _pip(peers_dir / "tools", "py-spy")
    path = peers_dir / "tools" / "bin" / "py-spy"
    return path if path.is_file() else None


def litellm_config(backend_port: int, master_key: str) -> dict[str, object]:
    """One model routed to the instant backend; no database and no callbacks. Callers
    authenticate with ``master_key`` (the proxy refuses to start without one), as Plexus's
    callers do with an API key."""
    return {
        "model_list": [
            {
                "model_name": PEER_MODEL,
                "litellm_params": {
                    "model": f"openai/{PEER_MODEL}",
                    "api_base": f"http://127.0.0.1:{backend_port}/v1",
                    "api_key": "unused",
                },
            }
        ],
        "litellm_settings": {"drop_params": True, "telemetry": False},
        "general_settings": {"master_key": master_key},
    }


def _healthy(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/health/liveliness")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def start_litellm(peer: Peer, backend_port: int, workdir: Path, master_key: str) -> Server:
    """The LiteLLM proxy, one worker, in front of the instant backend; returns once healthy."""
    config = workdir / "litellm.yaml"
    config.write_text(yaml.safe_dump(litellm_config(backend_port, master_key), sort_keys=False))
    port = free_port()
    log = workdir / "litellm.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "LITELLM_"))}
    env.update(
        LITELLM_LOCAL_MODEL_COST_MAP="True",  # no cost map fetched at start-up
        LITELLM_LOG="ERROR",
        LITELLM_TELEMETRY="False",
        PYTHONUNBUFFERED="1",
    )
    command = [str(peer.executable), "--config", str(config), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--num_workers", "1"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server("litellm", process, {"http": port}, log=log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _healthy(port):
        if process.poll() is not None:
            raise RuntimeError(f"the LiteLLM proxy exited with status {process.returncode}:\n"
                               f"{server.tail()}")  # fmt: skip
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"the LiteLLM proxy was not healthy in {START_TIMEOUT_S:.0f} s")
        time.sleep(0.25)
    return server
