"""Sampling profiles of a server under load with py-spy, and the top of each.

:func:`start` runs ``py-spy record --format raw --native`` (collapsed stacks: one line per
distinct stack, ``frame;frame;...;leaf COUNT``, outermost first, each frame ``function
(file:line)`` or ``function (library)``) against a server while the benchmark client drives it.
:func:`parse_collapsed` reads such a file; py-spy keeps every thread's samples when it walks
native frames, so a sample whose innermost named frame is a blocking wait (``epoll_wait``, a
lock or condition wait, ``poll``...) counts as idle and the shares are of the busy samples:

- ``own``: samples with the function innermost (where the CPU was);
- ``total``: samples with the function anywhere on the stack, counted once per sample;
- :func:`areas`: the busy samples by where their innermost frame lives (Plexus's own Python,
  gRPC, aiohttp, asyncio, the C library's system calls, the CPython interpreter, other).
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bench.report import say

RATE_HZ = 50  # native sampling pauses the server: 100 Hz cost it 70% of its calls/s here
GIL_RATE_HZ = 100
# "function (path/to/file.py:123)": the name, and the place without its line number.
_FRAME = re.compile(r"^(?P<name>.*?) \((?P<where>[^()]*?)(?::\d+)?\)$")
WAITS = frozenset(
    {
        "epoll_wait",
        "epoll_pwait",
        "poll",
        "ppoll",
        "select",
        "pselect",
        "nanosleep",
        "clock_nanosleep",
        "PyThread_acquire_lock_timed",
        "pthread_cond_wait",
        "pthread_cond_timedwait",
        "pthread_cond_clockwait",
        "sem_wait",
        "sem_timedwait",
        "sem_clockwait",
        "__futex_abstimed_wait_common",
        "futex_wait",
        "syscall",  # gRPC's and CPython's futex waits go through syscall(SYS_futex)
        "fdatasync",  # a thread waiting on the disk (the audit trail's commits), not on a core
        "fsync",
    }
)
AREAS = (
    ("Plexus (router/)", lambda w: w.startswith("router/")),
    ("gRPC (Python and C core)", lambda w: w.startswith("grpc/") or "cygrpc" in w),
    ("aiohttp", lambda w: w.startswith("aiohttp/") or w in ("_http_parser.c", "llhttp.c")),
    ("asyncio", lambda w: w.startswith("asyncio/") or w == "_asynciomodule.c"),
    ("C library (system calls)", lambda w: w.startswith("libc.so")),
    ("CPython (interpreter and C modules)", lambda w: "libpython" in w or w.endswith((".c", ".h"))),
    ("other Python", lambda w: w.endswith(".py") or w.startswith("<")),
)


@dataclass(frozen=True)
class Frame:
    name: str  # the function, or "[library]" for an address without a symbol
    where: str  # the file (as py-spy shows it, without the line) or the library
    line: int = 0

    @property
    def label(self) -> str:
        """The function and the file's last part (or the library)."""
        if self.name.startswith("["):
            return self.name
        short = self.where.rsplit("/", 1)[-1]
        return f"{self.name} ({short})" if short else self.name


@dataclass
class Stack:
    frames: list[Frame]  # outermost first
    samples: int
    idle: bool


@dataclass
class Top:
    """One function's share of a profile's busy samples, and for its own samples the innermost
    Plexus frame (``file:line``) most of them were under, with that frame's share of them."""

    function: str
    own: float
    total: float
    plexus_frame: str = ""
    plexus_frame_share: float = 0.0


def parse_frame(text: str) -> Frame:
    match = _FRAME.match(text.strip())
    if match is None:
        return Frame(text.strip(), "")
    name, where = match["name"], match["where"]
    line = re.search(r":(\d+)\)$", text.strip())
    if re.fullmatch(r"0x[0-9a-fA-F]+", name):
        name = f"[{where.rsplit('/', 1)[-1] or 'unknown'}]"
    return Frame(name, where, int(line[1]) if line else 0)


def is_plexus(frame: Frame) -> bool:
    """A frame of Plexus's own code, other than the command line that starts the event loop
    (every callback the loop runs sits under it)."""
    return frame.where.startswith("router/") and frame.where != "router/cli.py"


def plexus_frame(frames: list[Frame]) -> str:
    """The innermost frame in Plexus's own code, as ``path:line (function)``; "" if none."""
    for frame in reversed(frames):
        if is_plexus(frame):
            return f"{frame.where}:{frame.line} ({frame.name})"
    return ""


def is_idle(frames: list[Frame]) -> bool:
    """Whether the innermost frame with a name is a blocking wait."""
    for frame in reversed(frames):
        if not frame.name.startswith("["):
            return frame.name in WAITS
    return False


