"""The connection to a running swapd: one httpx client, its errors turned into messages and
exit codes, and the ``/swapd/events`` stream read as SSE.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any, TextIO

import attrs
import httpx
import trio

CONNECT_TIMEOUT = 5.0
"""Seconds to reach swapd; waits after that (a load, a stream) are unbounded."""


class ClientError(Exception):
    """A client command cannot go on: ``message`` for stderr, ``exit_status`` to exit."""

    def __init__(self, message: str, exit_status: int = 1) -> None:
        super().__init__(message)
        self.exit_status = exit_status


@attrs.define
class Remote:
    """A running swapd as the client sees it: where it is, the key, and where to print."""

    url: str
    key: str | None
    out: TextIO
    err: TextIO

    def client(self) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        return httpx.AsyncClient(
            base_url=self.url, headers=headers,
            timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT))

    def print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    async def get_json(self, client: httpx.AsyncClient, path: str) -> dict[str, Any]:
        response = await client.get(path)
        self.check(response)
        body = response.json()
        if not isinstance(body, dict):
            raise ClientError(f"swapd at {self.url} answered {path} with {body!r}")
        return body

    def check(self, response: httpx.Response) -> None:
        """Raise ``ClientError`` for a refused key (2) or any other error answer (1)."""
        if response.is_success:
            return
        message = error_message(response)
        if response.status_code in (401, 403):
            hint = ("the key was refused" if self.key else
                    "swapd requires a key: pass --key or set SWAPD_ADMIN_KEY")
            raise ClientError(f"swapd at {self.url} refused {response.request.url.path} "
                              f"({response.status_code}: {message}); {hint}", 2)
        if response.status_code == 404 and not _is_api_error(response):
            raise ClientError(f"{self.url} has no {response.request.url.path} (404); is it "
                              "swapd, and is --url right?", 2)
        raise ClientError(message)


def _is_api_error(response: httpx.Response) -> bool:
    """Whether an error answer is swapd's own (OpenAI-shaped JSON), not a missing route."""
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("error"), dict)


def error_message(response: httpx.Response) -> str:
    """The message of an error answer: OpenAI-shaped, Ollama-shaped, or the text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str) and error:
            return error
    text = response.text.strip()
    return text[:1000] if text else f"HTTP {response.status_code} {response.reason_phrase}"


async def _follow_events(client: httpx.AsyncClient, handle: Callable[[dict[str, Any]], None],
                         *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                         ) -> None:
    """Feed ``/swapd/events`` to ``handle``; started once the stream is open. Best effort:
    progress is a nicety, so a server without the stream just shows none."""
    started = False
    try:
        async with client.stream("GET", "/swapd/events") as response:
            if response.is_success:
                async for event in _sse_data(response):
                    if not started:  # the first event is the snapshot: we are subscribed
                        task_status.started()
                        started = True
                    if isinstance(event, dict):
                        handle(event)
    except (httpx.HTTPError, ValueError):
        pass
    finally:
        if not started:
            task_status.started()


async def _sse_data(response: httpx.Response) -> AsyncIterator[Any]:
    """The decoded ``data:`` payloads of an SSE stream (comments skipped)."""
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            yield json.loads(line[5:].strip())
