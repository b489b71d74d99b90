"""One multi-process client for every target: spawn, ready, go, collect.

:class:`ClientPool` spawns ``processes`` client processes once. For each run it splits the
concurrency level (and the calls) between them and sends each a :class:`Job`; a process opens
the job's adapter (:mod:`bench.harness.adapters`), warms up on it, answers ready, waits for
"go" (sent to every process at once), drives its share with :func:`drive` and sends back its
samples. The pool reads the watched servers' CPU time just before "go" and after the last
result, and merges everything into one :class:`Run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import time
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.harness.adapters import ADAPTERS, StreamFactory
from bench.harness.processes import process_cpu_seconds
from bench.report import percentiles_us, say


@dataclass
class Job:
    adapter: str  # a key of ADAPTERS
    host: str
    port: int
    api_key: str
    payloads: list[bytes]
    concurrency: int  # in-flight streams in this process
    requests: int
    warmup: int
    offset: int  # this process starts at payload ``offset``
    seconds: float = 0.0  # > 0: run this long instead of ``requests`` calls


@dataclass
class Record:
    latency: array = field(default_factory=lambda: array("q"))  # started -> final (ns)
    ttft: array = field(default_factory=lambda: array("q"))  # started -> first, -1 if none
    query: array = field(default_factory=lambda: array("h"))  # payload index of each success
    ends: array = field(default_factory=lambda: array("q"))  # completion times (ns, absolute)


@dataclass
class Run:
    """The successes' samples, the failures and the servers' CPU time of one or more runs."""

    target: str
    concurrency: int
    latency: np.ndarray
    ttft: np.ndarray
    query: np.ndarray
    ends: np.ndarray
    start: int
    seconds: float
    errors: dict[str, int]
    examples: list[str]
    routes: dict[int, str]
    cpu_s: dict[str, float | None] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return int(self.latency.size)

    @property
    def failures(self) -> int:
        return sum(self.errors.values())

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def cpu_us_per_call(self, name: str) -> float | None:
        cpu, calls = self.cpu_s.get(name), self.requests + self.failures
        return None if cpu is None or not calls else 1e6 * cpu / calls


def _add(into: dict[str, int], counts: Mapping[str, int]) -> None:
    for key, value in counts.items():
        into[key] = into.get(key, 0) + value


def combine(runs: Sequence[Run], parallel: bool = False) -> Run:
    """Runs as one: samples joined, errors and CPU time summed; the seconds summed (rounds one
    after another) or, with ``parallel``, the span from the first start to the last end."""
    errors: dict[str, int] = {}
    routes: dict[int, str] = {}
    for run in runs:
        _add(errors, run.errors)
        routes.update(run.routes)
    start = min(r.start for r in runs)
    names = {name for run in runs for name in run.cpu_s}
    cpu = {
        name: None
        if any(run.cpu_s.get(name) is None for run in runs)
        else sum(run.cpu_s[name] for run in runs)  # type: ignore[misc]
        for name in names
    }
    return Run(
        target=runs[0].target,
        concurrency=runs[0].concurrency,
        latency=np.concatenate([r.latency for r in runs]),
        ttft=np.concatenate([r.ttft for r in runs]),
        query=np.concatenate([r.query for r in runs]),
        ends=np.concatenate([r.ends for r in runs]),
        start=start,
        seconds=max(r.start / 1e9 + r.seconds for r in runs) - start / 1e9
        if parallel
        else sum(r.seconds for r in runs),
        errors=errors,
        examples=[e for r in runs for e in r.examples][:3],
        routes=routes,
        cpu_s=cpu,
    )


# ----------------------------------------------------------------------------- client side


async def drive(
    streams: StreamFactory,
    job: Job,
    count: int | None,
    deadline_ns: int | None,
    record: Record | None,
    errors: dict[str, int],
    examples: list[str],
) -> int:
    """``job.concurrency`` streams taking payloads in turn until ``count`` calls or the
    deadline; returns the successes."""
    state = {"next": 0, "ok": 0}
    payloads = len(job.payloads)

    async def one_stream() -> None:
        stream = streams()
        try:
            while True:
                i = state["next"]
                if count is not None and i >= count:
                    return
                if deadline_ns is not None and time.perf_counter_ns() >= deadline_ns:
                    return
                state["next"] = i + 1
                index = (job.offset + i) % payloads
                started, first, final, error, detail = await stream.run(index)
                if error is not None:
                    errors[error] = errors.get(error, 0) + 1
                    if len(examples) < 3:
                        examples.append(f"{error}: {detail[:200]}")
                    continue
                state["ok"] += 1
                if record is not None:
                    record.latency.append(final - started)
                    record.ttft.append(first - started if first else -1)
                    record.query.append(index)
                    record.ends.append(final)
        finally:
            await stream.close()

    count_streams = job.concurrency if count is None else min(job.concurrency, max(count, 1))
    await asyncio.gather(*(one_stream() for _ in range(count_streams)))
    return state["ok"]


_SAMPLES = ("latency", "ttft", "query", "ends")


async def _client_run(job: Job, conn: Any) -> Run:
    loop = asyncio.get_running_loop()
    routes: dict[int, str] = {}
    async with ADAPTERS[job.adapter](job, routes) as streams:
        warm_errors: dict[str, int] = {}
        warm_ok = await drive(streams, job, job.warmup, None, None, warm_errors, [])
        conn.send(("ready", (routes, warm_ok), warm_errors))
        await loop.run_in_executor(None, conn.recv)  # "go": every process starts together
        record = Record()
        errors: dict[str, int] = {}
        examples: list[str] = []
        started = time.perf_counter_ns()
        if job.seconds > 0:
            deadline = started + int(job.seconds * 1e9)
            await drive(streams, job, None, deadline, record, errors, examples)
        else:
            await drive(streams, job, job.requests, None, record, errors, examples)
        ended = time.perf_counter_ns()
    return Run(
        target=job.adapter,
        concurrency=job.concurrency,
        **{name: np.asarray(getattr(record, name), dtype=np.int64) for name in _SAMPLES},
        start=started,
        seconds=(ended - started) / 1e9,
        errors=errors,
        examples=examples,
        routes=routes,
    )


def client_worker(conn: Any) -> None:
    """A client process: one job per message until it receives None."""
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            result = asyncio.run(_client_run(job, conn))
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            conn.send(("error", f"{type(exc).__name__}: {exc}", {}))
            continue
        conn.send(("done", result))


# ----------------------------------------------------------------------------- parent side


def split_load(workers: int, concurrency: int, requests: int) -> list[tuple[int, int]]:
    """(in-flight calls, requests) per client process for one concurrency level."""
    used = min(workers, concurrency)
    shares = [concurrency // used + (1 if i < concurrency % used else 0) for i in range(used)]
    counts = [requests * s // concurrency for s in shares]
    counts[0] += requests - sum(counts)
    return list(zip(shares, counts, strict=True))


class ClientPool:
    """``processes`` spawned client processes; the concurrency level is split between them."""

    def __init__(self, processes: int):
        context = multiprocessing.get_context("spawn")
        self.workers = []
        for _ in range(processes):
            parent, child = context.Pipe()
            process = context.Process(target=client_worker, args=(child,), daemon=True)
            process.start()
            child.close()
            self.workers.append((process, parent))

    def run(
        self,
        target: str,
        adapter: str,
        address: tuple[str, int],
        api_key: str,
        payloads: list[bytes],
        concurrency: int,
        requests: int,
        *,
        seconds: float = 0.0,
        watch: Mapping[str, int] | None = None,
        before_go: Callable[[], None] | None = None,
        tick: Callable[[], None] | None = None,
    ) -> Run:
        """Drive ``target`` through ``adapter`` at ``address``; ``watch`` names the server
        pids whose CPU time the run reports; ``tick`` is called about every 0.25 s."""
        host, port = address
        shares = split_load(len(self.workers), concurrency, requests)
        jobs = [
            Job(adapter, host, port, api_key, payloads, share, count, 0, i * 7, seconds)
            for i, (share, count) in enumerate(shares)
        ]
        for job in jobs:
            job.warmup = 20 if seconds > 0 else max(4 * job.concurrency, job.requests // 5, 20)
        for (_, conn), job in zip(self.workers, jobs, strict=False):
            conn.send(job)
        routes: dict[int, str] = {}
        warm_errors: dict[str, int] = {}
        warm_ok = 0
        waiting, failures = [], []
        for _, conn in self.workers[: len(jobs)]:
            status, detail, errors = conn.recv()
            if status == "error":  # that process is idle again
                failures.append(detail)
                continue
            waiting.append(conn)
            routes.update(detail[0])
            warm_ok += detail[1]
            _add(warm_errors, errors)
        cpu_before: dict[str, float | None] = {}
        if not failures:
            if before_go is not None:
                before_go()
            cpu_before = {name: process_cpu_seconds(pid) for name, pid in (watch or {}).items()}
        for conn in waiting:  # every start signal goes out at once
            conn.send("go")
        results, pending = [], list(waiting)
        while pending:
            for conn in multiprocessing.connection.wait(pending, timeout=0.25):
                message = conn.recv()
                pending.remove(conn)
                (results if message[0] == "done" else failures).append(message[1])
            if tick is not None:
                tick()
        cpu: dict[str, float | None] = {}
        for name, pid in (watch or {}).items():
            after, before = process_cpu_seconds(pid), cpu_before.get(name)
            cpu[name] = None if after is None or before is None else after - before
        if failures:
            raise RuntimeError("the benchmark client failed: " + "; ".join(map(str, failures)))
        if warm_errors and not warm_ok:
            raise RuntimeError(f"every warm-up call to {target} failed: {warm_errors}")
        if warm_errors:
            say(f"warning: {target} warm-up errors {warm_errors}")
        run = combine(results, parallel=True)
        run.target, run.concurrency, run.cpu_s = target, concurrency, cpu
        run.routes = {**routes, **run.routes}
        return run

    def close(self) -> None:
        for _, conn in self.workers:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(None)
        for process, conn in self.workers:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
            conn.close()


# ----------------------------------------------------------------------------- ABBA rounds


def abba(
    targets: Sequence[str],
    levels: Sequence[int],
    requests: int,
    rounds: int,
    run_one: Callable[[str, int, int], Run],
) -> Iterator[tuple[int, dict[str, list[Run]]]]:
    """Per level, ``rounds`` rounds per target in ABBA order (A B, B A, ...; the next level
    starts with the other target), each round 1/``rounds`` of the requests; yields each
    level's runs per target. ``run_one(target, level, calls)`` measures one round."""
    for index, level in enumerate(levels):
        count = max(1, min(rounds, requests))
        counts = [requests // count + (1 if r < requests % count else 0) for r in range(count)]
        collected: dict[str, list[Run]] = {t: [] for t in targets}
        for round_index, calls in enumerate(counts):
            order = targets if (round_index + index) % 2 == 0 else tuple(reversed(targets))
            for target in order:
                run = run_one(target, level, calls)
                collected[target].append(run)
                p = percentiles_us(run.latency)
                say(
                    f"c={level:<4d} {target:6s} round {round_index + 1}/{count}: {calls} calls, "
                    f"p50 {p['p50']:,.0f} us, p99 {p['p99']:,.0f} us, {run.rps:,.0f} req/s"
                    + (f", {run.failures} failed {run.errors}" if run.failures else "")
                )
        yield level, collected