def parse_collapsed(lines: Iterable[str]) -> list[Stack]:
    """The stacks of a collapsed-stack file; lines that are not ``STACK COUNT`` are skipped."""
    out = []
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [parse_frame(f) for f in stack.split(";") if f]
        if frames:
            out.append(Stack(frames, int(count), is_idle(frames)))
    return out


def busy_samples(stacks: list[Stack]) -> int:
    return sum(s.samples for s in stacks if not s.idle)


def top(stacks: list[Stack], count: int = 15, by: str = "own") -> list[Top]:
    """The ``count`` functions with the most ``by`` busy samples: "own" (any function) or
    "plexus" (Plexus's own functions, by total)."""
    busy = busy_samples(stacks)
    if not busy:
        return []
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    under: dict[str, dict[str, int]] = {}
    plexus: set[str] = set()
    for stack in stacks:
        if stack.idle:
            continue
        leaf = stack.frames[-1].label
        own[leaf] = own.get(leaf, 0) + stack.samples
        caller = under.setdefault(leaf, {})
        frame = plexus_frame(stack.frames)
        caller[frame] = caller.get(frame, 0) + stack.samples
        plexus.update(f.label for f in stack.frames if is_plexus(f))
        for label in {f.label for f in stack.frames}:
            total[label] = total.get(label, 0) + stack.samples
    if by == "own":
        names = sorted(own, key=lambda n: (-own[n], n))[:count]
    else:
        names = sorted(plexus, key=lambda n: (-total[n], n))[:count]
    out = []
    for name in names:
        row = Top(name, own.get(name, 0) / busy, total[name] / busy)
        callers = under.get(name, {})
        if callers:
            frame, n = max(callers.items(), key=lambda item: (item[1], item[0]))
            row.plexus_frame, row.plexus_frame_share = frame, n / own[name]
        out.append(row)
    return out


def area_of(frame: Frame) -> str:
    for area, matches in AREAS:
        if matches(frame.where):
            return area
    return "other native code"


def areas(stacks: list[Stack]) -> dict[str, float]:
    """Busy samples by the area of their innermost frame, as shares, largest first."""
    busy = busy_samples(stacks)
    found: dict[str, int] = {}
    for stack in stacks:
        if not stack.idle:
            area = area_of(stack.frames[-1])
            found[area] = found.get(area, 0) + stack.samples
    ranked = sorted(found.items(), key=lambda item: -item[1])
    return {area: n / busy for area, n in ranked} if busy else {}


# ----------------------------------------------------------------------------- recording


def command(
    py_spy: Path,
    pid: int,
    seconds: float,
    out: Path,
    native: bool,
    children: bool,
    rate: int = RATE_HZ,
) -> list[str]:
    """The py-spy command line that samples ``pid`` for ``seconds`` into ``out``: every
    thread with native frames (py-spy pauses the process for each sample), or (not
    ``native``) the Python frames of the thread holding the GIL, without pausing the process
    (``--gil --nonblocking``)."""
    args = [str(py_spy), "record", "--pid", str(pid), "--rate", str(rate)]
    args += ["--duration", str(max(1, round(seconds))), "--format", "raw", "-o", str(out)]
    args += ["--native"] if native else ["--gil", "--nonblocking"]
    if children:
        args.append("--subprocesses")
    return args


class Recording:
    """A running ``py-spy record``; :meth:`wait` returns once it has written its file."""

    def __init__(self, args: list[str], log: Path):
        self.args = args
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        time.sleep(1.0)  # attaching takes a moment; the load starts after it
        if self.process.poll() is not None:
            raise RuntimeError(
                f"py-spy exited at once ({self.process.returncode}): {log.read_text()[-400:]}"
            )

    def wait(self, timeout: float) -> None:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            self.process.wait(timeout=10)
        if self.process.returncode:
            raise RuntimeError(f"py-spy failed ({self.process.returncode}): "
                               f"{self.log.read_text()[-400:]}")  # fmt: skip


def start(
    py_spy: Path,
    pid: int,
    seconds: float,
    out: Path,
    children: bool,
    native: bool = True,
    rate: int = RATE_HZ,
) -> Recording:
    """py-spy on ``pid``; with ``native``, native frames too (C extensions, system calls), and
    when py-spy cannot walk them here, Python frames only."""
    log = out.with_suffix(".log")
    if native:
        try:
            return Recording(command(py_spy, pid, seconds, out, True, children, rate), log)
        except RuntimeError as exc:
            say(f"py-spy --native failed ({exc}); sampling Python frames only")
    return Recording(command(py_spy, pid, seconds, out, False, children, rate), log)
