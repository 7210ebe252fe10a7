"""The systemd notify protocol against real unix datagram sockets, watchdog on fake time."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from swapd.observe.notify import Notifier, status_text


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd, and its NOTIFY_SOCKET value."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    with sock:
        yield sock, str(path)


def received(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on ``sock``, without blocking."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(5)


def test_messages_are_one_datagram_each(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready()
    assert notifier.status("ready qwen")
    assert notifier.stopping()
    assert notifier.watchdog()
    assert notifier.ready(status="idle")
    assert notifier.extend_timeout(1.5)
    assert received(sock) == [b"READY=1", b"STATUS=ready qwen", b"STOPPING=1",
                              b"WATCHDOG=1", b"READY=1\nSTATUS=idle",
                              b"EXTEND_TIMEOUT_USEC=1500000"]
    notifier.close()


def test_reloading_carries_the_monotonic_time(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier(path)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    [datagram] = received(sock)
    reloading, monotonic = datagram.decode().split("\n")
    assert reloading == "RELOADING=1"
    key, _, usec = monotonic.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(usec) <= after


def test_abstract_socket_address() -> None:
    name = f"swapd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": "@" + name})
        assert notifier.address == "\0" + name
        assert notifier.ready()
        assert received(sock) == [b"READY=1"]


def test_status_is_one_line_and_not_repeated(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier(path)
    assert notifier.status("failed a: exited\nwith code 1")
    assert not notifier.status("failed a: exited with code 1")  # same text: not re-sent
    assert notifier.status("x" * 500)
    first, long = received(sock)
    assert first == b"STATUS=failed a: exited with code 1"
    assert long.startswith(b"STATUS=xxx") and len(long.decode()) == len("STATUS=") + 200


def test_without_notify_socket_everything_is_a_noop() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.status("idle")
    assert not notifier.stopping()
    assert not notifier.reloading()
    assert not notifier.watchdog()


def test_environment_is_unset_so_children_do_not_inherit_it(
        monkeypatch: pytest.MonkeyPatch, listener: tuple[socket.socket, str]) -> None:
    _sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier.from_environment()
    assert notifier.address == path and notifier.watchdog_seconds == 30.0
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & os.environ.keys()
    kept = {"NOTIFY_SOCKET": path}
    Notifier.from_environment(kept, unset=False)
    assert kept == {"NOTIFY_SOCKET": path}


@pytest.mark.parametrize(("env", "seconds"), [
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<self>"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_settings(env: dict[str, str], seconds: float | None) -> None:
    env = {k: str(os.getpid()) if v == "<self>" else v for k, v in env.items()}
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": "/run/x", **env})
    assert notifier.watchdog_seconds == seconds


def test_unusable_notify_socket_values_disable_notification() -> None:
    assert Notifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1234"}).address is None
    assert Notifier.from_environment({"NOTIFY_SOCKET": "@"}).address is None


def test_send_failures_never_raise_and_log_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING, logger="swapd.observe.notify"):
        assert not notifier.ready()
        assert not notifier.status("idle")
        assert not notifier.watchdog()
    warnings = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1


def test_a_full_receive_queue_drops_instead_of_blocking(
        listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier(path)
    results = [notifier.status(f"state {i}") for i in range(5000)]  # nobody reads them
    assert results[0] and not results[-1]  # the queue filled up; later sends were dropped
    assert received(sock)[0] == b"STATUS=state 0"


async def test_watchdog_pings_every_half_timeout(
        listener: tuple[socket.socket, str], autojump_clock: trio.testing.MockClock) -> None:
    sock, path = listener
    notifier = Notifier(path, watchdog_seconds=30.0)
    pings: list[float] = []
    start = trio.current_time()
    receiver = trio.socket.from_stdlib_socket(sock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(notifier.run_watchdog)
        with trio.move_on_after(100):
            while True:
                assert await receiver.recv(64) == b"WATCHDOG=1"
                pings.append(trio.current_time() - start)
        nursery.cancel_scope.cancel()
    assert pings == [0.0, 15.0, 30.0, 45.0, 60.0, 75.0, 90.0]


async def test_watchdog_returns_at_once_without_a_timeout(
        listener: tuple[socket.socket, str], autojump_clock: trio.testing.MockClock) -> None:
    _sock, path = listener
    start = trio.current_time()
    await Notifier(path).run_watchdog()
    await Notifier(None, watchdog_seconds=30.0).run_watchdog()
    assert trio.current_time() == start


async def test_status_updates_follow_changes(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier(path)
    state = ["idle"]
    changed = trio.Event()

    async def wait_changed() -> None:
        nonlocal changed
        await changed.wait()
        changed = trio.Event()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(notifier.run_status_updates, lambda: state[0], wait_changed)
        await trio.testing.wait_all_tasks_blocked()
        for new in ("starting a", "starting a", "ready a"):
            state[0] = new
            changed.set()
            await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert received(sock) == [b"STATUS=idle", b"STATUS=starting a", b"STATUS=ready a"]


def test_status_text() -> None:
    assert status_text("ready", "qwen") == "ready qwen"
    assert status_text("idle", None) == "idle"
    assert status_text("failed", None, last_error="profile 'a': exited") == \
        "failed: profile 'a': exited"
    assert status_text("ready", "a", last_error="old news") == "ready a"
