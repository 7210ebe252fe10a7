"""Every error swapd raises on purpose, in one place.

    SwapdError
    ├── ConfigError            the manifest is invalid; carries every problem found
    ├── StateDirBusy           another swapd holds ``state_dir`` (its pid, where it listens)
    ├── StartError             a llama-server did not become ready
    │   ├── StartFailed        it exited during start (exit code + stderr tail)
    │   └── StartTimeout       it was not healthy within ``timeouts.start``
    ├── ModelCrashed           it exited while serving (in-flight requests get 502)
    │   └── ModelHung          it stopped answering its health check: swapd killed it
    ├── LeaseError             a request could not get its model
    │   ├── UnknownModel       404: no profile, alias or fallback has that name
    │   ├── NoModelLoaded      400: the request named no model and none is loaded
    │   ├── QueueFull          429: ``queue.max_waiting`` requests already wait
    │   ├── QueueTimeout       504: the model was not ready within ``timeouts.queue_wait``
    │   └── Unavailable        503: nothing can serve it (says what was tried)
    │       ├── LocalFailed    the local start failed: the fallback chain may serve it
    │       ├── CircuitOpen    local starts of the profile are paused: fallbacks may serve it
    │       └── WontFit        the planner: it cannot fit beside pinned models or at all
    ├── NotReadyNow            (internal) the model is not ready this moment: no lease
    └── ShuttingDown           503: swapd is stopping

    ValueError
    └── ModelLayoutError       a GGUF header swapd's reader cannot read (the estimate says so)
        └── ModelFileError     not a model at all: missing, unreadable, not a GGUF

Messages name the object and, where there is one, the fix. Each ``LeaseError`` knows the
HTTP status and OpenAI error ``type``/``code`` it becomes, so the front end maps errors to
responses in one place.
"""

from __future__ import annotations

from collections.abc import Sequence


class SwapdError(Exception):
    """Base of all swapd errors."""


class ConfigError(SwapdError):
    """The configuration is invalid. ``problems`` lists each one as ``message @ path``."""

    def __init__(self, problems: Sequence[str], source: str = "config") -> None:
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s):\n{lines}")


class StateDirBusy(SwapdError):
    """Another swapd owns ``state_dir``: a second one must not touch its files or child."""

    def __init__(self, state_dir: str, pid: int | None, listen: str | None) -> None:
        self.state_dir = state_dir
        self.pid = pid
        self.listen = listen
        who = f"swapd pid {pid}" if pid is not None else "another swapd"
        where = f" (listening on {listen})" if listen else ""
        super().__init__(
            f"state_dir {state_dir} is in use by {who}{where}; stop that one first, or give "
            "this one a state_dir of its own")


class StartError(SwapdError):
    """A llama-server did not become ready."""

    def __init__(self, profile: str, message: str, *, exit_code: int | None = None,
                 stderr_tail: Sequence[str] = ()) -> None:
        self.profile = profile
        self.exit_code = exit_code
        self.stderr_tail = list(stderr_tail)
        tail = ("\n" + "\n".join(self.stderr_tail)) if self.stderr_tail else ""
        super().__init__(f"profile {profile!r}: {message}{tail}")


class StartFailed(StartError):
    """The child exited before it became ready."""


class StartTimeout(StartError):
    """The child did not pass its health check within the start deadline."""


class ModelCrashed(SwapdError):
    """The child exited while it was serving requests."""

    def __init__(self, profile: str, exit_code: int | None, stderr_tail: Sequence[str] = (),
                 how: str | None = None) -> None:
        self.profile = profile
        self.exit_code = exit_code
        self.stderr_tail = list(stderr_tail)
        super().__init__(
            f"model {profile!r} {how or f'exited with code {exit_code}'} while serving")


class ModelHung(ModelCrashed):
    """The child stopped answering while it was serving; swapd killed it."""

    def __init__(self, profile: str, why: str, stderr_tail: Sequence[str] = ()) -> None:
        self.profile = profile
        self.exit_code = None
        self.stderr_tail = list(stderr_tail)
        SwapdError.__init__(self, f"model {profile!r} stopped answering its health check "
                                  f"({why}); swapd killed it")


class LeaseError(SwapdError):
    """A request could not be given its model; maps to one HTTP error response."""

    status = 503
    type = "server_error"
    code = "unavailable"
    retry_after: float | None = None


class UnknownModel(LeaseError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, name: str, available: Sequence[str]) -> None:
        self.name = name
        super().__init__(
            f"model {name!r} is not configured; available: {', '.join(available) or 'none'}")


class NoModelLoaded(LeaseError):
    status = 400
    type = "invalid_request_error"
    code = "model_required"

    def __init__(self, available: Sequence[str]) -> None:
        super().__init__(
            "the request names no 'model' and none is loaded; "
            f"name one of: {', '.join(available) or 'none'}")


class QueueFull(LeaseError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, max_waiting: int, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(
            f"{max_waiting} requests are already waiting for a model (queue.max_waiting); "
            "retry later")


class QueueTimeout(LeaseError):
    status = 504
    type = "timeout_error"
    code = "model_not_ready"

    def __init__(self, profile: str, waited: float) -> None:
        self.profile = profile
        super().__init__(
            f"model {profile!r} was not ready within {waited:g}s (timeouts.queue_wait)")


class Unavailable(LeaseError):
    """503: the model cannot be served; the message says what was tried and why."""


class LocalFailed(Unavailable):
    """The profile's llama-server failed to start; its error is the cause."""

    def __init__(self, error: StartError) -> None:
        self.error = error
        super().__init__(str(error))


class CircuitOpen(Unavailable):
    """Too many consecutive failures of a profile: no local start until the cooldown ends."""

    code = "circuit_open"

    def __init__(self, profile: str, failures: int, retry_in: float,
                 last_error: str | None) -> None:
        self.profile = profile
        self.retry_after = max(1.0, retry_in)
        why = f"; last error: {last_error}" if last_error else ""
        super().__init__(
            f"profile {profile!r} failed {failures} times in a row (restart.max_failures); "
            f"local starts are paused for {retry_in:.0f}s more{why}")


class WontFit(Unavailable):
    """The residency planner found no way to fit the model, even with every evictable
    model gone; the message has the numbers. Fallbacks may serve it."""

    code = "model_too_large"

    def __init__(self, profile: str, reason: str) -> None:
        self.profile = profile
        super().__init__(f"model {profile!r} cannot be loaded here: {reason}")


class NotReadyNow(LeaseError):
    """``Supervisor.try_lease``: the model is not ready this moment (nothing queued).

    Internal (``/props`` then describes the profile instead); if it ever reached a
    client it would read like a queue timeout: not ready, retry later."""

    status = 504
    type = "timeout_error"
    code = "model_not_ready"


class ShuttingDown(LeaseError):
    code = "shutting_down"

    def __init__(self) -> None:
        super().__init__("swapd is shutting down")


class ModelLayoutError(ValueError):
    """The file is not a GGUF swapd's GGUF reader can read; the message says why."""


class ModelFileError(ModelLayoutError):
    """Not a model at all: the file (or a shard) is missing, unreadable or not a GGUF.

    Unlike a header swapd cannot fully parse (a newer quantization, say), this
    means llama-server cannot load it either, so a start may be refused up front.
    """
