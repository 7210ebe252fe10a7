"""``swapd status|load|unload|logs|events`` against a real swapd with fake children.

swapd runs in-process (the test's trio run); each command runs ``cli.main`` in a worker
thread, as a separate program would, with its own trio run and its own output buffers.
Timings here are deadlines only.
"""

from __future__ import annotations

import io
import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing

from swapd import cli
from swapd.cli import format_duration, format_event, format_status, main
from swapd.config import parse_config
from swapd.serve import Running, open_server
from tests.test_api import config_text

FAILING = {"fake-exit-at-start": 1, "fake-stderr": "error: invalid argument: --bogus"}


@attrs.frozen
class Result:
    status: int
    out: str
    err: str


async def swapd_cli(*argv: str, out: io.StringIO | None = None) -> Result:
    """Run ``swapd ARGV...`` in a thread, as its own program would; capture its output
    (in ``out``, if given, so that the test can watch it while the command runs)."""
    out, err = out or io.StringIO(), io.StringIO()
    status = await trio.to_thread.run_sync(partial(main, list(argv), out=out, err=err))
    return Result(status, out.getvalue(), err.getvalue())


@asynccontextmanager
async def swapd(tmp_path: Path, **kwargs: Any) -> AsyncIterator[Running]:
    config = parse_config(config_text(tmp_path, **kwargs), base_dir=tmp_path)
    async with open_server(config) as running:
        yield running


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_status_shows_state_active_model_and_profiles(tmp_path: Path) -> None:
    async with swapd(tmp_path) as running:
        idle = await swapd_cli("status", "--url", running.url)
        assert idle.status == 0, idle.err
        assert "state      idle\n" in idle.out
        assert "requests   0 in flight; waiting: none" in idle.out
        loaded = await swapd_cli("load", "a", "--url", running.url)
        assert loaded.status == 0, loaded.err
        result = await swapd_cli("status", "--url", running.url)
        pid = running.supervisor.proc.pid  # type: ignore[union-attr]
        lines = result.out.splitlines()
        assert lines[0] == f"swapd 0.1.0 at {running.url}"
        assert lines[1].startswith(f"state      ready: a (pid {pid}, port ")
        assert "circuits   all closed" in lines
        table = lines[lines.index("") + 1:]
        assert table[0].split() == ["PROFILE", "STATUS", "CONTEXT", "LAST", "LOAD", "ALIASES"]
        assert table[1].split()[:3] == ["a", "loaded", "8192"]
        assert table[1].split()[-1] == "alpha"
        assert table[2].split() == ["b", "unloaded", "4096", "-"]
        raw = await swapd_cli("status", "--json", "--url", running.url)
        status = json.loads(raw.out)
        assert status["state"] == "ready" and status["active"] == "a" and status["pid"] == pid


async def test_load_shows_each_phase_of_a_swap(tmp_path: Path) -> None:
    async with swapd(tmp_path) as running:
        first = await swapd_cli("load", "alpha", "--url", running.url)  # an alias
        assert first.status == 0, first.err
        assert "loading a… " in first.out
        assert "(first load: no estimate yet)" in first.out
        assert first.out.splitlines()[-1].startswith("a ready in ")

        swap = await swapd_cli("load", "b", "--url", running.url)
        assert swap.status == 0, swap.err
        lines = swap.out.splitlines()
        assert lines[0] == "stopping a…"
        assert lines[1].startswith("stopped a in ")
        assert lines[2].startswith("loading b… "), swap.out
        pid_b = running.supervisor.proc.pid  # type: ignore[union-attr]
        assert lines[-1].startswith("b ready in ") and lines[-1].endswith(f"(pid {pid_b})")

        # The second load of a: its last load time gives a percentage and an ETA.
        again = await swapd_cli("load", "a", "--url", running.url)
        assert again.status == 0, again.err
        progress = [line for line in again.out.splitlines() if line.startswith("loading a… ")]
        # (How many follow is up to the machine's speed: LoadView's own test counts them.)
        assert progress and progress[0].startswith("loading a… 0% (ETA "), again.out
        assert again.out.splitlines()[-1].startswith("a ready in ")

        already = await swapd_cli("load", "a", "--url", running.url)
        assert already.status == 0
        assert already.out == f"a is loaded (pid {running.supervisor.proc.pid})\n"  # type: ignore[union-attr]


