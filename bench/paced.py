"""A paced stand-in for llama-server: streams tokens at a fixed rate, costing next to nothing.

Run it like llama-server (swapd does, as a profile's child)::

    python bench/paced.py --model /m/x.gguf --host 127.0.0.1 --port 8080 --alias paced \\
        [--paced-interval-ms 10] [--paced-tokens 16]

Every llama-server flag is accepted and ignored (``--help`` lists the ones it reads, in
llama.cpp's layout, so swapd's flag preflight has something to check against). Standard
library only, one process, one asyncio event loop, no framework: cheap per chunk, so that
the stand-in is never the limit of what it measures.

What it answers (enough of llama-server's HTTP/1.1 surface for swapd and the bench):

* ``GET /health`` 200 ``{"status":"ok"}``; ``GET /v1/models`` (and ``/models``, ``/props``).
* ``POST /v1/chat/completions`` (and ``/chat/completions``, ``/v1/completions``,
  ``/completion``) with ``"stream": true``: llama-server's exact framing.
  ``Transfer-Encoding: chunked``, one ``data: {...}\\n\\n`` chunk per HTTP chunk (one
  ``send`` each), a first ``chat.completion.chunk`` with ``delta.role``, one chunk per
  token, a last one with ``finish_reason``, ``data: [DONE]``, the ``0`` chunk, and then
  the connection is closed without a ``Connection: close`` header, as llama-server does
  after every stream. Tokens: ``max_tokens`` (or ``n_predict``), else ``--paced-tokens``.
* **Pacing.** Tokens come at ``--paced-interval-ms`` (the request's ``paced_interval_ms``
  overrides it): every stream with the same interval is served by one timer, the
  "decode step" of a batching GPU, which produces one token for every active stream at
  once; a stream that arrives mid-step gets its role chunk at once and its first token at
  the next step. The step times are absolute (start + k x interval), so a late step does
  not shift the later ones; a step more than one interval late is skipped, not queued.
* ``paced_interval_ms: 0`` is a **burst**: tokens as fast as the socket takes them, one
  ``write`` per chunk as llama-server does (asyncio sends each at once while the socket
  has room, and coalesces them in its buffer when it has not), 16 chunks per turn of the
  event loop; it stops writing while asyncio's buffer is over its high-water mark.
* Non-streamed requests get an ordinary ``chat.completion`` at once, with keep-alive
  (llama-server's ``Keep-Alive`` header; ``Connection: close`` in the request is obeyed).
* ``GET /paced/stats``: steps run, steps late by more than 2 ms, the worst lateness, and
  chunks written, so a reader can check that the stand-in kept its pace.

Readiness: like llama-server it prints ``model loaded`` and ``listening on http://...``
on stderr once it is bound (the lines swapd and the bench wait for). SIGTERM/SIGINT exit 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from typing import Any

HIGH_WATER = 1 << 16
BURST_BATCH = 16  # chunks written per turn of the event loop in burst mode
LATE_S = 0.002  # a step later than this counts as late in /paced/stats
MAX_HEAD = 1 << 16

_VALUE_FLAGS = {"--host": "host", "--port": "port", "-a": "alias", "--alias": "alias",
                "-m": "model", "--model": "model",
                "--paced-interval-ms": "interval_ms", "--paced-tokens": "tokens"}
_HELP = (
    ("-m,    --model FNAME", "model path (not opened)"),
    ("--host HOST", "ip address to listen on (default: 127.0.0.1)"),
    ("--port PORT", "port to listen on (default: 8080; 0 picks a free one)"),
    ("-a,    --alias STRING", "model name in answers"),
    ("--paced-interval-ms N", "one token per stream every N ms (default: 10; 0 = burst)"),
    ("--paced-tokens N", "tokens per answer without max_tokens (default: 16)"),
)
_CHAT = (b"/v1/chat/completions", b"/chat/completions")
_COMPLETIONS = (b"/v1/completions", b"/completions", b"/completion")
JSON_TYPE = b"application/json; charset=utf-8"
COMMON = b"Server: llama.cpp\r\nAccess-Control-Allow-Origin: \r\n"
KEEP_ALIVE = b"Keep-Alive: timeout=5, max=100\r\n"


def _is_value(token: str) -> bool:
    if not token.startswith("-"):
        return True
    try:
        float(token)
    except ValueError:
        return False
    return True


def parse_args(argv: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {"host": "127.0.0.1", "port": "8080", "alias": "", "model": "",
                            "interval_ms": "10", "tokens": "16"}
    i = 0
    while i < len(argv):
        flag, eq, inline = argv[i].partition("=")
        i += 1
        if flag in _VALUE_FLAGS:
            if eq:
                opts[_VALUE_FLAGS[flag]] = inline
            elif i < len(argv):
                opts[_VALUE_FLAGS[flag]] = argv[i]
                i += 1
        elif flag.startswith("-") and not eq and i < len(argv) and _is_value(argv[i]):
            i += 1  # an unknown flag's value
    opts["port"] = int(opts["port"])
    opts["interval_ms"] = float(opts["interval_ms"])
    opts["tokens"] = int(opts["tokens"])
    opts["alias"] = opts["alias"] or opts["model"] or "paced"
    return opts


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Stats:
    def __init__(self) -> None:
        self.steps = 0
        self.late_steps = 0
        self.skipped_steps = 0
        self.max_late_ms = 0.0
        self.chunks = 0
        self.streams = 0


class Stepper:
    """One timer for every stream that shares an interval: the batch's decode step."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float, stats: Stats) -> None:
        self.loop = loop
        self.interval = interval
        self.stats = stats
        self.streams: list[Stream] = []
        self.next = 0.0
        self.running = False

    def add(self, stream: Stream) -> None:
        self.streams.append(stream)
        if not self.running:
            self.running = True
            self.next = self.loop.time() + self.interval
            self.loop.call_at(self.next, self.step)

    def step(self) -> None:
        now = self.loop.time()
        stats = self.stats
        late = now - self.next
        stats.steps += 1
        if late > LATE_S:
            stats.late_steps += 1
        stats.max_late_ms = max(stats.max_late_ms, late * 1000)
        self.streams = [s for s in self.streams if s.token()]
        if not self.streams:
            self.running = False
            return
        self.next += self.interval
        if self.next <= now:
            skipped = int((now - self.next) / self.interval) + 1
            stats.skipped_steps += skipped
            self.next += skipped * self.interval
        self.loop.call_at(self.next, self.step)


