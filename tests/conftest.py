"""Shared fixtures, and the rules every test in this directory follows.

1. **Loopback only.** Servers bind 127.0.0.1; nothing reaches outside the machine.
2. **No fixed ports.** Bind port 0 (or use ``llama_server.port: auto``) and read the real
   port back, so tests never collide with each other or with a running swapd.
3. **Fake time for timing logic.** Queue waits, TTLs, backoff, grace periods and
   deadlines run on trio's ``autojump_clock`` and take milliseconds, however long the
   configured durations are.
4. **Real processes where processes are the point.** Starting, readiness, crashes,
   SIGTERM/SIGKILL escalation and process-group kills run against real child processes:
   ``tests/support/fake_llama_server.py`` for lifecycle and fault injection, the real
   ``llama-server`` on tiny generated models (``@pytest.mark.real_llama``) end to end.
   HTTP upstreams that are not about processes are faked with ``httpx.MockTransport``.
5. **No wall-clock asserts.** Real-time waits are *deadlines* that turn a hang into a
   failure, never measurements that a slow machine could break. Wait for events
   (a log line, a 200 from ``/health``, a process exit), not for sleeps.
6. **Every test leaves no process behind.** Each test run sets ``SWAPD_TEST_RUN`` to a
   fresh uuid in the environment, which every process it spawns inherits; after each
   test, the autouse ``no_leftover_processes`` fixture fails the test if any process
   carrying that marker is still alive (after giving owners ~2 s to reap them) and kills
   it. Session-scoped fixtures must not keep processes running between tests.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import llama_build
from tests.support.procs import MARKER_VAR, kill_leftovers, leftover_processes
from tests.support.tiny_gguf import write_tiny_llama

TEST_RUN_MARKER = uuid.uuid4().hex
os.environ[MARKER_VAR] = TEST_RUN_MARKER

SUPPORT_DIR = Path(__file__).resolve().parent / "support"
FAKE_LLAMA_SERVER = SUPPORT_DIR / "fake_llama_server.py"

LEFTOVER_GRACE_S = 2.0
"""Real time the owners of exiting processes get to reap them before a test fails."""

TINY_CONTEXT_LENGTH = 4096


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fail the test if it left a process running; kill what it left."""
    yield
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while leftover_processes(TEST_RUN_MARKER) and time.monotonic() < deadline:
        time.sleep(0.02)
    killed = kill_leftovers(TEST_RUN_MARKER)
    if killed:
        listing = "\n".join(f"  pid {pid}: {cmdline}" for pid, cmdline in killed)
        pytest.fail(
            f"the test left {len(killed)} process(es) running (now SIGKILLed):\n{listing}\n"
            "Stop every child you start, and its process group, before the test ends.",
            pytrace=False,
        )


@pytest.fixture
def fake_server_cmd() -> list[str]:
    """The argv prefix that runs the fake llama-server; append llama-server flags to it."""
    return [sys.executable, str(FAKE_LLAMA_SERVER)]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with two tiny real models, ``a.gguf`` and ``b.gguf`` (4096 context)."""
    directory = tmp_path_factory.mktemp("tiny-models")
    write_tiny_llama(directory / "a.gguf", seed=1, name="tiny-a",
                     context_length=TINY_CONTEXT_LENGTH)
    write_tiny_llama(directory / "b.gguf", seed=2, name="tiny-b",
                     context_length=TINY_CONTEXT_LENGTH)
    return directory


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    """The real llama-server binary, built on first use (about 8 minutes, once per machine)."""
    return llama_build.ensure_llama_server()
