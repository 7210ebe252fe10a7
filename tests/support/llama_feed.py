"""A reader for llama.cpp's ``GET /models/sse`` feed, as its clients read it.

llama.cpp's web UI (``tools/ui/src/lib/services/models.service.ts``) splits the stream
into records on blank lines and JSON-decodes each record's ``data:`` payload, ignoring
records without one (comments). ``Feed`` does the same in a background task and lets a
test wait, within a real-time deadline, for the record it expects.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import trio

FEED_TIMEOUT = 30.0
"""Real-time deadline for an expected record: turns a hang into a failure."""


@attrs.define
class Feed:
    records: list[dict[str, Any]] = attrs.field(factory=list)
    odd_lines: list[str] = attrs.field(factory=list)  # neither data, comment nor blank
    headers: dict[str, str] = attrs.field(factory=dict)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, match: Callable[[dict[str, Any]], bool],
                       after: int = 0) -> int:
        """Index of the first record from ``after`` on that ``match`` accepts."""
        with trio.fail_after(FEED_TIMEOUT):
            while True:
                for index in range(after, len(self.records)):
                    if match(self.records[index]):
                        return index
                await self._changed.wait()

    async def wait_status(self, model: str, status: str, after: int = 0) -> int:
        return await self.wait_for(
            lambda r: r.get("model") == model
            and (r.get("data") or {}).get("status") == status, after)

    def of(self, model: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("model") == model]


@asynccontextmanager
async def open_feed(client: httpx.AsyncClient,
                    headers: dict[str, str] | None = None) -> AsyncIterator[Feed]:
    """Follow ``/models/sse`` until the block ends; subscribed once this yields."""
    feed = Feed()

    async def read(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with client.stream("GET", "/models/sse", headers=headers,
                                 timeout=httpx.Timeout(10, read=None)) as response:
            assert response.status_code == 200, response.status_code
            feed.headers = dict(response.headers)
            task_status.started()
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    feed.add(json.loads(line[len("data: "):]))
                elif line and not line.startswith(":"):
                    feed.odd_lines.append(line)

    async with trio.open_nursery() as nursery:
        with trio.fail_after(FEED_TIMEOUT):
            await nursery.start(read)
        yield feed
        nursery.cancel_scope.cancel()
