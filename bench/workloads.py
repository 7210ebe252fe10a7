"""Workloads: what one side (direct or through swapd) is asked to do, and what it measured.

Each function talks to one port and knows nothing about which side it is; the caller
runs it against the upstream directly and against swapd, alternating the order per
repeat so that drift (page cache, CPU frequency, other tenants) hits both sides alike.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .client import Answer, Connection, HttpError, build_request, clock
from .procs import HOST


@dataclass
class Run:
    """Samples of one run of one workload on one side."""

    latencies: list[float] = field(default_factory=list)  # seconds
    ttfbs: list[float] = field(default_factory=list)  # seconds
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    events: int = 0
    wall: float = 0.0
    client_cpu: float = 0.0  # seconds of this process's CPU during the run
    server_cpu: float | None = None  # seconds of swapd's CPU during the run (swapd side)
    window: tuple[float, float] = (0.0, 0.0)  # clock() at its start and end
    connect_seconds: list[float] = field(default_factory=list)
    connects: int = 0

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_examples) < 5:
            self.error_examples.append(text)


async def _timed(run: Run, conns: list[Connection],
                 worker: Callable[[Connection], Awaitable[None]]) -> Run:
    """Run one worker per connection, recording wall and client CPU time and connects;
    the connections are closed whatever happens."""
    try:
        cpu0, t0 = time.process_time(), clock()
        await asyncio.gather(*(worker(c) for c in conns))
        run.wall = clock() - t0
        run.client_cpu = time.process_time() - cpu0
        run.connects = sum(c.connects for c in conns)
        run.connect_seconds = [s for c in conns for s in c.connect_seconds]
    finally:
        for conn in conns:
            conn.close()
    return run


def _check(answer: Answer, run: Run, *, stream: bool) -> bool:
    if answer.status != 200:
        body = bytes(answer.body or b"")[:200]
        run.error(f"status {answer.status}: {body!r}")
        return False
    if stream and not answer.done_seen:
        run.error("stream ended without data: [DONE]")
        return False
    return True


async def sequential(port: int, body: bytes, n: int, warmup: int) -> Run:
    """``n`` requests one after another on one keep-alive connection."""
    conn = Connection(HOST, port)
    payload = build_request("POST", "/v1/chat/completions", f"{HOST}:{port}", body)
    run = Run()
    try:
        for _ in range(warmup):
            await conn.request(payload)
        cpu0, t0 = time.process_time(), clock()
        for _ in range(n):
            try:
                answer = await conn.request(payload, request_timeout=30.0)
            except HttpError as error:
                run.error(str(error))
                continue
            if _check(answer, run, stream=False):
                run.latencies.append(answer.latency)
        run.wall = clock() - t0
        run.client_cpu = time.process_time() - cpu0
        run.connects = conn.connects
    finally:
        conn.close()
    return run


async def concurrent(port: int, body: bytes, clients: int, per_client: int,
                     warmup: int, *, stream: bool = False,
                     request_timeout: float = 60.0) -> Run:
    """``clients`` connections, each sending ``per_client`` requests back to back."""
    conns = [Connection(HOST, port) for _ in range(clients)]
    payload = build_request("POST", "/v1/chat/completions", f"{HOST}:{port}", body)
    run = Run()

    async def warm(conn: Connection) -> None:
        for _ in range(warmup):
            await conn.request(payload, keep_body=False, count_events=stream)

    async def worker(conn: Connection) -> None:
        for _ in range(per_client):
            try:
                answer = await conn.request(payload, request_timeout=request_timeout,
                                            keep_body=not stream,
                                            count_events=stream)
            except HttpError as error:
                run.error(str(error))
                continue
            if _check(answer, run, stream=stream):
                run.latencies.append(answer.latency)
                run.ttfbs.append((answer.first_event_at or answer.first_body_at)
                                 - answer.started)
                run.events += answer.events

    try:
        await asyncio.gather(*(warm(c) for c in conns))
    except BaseException:
        for conn in conns:
            conn.close()
        raise
    return await _timed(run, conns, worker)


async def one_stream(port: int, body: bytes, *, count: int = 1,
                     request_timeout: float = 120.0) -> Run:
    """``count`` long SSE streams, one after another on one connection: events, time to
    the first ``data:`` event of each, and their total duration."""
    conn = Connection(HOST, port)
    payload = build_request("POST", "/v1/chat/completions", f"{HOST}:{port}", body)
    run = Run()
    try:
        cpu0 = time.process_time()
        for _ in range(count):
            try:
                answer = await conn.request(payload, request_timeout=request_timeout,
                                            keep_body=False, count_events=True)
            except HttpError as error:
                run.error(str(error))
                continue
            if _check(answer, run, stream=True):
                run.events += answer.events
                run.wall += answer.ended_at - answer.started
                run.ttfbs.append(answer.first_event_at - answer.started)
                run.latencies.append(answer.latency)
        run.client_cpu = time.process_time() - cpu0
        run.connects = conn.connects
    finally:
        conn.close()
    return run


async def held_streams(port: int, body: bytes, clients: int, hold: float) -> Run:
    """``clients`` streams opened at once, each lasting about ``hold`` seconds.

    Counts as an error any stream that fails, ends without ``[DONE]``, or does not end
    within ``hold`` plus a margin.
    """
    conns = [Connection(HOST, port) for _ in range(clients)]
    payload = build_request("POST", "/v1/chat/completions", f"{HOST}:{port}", body)
    run = Run()

    async def worker(conn: Connection) -> None:
        try:
            answer = await conn.request(payload, request_timeout=hold + 30.0, keep_body=False,
                                        count_events=True)
        except HttpError as error:
            run.error(str(error))
            return
        if _check(answer, run, stream=True):
            run.events += answer.events
            run.latencies.append(answer.latency)
            run.ttfbs.append(answer.first_event_at - answer.started)

    return await _timed(run, conns, worker)