class Stream:
    """One streamed answer on one connection."""

    def __init__(self, conn: Conn, tokens: int, chat: bool, alias: str) -> None:
        self.conn = conn
        self.left = tokens
        head = (f'"created":{int(time.time())},"id":"chatcmpl-paced{id(self):x}",'
                f'"model":{json.dumps(alias)},"system_fingerprint":"b0-paced",'
                f'"object":"{"chat.completion.chunk" if chat else "text_completion"}"}}')

        def event(choice: str) -> bytes:
            return _chunk(f'data: {{"choices":[{choice}],{head}\n\n'.encode())

        if chat:
            self.first = event('{"finish_reason":null,"index":0,'
                               '"delta":{"role":"assistant","content":null}}')
            self.each = event('{"finish_reason":null,"index":0,"delta":{"content":" tok"}}')
            self.last = event('{"finish_reason":"length","index":0,"delta":{}}')
        else:
            self.first = b""
            self.each = event('{"text":" tok","index":0,"logprobs":null,'
                              '"finish_reason":null}')
            self.last = event('{"text":"","index":0,"logprobs":null,'
                              '"finish_reason":"length"}')

    def start(self) -> None:
        transport = self.conn.transport
        assert transport is not None
        transport.write(b"HTTP/1.1 200 OK\r\n" + COMMON + KEEP_ALIVE
                        + b"X-Accel-Buffering: no\r\nContent-Type: text/event-stream\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n")
        if self.first:
            transport.write(self.first)
            self.conn.server.stats.chunks += 1

    def token(self) -> bool:
        """Write one token; False once the stream is over (or its client gone)."""
        transport = self.conn.transport
        if transport is None or transport.is_closing():
            return False
        transport.write(self.each)
        self.conn.server.stats.chunks += 1
        self.left -= 1
        if self.left > 0:
            return True
        self.end()
        return False

    def burst(self) -> None:
        conn = self.conn
        transport = conn.transport
        if transport is None or transport.is_closing():
            return
        while self.left > 0 and not conn.paused:
            n = min(BURST_BATCH, self.left)
            each = self.each
            for _ in range(n):
                transport.write(each)  # one send per chunk while the socket takes them
            conn.server.stats.chunks += n
            self.left -= n
            if self.left and not conn.paused:
                conn.server.loop.call_soon(self.burst)  # let other connections run
                return
        if self.left == 0:
            self.end()
        else:
            conn.on_resume = self.burst

    def end(self) -> None:
        transport = self.conn.transport
        assert transport is not None
        transport.write(self.last)
        transport.write(_chunk(b"data: [DONE]\n\n"))
        transport.write(b"0\r\n\r\n")
        self.conn.server.stats.chunks += 2
        transport.close()  # like llama-server: no keep-alive after a stream


class Server:
    def __init__(self, opts: dict[str, Any], port: int) -> None:
        self.opts = opts
        self.port = port
        self.loop = asyncio.get_running_loop()
        self.stats = Stats()
        self.steppers: dict[float, Stepper] = {}
        alias = opts["alias"]
        self.models = _dumps({
            "models": [{"name": alias, "model": alias, "type": "model"}],
            "object": "list",
            "data": [{"id": alias, "object": "model", "created": int(time.time()),
                      "owned_by": "llamacpp", "meta": None}]})
        self.props = _dumps({"default_generation_settings": {"n_ctx": 4096},
                             "model_alias": alias, "model_path": opts["model"],
                             "total_slots": 4, "build_info": "b0-paced"})

    def stepper(self, interval_ms: float) -> Stepper:
        found = self.steppers.get(interval_ms)
        if found is None:
            found = self.steppers[interval_ms] = Stepper(self.loop, interval_ms / 1000,
                                                         self.stats)
        return found


