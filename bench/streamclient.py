"""The streams load generator, in its own process: ``python -m bench.streamclient``.

Opens ``--streams`` connections at once, sends each one streaming request (pre-built
bytes) and timestamps every SSE ``data:`` event as it arrives (one ``asyncio.Protocol``
per connection, as in ``bench/client.py``), keeping the gap between consecutive events
of a stream: events that arrive in the same read get a gap of 0, as a client sees them.
Prints one JSON object: events, wall time (first connect to last stream's end), errors,
the gap percentiles pooled over every stream, first-event times, connect times and its
own CPU time.

Its own process so that its CPU is its own (reported beside the relays') and the bench's
other work (the ``/proc`` sampler) never runs inside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from .client import DATA, DONE, HttpError, build_request, clock, no_delay
from .stats import percentile

HOST = "127.0.0.1"
MS = 1000.0
END = b"\r\n0\r\n\r\n"  # the last chunk of a chunked body (no trailers)


class StreamProtocol(asyncio.Protocol):
    """One streamed answer on one connection, parsed as little as possible.

    After the head (status line only), the body is not de-chunked: each read is scanned
    for ``data:`` (events; one straddling two reads is counted once), ``data: [DONE]``,
    and the terminating ``0`` chunk right after it, which ends the answer (so does the
    server closing the connection after ``[DONE]``, as llama-server does). Cheaper per
    chunk than ``client.py``'s full chunked parser, which matters at 6,000 chunks/s.
    """

    def __init__(self, payload: bytes, gaps: list[float]) -> None:
        self.payload = payload
        self.gaps = gaps
        self.transport: asyncio.Transport | None = None
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.head = bytearray()
        self.status = 0
        self.started = 0.0
        self.first_event_at = 0.0
        self.last_event = 0.0
        self.events = 0
        self.done_seen = False
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = no_delay(transport)
        self.started = clock()
        transport.write(self.payload)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.future.done():
            if self.done_seen:
                self.future.set_result(None)
            else:
                self.future.set_exception(HttpError(f"stream cut short: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        now = clock()
        if not self.status:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = int(bytes(self.head[:end]).split(b" ", 2)[1])
            data = bytes(self.head[end + 4:])
        tail = self._tail
        window = tail + data
        found = window.count(DATA) - tail.count(DATA)
        if found:
            gaps = self.gaps
            if self.events:
                gaps.append(now - self.last_event)
            else:
                self.first_event_at = now
            if found > 1:
                gaps.extend([0.0] * (found - 1))
            self.last_event = now
            self.events += found
            if not self.done_seen and DONE in window:
                self.done_seen = True
        if self.done_seen and window.endswith(END) and not self.future.done():
            self.future.set_result(None)
        self._tail = window[-16:]


async def run(port: int, streams: int, body: bytes, path: str,
              stream_timeout: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    payload = build_request("POST", path, f"{HOST}:{port}", body)
    gaps: list[float] = []
    connects: list[float] = []
    firsts: list[float] = []
    errors: list[str] = []
    events = 0

    async def one() -> None:
        nonlocal events
        started = clock()
        try:
            transport, proto = await asyncio.wait_for(
                loop.create_connection(lambda: StreamProtocol(payload, gaps), HOST, port),
                stream_timeout)
        except (OSError, TimeoutError) as error:
            errors.append(f"connect: {error!r}")
            return
        connects.append(clock() - started)
        try:
            await asyncio.wait_for(proto.future, stream_timeout)
        except (HttpError, TimeoutError) as error:
            errors.append(f"{type(error).__name__}: {error}")
            return
        finally:
            transport.close()
        if proto.status != 200:
            errors.append(f"status {proto.status}")
        else:
            events += proto.events
            firsts.append(proto.first_event_at - proto.started)

    cpu0, t0 = time.process_time(), clock()
    await asyncio.gather(*(one() for _ in range(streams)))
    wall = clock() - t0
    cpu = time.process_time() - cpu0
    gaps.sort()
    return {
        "streams": streams, "events": events, "wall_s": wall, "events_per_s": events / wall,
        "errors": len(errors), "error_examples": errors[:5],
        "gap_ms": {"n": len(gaps), **{f"p{q:g}": percentile(gaps, q) * MS
                                       for q in (50, 90, 99, 99.9)},
                   "max": gaps[-1] * MS if gaps else None},
        "first_event_ms": {"p50": percentile(firsts, 50) * MS,
                           "p99": percentile(firsts, 99) * MS},
        "connect_ms_max": max(connects, default=0.0) * MS,
        "client_cpu_s": cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.streamclient")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--body", required=True, help="the request's JSON body")
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds each stream may take")
    args = parser.parse_args()
    result = asyncio.run(run(args.port, args.streams, args.body.encode(), args.path,
                             args.timeout))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