async def test_failed_load_exits_1_with_exit_code_and_output(tmp_path: Path) -> None:
    async with swapd(tmp_path, a_flags=FAILING) as running:
        result = await swapd_cli("load", "a", "--url", running.url)
        assert result.status == 1
        assert "loading a failed (exit code 1)" in result.out
        err = result.err.splitlines()
        assert err[0].startswith(
            "swapd load: profile 'a': llama-server exited with code 1 during start")
        assert "  | error: invalid argument: --bogus" in err

        status = await swapd_cli("status", "--url", running.url)
        assert "state      failed" in status.out
        [error] = [line for line in status.out.splitlines() if line.startswith("last error")]
        assert error.startswith(
            "last error profile 'a': llama-server exited with code 1 during start")
        assert "           | error: invalid argument: --bogus" in status.out


async def test_unknown_profile_is_an_error_naming_the_choices(tmp_path: Path) -> None:
    async with swapd(tmp_path) as running:
        result = await swapd_cli("load", "nope", "--url", running.url)
        assert result.status == 1
        assert result.err.startswith(
            "swapd load: model 'nope' is not configured; available: a, ")
        assert len(result.err.splitlines()) == 1
        assert running.supervisor.proc is None


async def test_unload(tmp_path: Path) -> None:
    async with swapd(tmp_path) as running:
        nothing = await swapd_cli("unload", "--url", running.url)
        assert (nothing.status, nothing.out) == (0, "nothing is loaded (state: idle)\n")
        assert (await swapd_cli("load", "b", "--url", running.url)).status == 0
        result = await swapd_cli("unload", "--url", running.url)
        assert (result.status, result.out) == (0, "unloaded b (state: idle)\n")
        assert running.supervisor.proc is None


async def test_logs_tail_and_follow(tmp_path: Path) -> None:
    # drain: 1s, so that shutting swapd down ends the follower's stream promptly.
    async with swapd(tmp_path, timeouts={"drain": "1s"}) as running:
        assert (await swapd_cli("load", "a", "--url", running.url)).status == 0
        tail = await swapd_cli("logs", "-n", "3", "--url", running.url)
        assert tail.status == 0
        assert len(tail.out.splitlines()) == 3
        assert "listening on http://127.0.0.1:" in tail.out

        results: list[Result] = []
        out = io.StringIO()

        async def follow() -> None:
            results.append(await swapd_cli("logs", "-f", "-n", "1", "--url", running.url,
                                           out=out))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            await wait_for(lambda: "listening" in out.getvalue())  # the tail: following now
            assert (await swapd_cli("load", "b", "--url", running.url)).status == 0
            await wait_for(lambda: out.getvalue().count("listening") == 2)  # b's too
            running.shutdown.set()
    [followed] = results
    assert followed.status == 2
    lines = followed.out.splitlines()
    assert "listening on http://127.0.0.1:" in lines[0]  # -n 1: a's last line
    assert any("b.gguf" in line for line in lines[1:])  # then b's start, as it happened
    assert followed.err.endswith("is it running? (systemctl status swapd)\n")