class Conn(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False  # a stream owns the connection
        self.paused = False
        self.on_resume: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        callback, self.on_resume = self.on_resume, None
        if callback is not None:
            callback()

    def data_received(self, data: bytes) -> None:
        if self.busy:
            return  # bytes after a streamed request: llama-server closes anyway
        buf = self.buf
        buf += data
        while not self.busy and self.transport is not None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self.transport.close()
                return
            lines = bytes(buf[:end]).split(b"\r\n")
            length, close = 0, False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection":
                    close = value.strip().lower() == b"close"
            if len(buf) < end + 4 + length:
                return
            body = bytes(buf[end + 4: end + 4 + length])
            del buf[: end + 4 + length]
            method, path = lines[0].split(b" ", 2)[:2]
            self.handle(method, path.split(b"?", 1)[0], body, close)

    def send(self, status: bytes, body: bytes, close: bool) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %s\r\n%s%sContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
                status, COMMON, b"Connection: close\r\n" if close else KEEP_ALIVE, JSON_TYPE,
                len(body), body))
        if close:
            self.transport.close()

    def handle(self, method: bytes, path: bytes, raw: bytes, close: bool) -> None:
        server = self.server
        if path in (b"/health", b"/v1/health"):
            self.send(b"200 OK", b'{"status":"ok"}', close)
        elif method == b"GET" and path in (b"/v1/models", b"/models"):
            self.send(b"200 OK", server.models, close)
        elif method == b"GET" and path in (b"/props", b"/v1/props"):
            self.send(b"200 OK", server.props, close)
        elif method == b"GET" and path == b"/paced/stats":
            self.send(b"200 OK", _dumps(vars(server.stats)), close)
        elif method == b"POST" and (path in _CHAT or path in _COMPLETIONS):
            try:
                body = json.loads(raw) if raw else {}
                if not isinstance(body, dict):
                    raise ValueError("not an object")
            except ValueError as error:
                self.send(b"400 Bad Request", _dumps({"error": {
                    "code": 400, "message": f"Failed to parse JSON: {error}",
                    "type": "invalid_request_error"}}), close)
                return
            tokens = int(body.get("max_tokens") or body.get("n_predict")
                         or server.opts["tokens"])
            chat = path in _CHAT
            if body.get("stream"):
                self.stream(body, max(tokens, 1), chat)
            else:
                self.answer(max(tokens, 1), chat, close)
        else:
            self.send(b"404 Not Found", _dumps({"error": {
                "code": 404, "message": "File Not Found", "type": "not_found_error"}}),
                close=True)

    def answer(self, tokens: int, chat: bool, close: bool) -> None:
        alias = self.server.opts["alias"]
        text = " tok" * tokens
        choice: dict[str, Any] = (
            {"finish_reason": "length", "index": 0,
             "message": {"role": "assistant", "content": text}} if chat else
            {"text": text, "index": 0, "logprobs": None, "finish_reason": "length"})
        self.send(b"200 OK", _dumps({
            "choices": [choice], "created": int(time.time()), "model": alias,
            "system_fingerprint": "b0-paced",
            "object": "chat.completion" if chat else "text_completion",
            "usage": {"completion_tokens": tokens, "prompt_tokens": 1,
                      "total_tokens": tokens + 1},
            "id": "chatcmpl-paced"}), close)

    def stream(self, body: dict[str, Any], tokens: int, chat: bool) -> None:
        server = self.server
        interval = body.get("paced_interval_ms", server.opts["interval_ms"])
        self.busy = True
        server.stats.streams += 1
        stream = Stream(self, tokens, chat, server.opts["alias"])
        stream.start()
        if interval <= 0:
            server.loop.call_soon(stream.burst)
        else:
            server.stepper(float(interval)).add(stream)


def _log(message: str) -> None:
    sys.stderr.write(f"srv  {message}\n")
    sys.stderr.flush()


async def _serve(opts: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in opts["host"] else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((opts["host"], opts["port"]))
    except OSError as error:
        _log(f"couldn't bind HTTP server socket, hostname: {opts['host']}, "
             f"port: {opts['port']}: {error}")
        raise SystemExit(1) from None
    port = sock.getsockname()[1]
    server = Server(opts, port)
    http = await loop.create_server(lambda: Conn(server), sock=sock, backlog=4096)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    _log("llama_server: model loaded")
    host = f"[{opts['host']}]" if ":" in opts["host"] else opts["host"]
    _log(f"llama_server: listening on http://{host}:{port}")
    await stop.wait()
    http.close()


def main(argv: list[str]) -> None:
    if {"-h", "--help", "--usage"} & set(argv):
        sys.stdout.write("----- paced llama-server stand-in: other flags are ignored -----\n\n")
        sys.stdout.write("".join(f"{option:<40}  {text}\n" for option, text in _HELP))
        return
    if "--version" in argv:
        sys.stderr.write("version: 0 (b0-paced)\n")
        return
    asyncio.run(_serve(parse_args(argv)))
    os._exit(0)  # open streams are not drained on SIGTERM


if __name__ == "__main__":
    main(sys.argv[1:])
