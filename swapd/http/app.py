"""The HTTP front end: discovery probes, operations, metrics and the status page.

``create_app`` returns the ASGI callable hypercorn serves the requests the fast path
hands it (every request but inference POSTs, ``fastpath.py``). Nothing here touches process
state: reads look at the supervisor's status, changes are commands sent to it. Probes
never load, swap or unload anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import attrs
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from swapd import __version__
from swapd.config import Config, Profile, load_config
from swapd.core import ChildLog, State, Supervisor
from swapd.errors import ConfigError, LeaseError
from swapd.http import cors, llama_router, progress
from swapd.http.auth import Keys, load_keys
from swapd.http.catalog import ModelEntry, build_catalog, resolve_tagged
from swapd.http.fallback import FallbackChain
from swapd.http.fastpath import NATIVE_POSTS, OLLAMA_POSTS, RequestError, error_body, is_ollama_path
from swapd.http.proxy import parse_json_object
from swapd.observe.metrics import Metrics

log = logging.getLogger(__name__)

OLLAMA_API_VERSION = "0.12.6"
"""The Ollama release whose API shapes the ``/api/*`` probes follow (clients check it)."""

SSE_KEEPALIVE = 15.0

LAST_SEND_TIMEOUT = 5.0
"""The shielded last send of an answer (see ``_shield_last_send``) gives up after this."""

LOG_LINES = 200
"""Lines ``/swapd/logs`` answers without ``?lines=``."""

PROPS_TIMEOUT = 5.0
"""Seconds ``/props`` waits for a ready child's own answer before describing the profile."""


@attrs.define
class Frontend:
    """What the routes read: the supervisor (for state) and the catalog (for metadata)."""

    supervisor: Supervisor
    catalog: dict[str, ModelEntry]
    child_log: ChildLog | None = None
    fallbacks: FallbackChain = attrs.field(factory=lambda: FallbackChain(()))
    metrics: Metrics = attrs.field(
        default=attrs.Factory(lambda self: Metrics(self.supervisor), takes_self=True))
    keys: Keys = attrs.field(factory=Keys)
    config_path: Path | None = None
    started: float = attrs.field(factory=time.time)

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file and apply it by diff; the old one stays on error."""
        if self.config_path is None:
            raise ConfigError(["swapd was started without a config file; nothing to reload"])
        config = await trio.to_thread.run_sync(load_config, self.config_path)
        keys = load_keys(config.security)
        catalog = await trio.to_thread.run_sync(build_catalog, config)
        old = self.config
        for key, what in (("listen", "the listen address"), ("state_dir", "state_dir")):
            if getattr(old, key) != getattr(config, key):
                log.warning("%s changed; restart swapd to apply it", what)
        summary = await self.supervisor.reload(config)
        self.catalog, self.keys = catalog, keys
        self.fallbacks.replace(config.fallbacks)
        return summary

    @property
    def config(self) -> Config:
        return self.supervisor.config

    def entry(self, name: str | None) -> ModelEntry | None:
        """The profile a probe asks about: name, alias, ``name:latest``; '' = active."""
        if not name:
            active = self.supervisor.active
            return self.catalog.get(active.name) if active else None
        _, resolved = resolve_tagged(self.config, name)
        return self.catalog.get(resolved.name) if isinstance(resolved, Profile) else None

    def context(self, entry: ModelEntry) -> tuple[int, str]:
        """The context one request gets, and where that figure comes from: ``live``,
        what the profile's child reported at its last load, else ``computed`` from the
        flags and the GGUF header (the catalog's). Slots split a context, so this is
        what a prompt must fit in, not the ``ctx-size`` flag."""
        live = self.supervisor.contexts.get(entry.name)
        if live is not None and self.config.profiles.get(entry.name) == entry.profile:
            return live, "live"
        return entry.context_length, "computed"

    def memory(self, entry: ModelEntry) -> dict[str, Any] | None:
        """The profile's VRAM estimate, with a verdict when the GPU memory is known."""
        estimate = entry.estimate
        if estimate is None:
            return None
        if not estimate.sized:
            return {"problem": estimate.problem}
        gpu = self.config.memory.gpu
        return {"weights": estimate.weights, "kv_cache": estimate.kv_cache,
                "compute": estimate.compute, "runtime": estimate.runtime,
                "total": estimate.total, "gpu": gpu,
                "fits": estimate.fits(gpu) if gpu else None}

    def status_of(self, name: str) -> str:
        """One profile's status, whatever else is resident: loaded, loading, unloaded."""
        state = self.supervisor.profile_state(name).value
        return {"ready": "loaded", "starting": "loading"}.get(state, "unloaded")

    def router_status(self, name: str) -> dict[str, Any]:
        """``status_of`` as llama.cpp's router lists it: an object, with the exit code
        of a failed profile's last start or child (``llama_router.status_object``)."""
        sup = self.supervisor
        if sup.profile_state(name) is not State.FAILED:
            return llama_router.status_object(self.status_of(name))
        return llama_router.status_object(self.status_of(name), failed=True,
                                          exit_code=sup.failed_exit_code(name))


def create_app(frontend: Frontend) -> QuartTrio:
    app = QuartTrio(__name__, static_folder=None)
    # Generations and streams last as long as they last; queue_wait bounds the waiting.
    # Bodies reach Quart already read (BodyReader, within timeouts.body): its own
    # BODY_TIMEOUT is only a second line.
    app.config.update(RESPONSE_TIMEOUT=None, BODY_TIMEOUT=frontend.config.timeouts.body,
                      MAX_CONTENT_LENGTH=frontend.config.security.max_body)
    _discovery_routes(app, frontend)
    _operations_routes(app, frontend)
    _llama_router_routes(app, frontend)
    _page_routes(app)
    _inference_routes(app)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        """Quart's own 404/405/413 as OpenAI-shaped JSON, like every other error here
        (Ollama's ``{"error": "..."}`` under its ``/api/``)."""
        status = error.code or 500
        if is_ollama_path(request.path):
            response = _json({"error": f"{error.name}: {request.method} "
                                       f"{_shown(request.path)}".lower()}, status)
            if isinstance(error, MethodNotAllowed) and error.valid_methods:
                response.headers["Allow"] = ", ".join(sorted(error.valid_methods))
            return response
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
            status, "http_error")
        response = _openai_error(
            status, f"{error.name}: {request.method} {_shown(request.path)}",
            "server_error" if status >= 500 else "invalid_request_error", code)
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            response.headers["Allow"] = ", ".join(sorted(error.valid_methods))
        return response

    @app.errorhandler(RequestError)
    async def request_error(error: RequestError) -> Response:
        if is_ollama_path(request.path):
            return _json({"error": str(error)}, error.status)
        return _openai_error(error.status, str(error), "invalid_request_error", error.code)
    return app


def served_app(frontend: Frontend) -> Any:
    """The ASGI callable hypercorn serves: the Quart app, with the last send of every
    answer shielded (``_shield_last_send`` says why) and CORS headers on every answer
    to an allowed origin (``swapd/http/cors.py``)."""
    quart: Any = create_app(frontend)
    cached: tuple[Config | None, cors.Policy] = (None, cors.Policy())

    def cors_headers(scope: Any) -> list[tuple[bytes, bytes]]:
        nonlocal cached
        config = frontend.config
        if cached[0] is not config:  # the first request, or one after a reload
            cached = (config, cors.policy(config))
        return cors.answer_headers(cached[1], scope["headers"])

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await quart(scope, receive, send)
            return
        await quart(scope, receive, _with_headers(_shield_last_send(send),
                                                  cors_headers(scope)))

    return asgi


def _with_headers(send: Any, headers: list[tuple[bytes, bytes]]) -> Any:
    """``send``, with ``headers`` (CORS) added to the response head."""
    if not headers:
        return send

    async def send_with_headers(message: Any) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *headers]}
        await send(message)

    return send_with_headers


def _shield_last_send(send: Any) -> Any:
    """Send a response's last message in a (bounded) shield.

    That send is where hypercorn ends the connection (the fast path hands it over for
    one request, to close after). Quart-trio cancels its request nursery as soon as the
    answer is out, and that cancel reaches hypercorn's close of the socket as it starts:
    the connection would then stay open, with nothing more to serve, until the client
    gave up.
    """

    async def send_last_shielded(message: Any) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            with trio.CancelScope(shield=True) as scope:
                scope.relative_deadline = LAST_SEND_TIMEOUT
                await send(message)
        else:
            await send(message)

    return send_last_shielded


def _json(obj: Any, status: int = 200) -> Response:
    return Response(json.dumps(obj), status=status, mimetype="application/json")


def _openai_error(status: int, message: str, type_: str, code: str) -> Response:
    return Response(error_body(message, type_, code), status=status,
                    mimetype="application/json")


_SHOWN = 200
"""Characters of a client's path or name quoted back in an error message."""


def _shown(text: str) -> str:
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


async def _json_body() -> dict[str, Any]:
    """The request's body as a JSON object, ``{}`` when there is none.

    Anything else is a ``RequestError`` (400 ``invalid_json``): a body that is not JSON,
    is not an object, or nests too deeply to read.
    """
    body = await request.get_data(cache=True, as_text=False, parse_form_data=False)
    return parse_json_object(body) if body.strip() else {}


_MAX_DIGITS = 18
"""Digits of a query number read as written; longer ones are beyond any real value."""


def _int_arg(name: str, minimum: int) -> int | None:
    """Query parameter ``name`` as an integer of at least ``minimum``; None if absent.

    Junk is a 400 ``invalid_parameter``, not silently the default: ``lines=-5`` used to
    read as "all but the first five".
    """
    raw = request.args.get(name)
    if raw is None:
        return None
    digits = raw.removeprefix("-")
    value: int | None = None
    if digits.isascii() and digits.isdecimal():
        # More digits than any count or sequence number: as good as infinite (and int()
        # refuses strings past sys.get_int_max_str_digits).
        value = int(raw) if len(digits) <= _MAX_DIGITS else (
            -sys.maxsize if raw.startswith("-") else sys.maxsize)
    if value is None or value < minimum:
        raise RequestError(400, f"?{name}= must be a whole number of at least {minimum}, "
                           f"not {_shown(raw)!r}", "invalid_parameter")
    return value


def _name_field(body: dict[str, Any], *fields: str) -> str | None:
    """The first of ``fields`` that ``body`` sets; a 400 when it is not a string."""
    for field in fields:
        value = body.get(field)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise RequestError(400, f"'{field}' must be a string", "invalid_model")
        return value
    return None


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp or time.time(), UTC).isoformat()


def _digest(entry: ModelEntry) -> str:
    return hashlib.sha256(f"{entry.name}\0{entry.profile.model}".encode()).hexdigest()


def _capabilities(entry: ModelEntry) -> list[str]:
    caps = ["completion"]
    if entry.profile.flags.get("jinja") is True:
        caps.append("tools")
    if entry.profile.flags.get("embeddings") is True or entry.profile.flags.get(
            "embedding") is True:
        caps.append("embedding")
    return caps


def _discovery_routes(app: QuartTrio, fe: Frontend) -> None:
    def openai_model(entry: ModelEntry) -> dict[str, Any]:
        profile = entry.profile
        n_ctx, source = fe.context(entry)
        return {
            "id": entry.name,
            "object": "model",
            "created": int(entry.modified or fe.started),
            "owned_by": "swapd",
            "name": profile.label,
            "aliases": list(profile.aliases),
            "context_length": n_ctx,  # per request: what one prompt plus answer may use
            "context_source": source,
            "max_model_len": n_ctx,
            "status": fe.router_status(entry.name),  # llama.cpp's router: an object
            "meta": {"n_ctx": n_ctx, "size": entry.file_size},
            "memory": fe.memory(entry),
            # llama.cpp's router fields, for its clients (Open WebUI, its web UI).
            "tags": [],
            "architecture": llama_router.architecture(profile),
            "source": "preset",
            "can_remove": False,
        }

    async def list_models() -> Response:
        return _json({"object": "list",
                      "data": [openai_model(e) for e in fe.catalog.values()]})

    app.route("/v1/models")(list_models)
    app.route("/models", endpoint="models_plain")(list_models)

    @app.route("/v1/models/<path:model_id>")
    async def get_model(model_id: str) -> Response:
        entry = fe.entry(model_id)
        if entry is None:
            return _openai_error(404, f"model {model_id!r} is not configured; available: "
                                 f"{', '.join(fe.config.model_names())}",
                                 "invalid_request_error", "model_not_found")
        return _json(openai_model(entry))

    def ollama_details(entry: ModelEntry) -> dict[str, Any]:
        return {"parent_model": "", "format": "gguf", "family": entry.architecture,
                "families": [entry.architecture],
                "parameter_size": entry.profile.flags.get("size_label") or "",
                "quantization_level": ""}

    def ollama_model(entry: ModelEntry) -> dict[str, Any]:
        return {"name": entry.name, "model": entry.name, "modified_at": _iso(entry.modified),
                "size": entry.file_size, "digest": _digest(entry),
                "details": ollama_details(entry)}

    @app.route("/api/tags")
    async def ollama_tags() -> Response:
        return _json({"models": [ollama_model(e) for e in fe.catalog.values()]})

    @app.route("/api/show", methods=["GET", "POST"])
    async def ollama_show() -> Response:
        if request.method == "POST":
            name = _name_field(await _json_body(), "model", "name") or ""
        else:
            name = request.args.get("model") or request.args.get("name") or ""
        entry = fe.entry(str(name))
        if entry is None:
            what = f"model '{name}' not found" if name else "no model is loaded"
            return _json({"error": what}, 404)
        n = fe.context(entry)[0]
        arch = entry.architecture
        return _json({
            "license": "",
            "modelfile": f"FROM {entry.profile.model}\nPARAMETER num_ctx {n}\n",
            "parameters": f"num_ctx {n}",
            "template": "{{ .Prompt }}",
            "details": ollama_details(entry),
            "model_info": {"general.architecture": arch, f"{arch}.context_length": n,
                           "general.basename": entry.model_name or entry.name},
            "capabilities": _capabilities(entry),
            "modified_at": _iso(entry.modified),
        })

    @app.route("/api/ps")
    async def ollama_ps() -> Response:
        loaded = []
        sup = fe.supervisor
        for row in sup.resident():
            # .get: a reload may have removed a running profile (it unloads once idle).
            entry = fe.catalog.get(row["name"])
            if entry is None or row["state"] != "ready":
                continue
            profile = entry.profile
            ttl = sup.idle_ttl(profile.name)  # the TTL, or a client's keep_alive
            # Ollama reports a far-future time for "never unloads".
            expires = (_iso(time.time() + ttl) if ttl is not None and not profile.pinned
                       else "2318-01-01T00:00:00+00:00")
            footprint = row["footprint"]
            size = footprint["measured"] or row["planned"] or footprint["estimate"]
            loaded.append({**ollama_model(entry), "expires_at": expires,
                           "size_vram": size or entry.file_size,
                           "context_length": fe.context(entry)[0]})
        return _json({"models": loaded})

    @app.route("/api/version")
    async def ollama_version() -> Response:
        return _json({"version": OLLAMA_API_VERSION})

    @app.route("/api/v1/models")
    async def lmstudio_models() -> Response:
        models = []
        for entry in fe.catalog.values():
            loaded = fe.status_of(entry.name) == "loaded"
            n_ctx = fe.context(entry)[0]
            models.append({
                "type": "llm", "publisher": "swapd", "key": entry.name,
                "display_name": entry.profile.label, "architecture": entry.architecture,
                "format": "gguf", "size_bytes": entry.file_size,
                "max_context_length": n_ctx,
                "loaded_instances": [{"id": entry.name, "config": {
                    "context_length": n_ctx}}] if loaded else [],
            })
        return _json({"models": models})

    async def props() -> Response:
        name = request.args.get("model") or ""
        entry = fe.entry(name)
        if entry is None and name:
            return _openai_error(404, f"model {name!r} is not configured",
                                 "invalid_request_error", "model_not_found")
        sup = fe.supervisor
        if entry is None:  # nothing loaded and no name: describe the first profile
            entry = next(iter(fe.catalog.values()))
        # Ask the child only under a lease, and only if it is ready anyway: a probe
        # for /props never loads, queues for or holds up a swap.
        async with sup.try_lease(entry.name) as lease:
            if lease is not None:
                try:
                    live = None
                    with lease.scope, trio.fail_after(PROPS_TIMEOUT):
                        live = await lease.proc.client.get("/props")
                    if live is not None:
                        return Response(live.content, status=live.status_code,
                                        mimetype="application/json")
                except (trio.TooSlowError, OSError, Exception):
                    pass
        return _json({
            "default_generation_settings": {"n_ctx": fe.context(entry)[0], "params": {}},
            "total_slots": entry.slots,
            "model_alias": entry.name,
            "model_path": str(entry.profile.model),
            "modalities": {"vision": False, "audio": False},
            "build_info": f"swapd {__version__} (model not loaded)",
        })

    app.route("/props")(props)
    app.route("/v1/props", endpoint="v1_props")(props)

    @app.route("/version")
    async def version() -> Response:
        return _json({"version": __version__, "name": "swapd"})

    @app.route("/v1")
    async def v1_info() -> Response:
        return _json({"object": "swapd", "version": __version__,
                      "models": len(fe.catalog), "state": fe.supervisor.state.value})

    @app.route("/health")
    async def health() -> Response:
        sup = fe.supervisor
        return _json({"status": "ok", "state": sup.state.value,
                      "model": sup.active.name if sup.active else None})


def _page_routes(app: QuartTrio) -> None:
    """The status page: static files shipped in the package (no build step, no CDN)."""
    ui = resources.files("swapd.http") / "ui"
    types = {".html": "text/html", ".js": "text/javascript", ".css": "text/css",
             ".svg": "image/svg+xml"}  # Quart adds the charset

    async def page(name: str = "index.html") -> Response:
        target = ui / name
        suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
        if "/" in name or name.startswith(".") or suffix not in types or not target.is_file():
            return _openai_error(404, f"Not Found: {request.method} {_shown(request.path)}",
                                 "invalid_request_error", "not_found")
        return Response(target.read_bytes(), mimetype=types[suffix])

    app.route("/")(page)
    app.route("/ui/", endpoint="ui_index")(page)
    app.route("/ui/<name>", endpoint="ui_file")(page)


def _inference_routes(app: QuartTrio) -> None:
    """The inference proxy's paths, in the URL map so that routing knows them.

    ``asgi`` hands every POST to these paths to the proxy before Quart sees it, so the
    view never runs. The rules are here so that any other method on them is a 405 with
    ``Allow: POST`` (not a 404), a 405 on ``/v1/models`` lists POST too, and anything
    that walks the URL map (the key tests) finds the inference routes as well.
    """

    async def inference(anything: str = "") -> Response:
        # Unreachable: only a POST routes here, and asgi() sends those to the proxy.
        return _openai_error(404, f"Not Found: {request.method} {_shown(request.path)}",
                             "invalid_request_error", "not_found")

    app.add_url_rule("/v1/<path:anything>", "inference", inference, methods=["POST"])
    for path in sorted(NATIVE_POSTS | OLLAMA_POSTS):
        app.add_url_rule(path, f"inference {path}", inference, methods=["POST"])


def _operations_routes(app: QuartTrio, fe: Frontend) -> None:
    @app.route("/swapd/status")
    async def status() -> Response:
        sup = fe.supervisor
        return _json({
            "version": __version__,
            **sup.status(),
            "requests": fe.metrics.requests_by_model(),
            "fallbacks": fe.fallbacks.status(),
            "profiles": {name: {"status": fe.status_of(name),
                                "display_name": e.profile.label,
                                "context_length": (context := fe.context(e))[0],
                                "context_source": context[1],
                                "aliases": list(e.profile.aliases),
                                "memory": fe.memory(e),
                                "footprint": sup.footprint_of(name)}
                         for name, e in fe.catalog.items()},
        })

    @app.route("/swapd/load", methods=["POST"])
    async def load() -> Response:
        name = _name_field(await _json_body(), "model") or request.args.get("model")
        if not name:
            return _openai_error(400, "name the profile to load: {\"model\": \"NAME\"}",
                                 "invalid_request_error", "model_required")
        timeouts = fe.config.timeouts
        # An operator asked for this load: wait as long as one may take (drain the
        # running model, stop it, start this one), not just a request's queue_wait.
        wait = max(timeouts.queue_wait, timeouts.drain + timeouts.stop + timeouts.start)
        try:
            async with fe.supervisor.lease(name, queue_wait=wait) as lease:
                return _json({"status": "loaded", "model": lease.profile.name,
                              "pid": lease.proc.pid})
        except LeaseError as error:
            return _openai_error(error.status, str(error), error.type, error.code)

    @app.route("/metrics")
    async def metrics() -> Response:
        return Response(fe.metrics.render(),
                        mimetype="text/plain; version=0.0.4; charset=utf-8")

    @app.route("/swapd/reload", methods=["POST"])
    async def reload() -> Response:
        try:
            return _json({"status": "reloaded", **await fe.reload()})
        except ConfigError as error:
            log.error("reload rejected; the running config stays:\n%s", error)
            return _openai_error(400, str(error), "invalid_request_error", "invalid_config")
        except LeaseError as error:  # swapd is shutting down
            return _openai_error(error.status, str(error), error.type, error.code)

    @app.route("/swapd/unload", methods=["POST"])
    async def unload() -> Response:
        sup = fe.supervisor
        name = _name_field(await _json_body(), "model", "name") or request.args.get("model")
        try:
            finished = await (sup.unload(name) if name else sup.unload())
        except LeaseError as error:  # no such profile
            return _openai_error(error.status, str(error), error.type, error.code)
        if not finished:
            status = sup.status()
            pid = f"pid {status['pid']}, " if status["pid"] else ""
            running = (f"{status['active'] or 'no model'} ({pid}state {status['state']}, "
                       f"{status['inflight']} request(s) in flight)")
            return _openai_error(
                504, f"the unload did not finish within {sup.unload_timeout:g}s (drain, "
                f"cache save, stop); still running: {running}; see swapd status and "
                "swapd logs", "timeout_error", "unload_timeout")
        if name:
            resolved = sup.config.resolve(name)
            shown = resolved.name if isinstance(resolved, Profile) else name
            return _json({"status": "unloaded", "model": shown,
                          "state": sup.profile_state(shown).value})
        return _json({"status": "unloaded", "state": sup.state.value})

    @app.route("/swapd/logs")
    async def logs() -> Response:
        lines = fe.child_log.lines if fe.child_log else ()
        count = _int_arg("lines", minimum=1) or LOG_LINES
        return Response("\n".join(list(lines)[-count:]) + "\n", mimetype="text/plain")

    @app.route("/swapd/logs/stream")
    async def logs_stream() -> Response:
        child_log = fe.child_log

        async def lines() -> AsyncIterator[bytes]:
            if child_log is None:
                return
            seen = child_log.written
            while True:
                if child_log.written == seen:  # look before waiting (see events below)
                    with trio.move_on_after(SSE_KEEPALIVE) as waited:
                        await child_log.wait_changed()
                    if waited.cancelled_caught:
                        yield b": keepalive\n\n"
                    continue
                new = min(child_log.written - seen, len(child_log.lines))
                seen = child_log.written
                for line in list(child_log.lines)[-new:]:
                    yield b"data: " + json.dumps(line).encode() + b"\n\n"

        return _sse(lines())

    @app.route("/swapd/events")
    async def events() -> Response:
        sup = fe.supervisor

        since = _int_arg("since", minimum=-1)

        async def stream() -> AsyncIterator[bytes]:
            # ?since=SEQ replays what a reconnecting client missed (as far as kept).
            # Taken before the first yield: a client that acts on the snapshot (POSTs a
            # load) must see every event that follows it.
            seen = since if since is not None else (sup.events[-1].seq if sup.events else 0)
            yield b"data: " + json.dumps({"kind": "status", **sup.status()}).encode() + b"\n\n"
            while True:
                fresh = [e for e in sup.events if e.seq > seen]
                if not fresh:
                    # Look before waiting: events published while this generator was
                    # suspended in a yield already set (and replaced) the Event.
                    with trio.move_on_after(SSE_KEEPALIVE) as waited:
                        await sup.wait_changed()
                    if waited.cancelled_caught:
                        yield b": keepalive\n\n"
                    continue
                for event in fresh:
                    seen = event.seq
                    yield b"data: " + json.dumps(
                        {"seq": event.seq, "at": event.at, "kind": event.kind, **event.data}
                    ).encode() + b"\n\n"

        return _sse(stream())


def _llama_router_routes(app: QuartTrio, fe: Frontend) -> None:
    """llama.cpp's router API (``swapd/http/llama_router.py``): its answers and errors."""

    def llama_error(status: int, message: str) -> Response:
        return Response(llama_router.error_body(status, message), status=status,
                        mimetype="application/json")

    async def named_profile() -> Profile | str | Response:
        """The profile the body's ``model`` names; the name if none; or the error."""
        body = await request.get_data(cache=True, as_text=False, parse_form_data=False)
        try:
            name = llama_router.model_field(parse_json_object(body))
        except RequestError as error:
            return llama_error(400, str(error))
        resolved = fe.config.resolve(name) if name else None
        return resolved if isinstance(resolved, Profile) else name

    def not_found(name: str) -> str:
        what = f"{_shown(name)!r} is not configured" if name else (
            "name it in the body: {\"model\": \"NAME\"}")
        return f"model is not found: {what}; available: {', '.join(fe.config.model_names())}"

    @app.route("/models/load", methods=["POST"])
    async def router_load() -> Response:
        # llama.cpp answers at once; the load goes on, reported on /models/sse.
        profile = await named_profile()
        if isinstance(profile, Response):
            return profile
        if isinstance(profile, str):
            return llama_error(404, not_found(profile))
        status = fe.status_of(profile.name)
        if status in ("loaded", "loading"):
            return llama_error(400, f"model is already running: {profile.name!r} is {status}")
        refusal = await fe.supervisor.load(profile.name)
        if refusal is not None:
            return llama_error(refusal.status, str(refusal))
        return _json({"success": True})

    @app.route("/models/unload", methods=["POST"])
    async def router_unload() -> Response:
        # Like llama.cpp's: answered once the stop is asked for, reported on /models/sse.
        profile = await named_profile()
        if isinstance(profile, Response):
            return profile
        if isinstance(profile, str):  # llama.cpp says 400 here, 404 on a load
            return llama_error(400, not_found(profile))
        status = fe.status_of(profile.name)
        if status not in ("loaded", "loading"):
            return llama_error(400, f"model is not running: {profile.name!r} is {status}")
        try:
            await fe.supervisor.unload(profile.name, wait=False)
        except LeaseError as error:
            return llama_error(error.status, str(error))
        return _json({"success": True})

    @app.route("/models", methods=["POST", "DELETE"], endpoint="router_manage")
    async def router_manage() -> Response:
        # llama.cpp's router downloads (POST) and deletes (DELETE) model files here; Open
        # WebUI always shows both controls. swapd's models are its config's profiles.
        verb = "download" if request.method == "POST" else "delete"
        return llama_error(501, f"swapd does not {verb} models: they are the profiles of its "
                           "config file; add or remove one there and reload (swapd reload)")

    @app.route("/models/sse")
    async def router_events() -> Response:
        sup = fe.supervisor
        # Taken before the answer starts: a client that subscribes, then loads, sees
        # every record of that load.
        start = sup.events[-1].seq if sup.events else 0

        async def stream() -> AsyncIterator[bytes]:
            seen = start
            now = trio.current_time()
            next_sample, next_keepalive = now, now + SSE_KEEPALIVE
            while True:
                fresh = [e for e in sup.events if e.seq > seen]
                if fresh and fresh[0].seq > seen + 1:  # fell behind what is kept
                    yield llama_router.sse(llama_router.RELOAD)  # the client re-lists
                    next_keepalive = trio.current_time() + SSE_KEEPALIVE
                for event in fresh:
                    seen = event.seq
                    for record in llama_router.records(event):
                        yield llama_router.sse(record)
                        next_keepalive = trio.current_time() + SSE_KEEPALIVE
                    if event.kind == "shutdown":
                        return
                # Samples and keep-alives keep their own times: events that give no
                # record (a request queued, a phase) must not put them off.
                loading = [c.name for c in sup.children() if c.state is State.STARTING]
                now = trio.current_time()
                if loading and now >= next_sample:
                    next_sample = now + llama_router.PROGRESS_INTERVAL
                    for name in loading:
                        value = progress.load_fraction(*sup.load_progress(name))
                        if value is not None:
                            yield llama_router.sse(llama_router.progress_record(name, value))
                            next_keepalive = trio.current_time() + SSE_KEEPALIVE
                if trio.current_time() >= next_keepalive:
                    yield b": keepalive\n\n"
                    next_keepalive = trio.current_time() + SSE_KEEPALIVE
                if any(e.seq > seen for e in sup.events):
                    continue  # published while a yield was suspended: no wait
                with trio.move_on_at(min(next_sample, next_keepalive) if loading
                                     else next_keepalive):
                    await sup.wait_changed()

        return _sse(stream())


def _sse(body: AsyncIterator[bytes]) -> Response:
    response = Response(body, mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    response.timeout = None
    return response


def frontend_for(config: Config, supervisor: Supervisor, child_log: ChildLog | None = None,
                 fallbacks: FallbackChain | None = None,
                 config_path: Path | None = None) -> Frontend:
    """Build the front end's state (reads GGUF headers and key files: call off-loop)."""
    return Frontend(supervisor, build_catalog(config), child_log,
                    fallbacks or FallbackChain(config.fallbacks), keys=load_keys(config.security),
                    config_path=config_path)