async def test_events_follow_a_load(tmp_path: Path) -> None:
    results: list[Result] = []
    out = io.StringIO()
    async with swapd(tmp_path, timeouts={"drain": "1s"}) as running, \
            trio.open_nursery() as nursery:

        async def follow() -> None:
            results.append(await swapd_cli("events", "--json", "--url", running.url, out=out))

        nursery.start_soon(follow)
        await wait_for(lambda: '"status"' in out.getvalue())  # the snapshot: following now
        assert (await swapd_cli("load", "b", "--url", running.url)).status == 0
        await wait_for(lambda: '"ready"' in out.getvalue())
        running.shutdown.set()
    [result] = results
    events = [json.loads(line) for line in result.out.splitlines()]
    assert events[0]["kind"] == "status" and events[0]["state"] == "idle"
    kinds = [(e["kind"], e.get("profile")) for e in events[1:]]
    assert ("starting", "b") in kinds and ("ready", "b") in kinds
    assert kinds.index(("starting", "b")) < kinds.index(("ready", "b"))


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def run_view(view: cli.LoadView, events: list[tuple[float, dict[str, Any]]]) -> None:
    """Feed ``events`` to ``view`` at their (fake) times while its ticker runs."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(view.run_ticker)
        start = trio.current_time()
        for at, event in events:
            await trio.sleep_until(start + at)
            view.on_event(event)
        nursery.cancel_scope.cancel()


async def test_load_progress_counts_up_to_the_last_load_time(
        autojump_clock: trio.testing.MockClock) -> None:
    out = io.StringIO()
    view = cli.LoadView(cli.Remote("http://x", None, out, io.StringIO()), "b")
    view.on_event({"kind": "status", "state": "ready", "active": "a"})
    await run_view(view, [
        (0.0, {"kind": "stopping", "profile": "a"}),
        (0.5, {"kind": "stopped", "profile": "a"}),
        (0.5, {"kind": "starting", "profile": "b", "expected_seconds": 10.0}),
        (9.0, {"kind": "ready", "profile": "b", "pid": 7, "load_seconds": 8.5}),
    ])
    assert out.getvalue().splitlines() == [
        "stopping a…",
        "stopped a in 0.50s",
        "loading b… 0% (ETA 10s)",
        "loading b… 15% (ETA 8.5s)",  # the ticker: every PROGRESS_LINE_INTERVAL (2 s)
        "loading b… 35% (ETA 6.5s)",
        "loading b… 55% (ETA 4.5s)",
        "loading b… 75% (ETA 2.5s)",
        "b ready in 8.5s (pid 7)",
    ]
    assert view.settled.is_set()


async def test_load_progress_joins_a_load_under_way_and_outlasts_its_estimate(
        autojump_clock: trio.testing.MockClock) -> None:
    out = Terminal()
    view = cli.LoadView(cli.Remote("http://x", None, out, io.StringIO()), "b")
    # swapd was already 3 s into loading b when the command started
    view.on_event({"kind": "status", "state": "starting", "active": "b",
                   "load_elapsed": 3.0, "load_expected": 4.0})
    await run_view(view, [
        (2.05, {"kind": "start_failed", "profile": "b", "exit_code": 1}),
    ])
    frames = out.getvalue().split("\r")
    assert frames[1] == "loading b… 75% (ETA 1.0s)\x1b[K"  # redrawn in place on a terminal
    assert frames[-1] == ("loading b… 5.0s (longer than the last load, 4.0s)\x1b[K\n"
                          "loading b failed (exit code 1)\n")
    assert len(frames) == 1 + 1 + 10  # the first frame, then one per 0.2 s


def test_events_are_one_readable_line_each() -> None:
    line = format_event({"seq": 3, "at": 0.0, "kind": "ready", "profile": "b", "pid": 42,
                         "load_seconds": 0.31234})
    assert line.split()[1:] == ["ready", "b", "pid=42", "load_seconds=0.312"]
    failed = format_event({"kind": "start_failed", "profile": "a", "exit_code": 1,
                           "message": "exited with code 1"})
    assert failed.endswith('start_failed  a exit_code=1 message="exited with code 1"')
    snapshot = format_event({"kind": "status", "state": "ready", "active": "a"})
    assert snapshot.split()[1:] == ["status", "ready", "a"]


async def test_unreachable_swapd_is_one_clear_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for argv in (["status"], ["load", "a"], ["unload"], ["logs"], ["events"]):
        result = await swapd_cli(*argv, "--url", url)
        assert result.status == 2, argv
        assert result.err.startswith(f"swapd is not reachable at {url}: ")
        assert result.err.endswith("; is it running? (systemctl status swapd)\n")
        assert len(result.err.splitlines()) == 1


async def test_a_required_admin_key_is_sent_or_its_absence_explained(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWAPD_TEST_ADMIN_KEY", "s3cret")
    monkeypatch.delenv("SWAPD_ADMIN_KEY", raising=False)
    async with swapd(tmp_path, security={"admin_key_env": "SWAPD_TEST_ADMIN_KEY"}) as running:
        refused = await swapd_cli("load", "a", "--url", running.url)
        assert refused.status == 2
        assert refused.err.startswith(
            f"swapd load: swapd at {running.url} refused /swapd/status (401: ")
        assert refused.err.endswith(
            "swapd requires a key: pass --key or set SWAPD_ADMIN_KEY\n")
        assert running.supervisor.proc is None
        loaded = await swapd_cli("load", "a", "--key", "s3cret", "--url", running.url)
        assert loaded.status == 0, loaded.err
        assert loaded.out.splitlines()[-1].startswith("a ready in ")


def test_url_and_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.headers.get("authorization") != "Bearer s3cret":
            return httpx.Response(401, json={"error": {"message": "missing or bad key",
                                                       "type": "auth", "code": "bad_key"}})
        return httpx.Response(200, json={"state": "idle", "active": None, "profiles": {}})

    real_client = cli.Remote.client

    def mocked(self: cli.Remote) -> httpx.AsyncClient:
        client = real_client(self)
        client._transport = httpx.MockTransport(handler)
        return client

    monkeypatch.setattr(cli.Remote, "client", mocked)
    monkeypatch.setenv("SWAPD_URL", "swapd.lan:9001")
    monkeypatch.delenv("SWAPD_ADMIN_KEY", raising=False)

    out, err = io.StringIO(), io.StringIO()
    assert main(["status"], out=out, err=err) == 2
    assert str(seen[-1].url) == "http://swapd.lan:9001/swapd/status"
    assert err.getvalue() == (
        "swapd status: swapd at http://swapd.lan:9001 refused /swapd/status (401: missing or "
        "bad key); swapd requires a key: pass --key or set SWAPD_ADMIN_KEY\n")

    err = io.StringIO()
    assert main(["status", "--key", "wrong"], out=out, err=err) == 2
    assert "the key was refused" in err.getvalue()

    monkeypatch.setenv("SWAPD_ADMIN_KEY", "s3cret")
    out = io.StringIO()
    assert main(["status"], out=out, err=io.StringIO()) == 0
    assert "state      idle" in out.getvalue()


def test_status_table_shows_circuits_errors_and_fallbacks() -> None:
    lines = format_status({
        "version": "0.1.0", "state": "starting", "active": "big", "pid": 7, "port": 4000,
        "uptime": None, "inflight": 0, "waiting": {"big": 2}, "draining": False,
        "load_elapsed": 3.0, "load_expected": 10.0,
        "last_error": {"profile": "bad", "message": "profile 'bad': llama-server exited "
                       "with code 1 during start", "exit_code": 1,
                       "stderr_tail": ["error: invalid argument: --x"]},
        "circuits": {"bad": {"state": "open", "failures": 3, "last_error": "exited"}},
        "swaps": 4, "starts_failed": 3, "crashes": 0,
        "fallbacks": [{"name": "openrouter", "model": "m", "base_url": "https://o/v1",
                       "healthy": False, "problem": "timed out", "served": 2}],
        "profiles": {"big": {"status": "loading", "context_length": 65536, "aliases": []}},
        "load_seconds": {"big": 10.0},
    }, url="http://h:9001")
    assert lines[1] == "state      starting: big (pid 7, port 4000)"
    assert lines[2] == "loading    loading big… 30% (ETA 7.0s)"
    assert lines[3] == "requests   0 in flight; waiting: big 2"
    assert "circuit    bad open after 3 failures in a row: exited" in lines
    assert "           | error: invalid argument: --x" in lines
    assert ("fallback   openrouter -> m at https://o/v1 (down: timed out, served 2)"
            in lines)
    assert lines[-1].split() == ["big", "loading", "65536", "10.00s"]


@pytest.mark.parametrize(("seconds", "text"), [
    (0.314, "0.31s"), (4.25, "4.2s"), (42.4, "42s"), (185, "3m05s"), (7620, "2h07m"),
])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_check_and_serve_still_parse() -> None:
    assert main(["serve"]) == 2  # --config is required
    assert main(["load"]) == 2  # PROFILE is required
    assert main([]) == 2


async def wait_for(condition: Callable[[], bool], deadline: float = 10.0) -> None:
    with trio.fail_after(deadline):
        while not condition():
            await trio.sleep(0.01)


def test_unload_reports_a_failed_state_cleared_and_an_unload_that_did_not_finish(
        monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {"/swapd/status": httpx.Response(200, json={"state": "failed", "active": None,
                                                          "inflight": 0})}
    posted: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            posted.append(request.url.path)
        return answers[request.url.path]

    real_client = cli.Remote.client

    def mocked(self: cli.Remote) -> httpx.AsyncClient:
        client = real_client(self)
        client._transport = httpx.MockTransport(handler)
        return client

    monkeypatch.setattr(cli.Remote, "client", mocked)
    answers["/swapd/unload"] = httpx.Response(200, json={"status": "unloaded", "state": "idle"})
    out, err = io.StringIO(), io.StringIO()
    assert main(["unload", "--url", "http://swapd"], out=out, err=err) == 0
    assert posted == ["/swapd/unload"]  # after a crash, unload clears the failed state
    assert out.getvalue() == "nothing was running; cleared the failed state (state: idle)\n"

    answers["/swapd/status"] = httpx.Response(200, json={"state": "ready", "active": "a",
                                                         "inflight": 0})
    answers["/swapd/unload"] = httpx.Response(504, json={"error": {
        "message": "the unload did not finish within 167s (drain, cache save, stop); still "
                   "running: a (pid 7, state stopping, 0 request(s) in flight)",
        "type": "timeout_error", "code": "unload_timeout"}})
    out, err = io.StringIO(), io.StringIO()
    assert main(["unload", "--url", "http://swapd"], out=out, err=err) == 1
    assert out.getvalue() == ""
    assert err.getvalue().startswith("swapd unload: the unload did not finish within 167s")
    assert "still running: a (pid 7, state stopping" in err.getvalue()
