"""``swapd serve`` as a real process: signals, reload, exit status, no leftovers."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from swapd.config import parse_config
from swapd.core.process import free_port
from swapd.errors import StateDirBusy
from swapd.serve import _startup_cause, open_server
from tests.conftest import FAKE_LLAMA_SERVER
from tests.support.procs import MARKER_VAR, leftover_processes
from tests.test_api import config_text

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate: object, what: str, deadline_s: float = 20) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@contextmanager
def running_daemon(tmp_path: Path, *, env: dict[str, str] | None = None,
                   stderr: Any = subprocess.DEVNULL,
                   **config: Any) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """``swapd serve`` as its own process on a free port, listening; killed at the end."""
    port = free_port("127.0.0.1")
    text = json.loads(config_text(tmp_path, **config))
    text["listen"] = f"127.0.0.1:{port}"
    path = tmp_path / "swapd.yaml"
    path.write_text(json.dumps(text))
    proc = subprocess.Popen([sys.executable, "-m", "swapd", "serve", "--config", str(path)],
                            cwd=ROOT, env=env, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(url + "/health").status_code == 200, "swapd to listen")
        yield proc, url, path
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    with running_daemon(tmp_path, stderr=subprocess.PIPE) as (proc, url, path):
        try:
            yield proc, url, path
        finally:
            assert proc.stderr is not None
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stderr.close()


def test_sighup_reloads_and_sigterm_exits_cleanly(
        daemon: tuple[subprocess.Popen[bytes], str, Path]) -> None:
    proc, url, path = daemon
    loaded = httpx.post(url + "/swapd/load", json={"model": "a"}, timeout=30).json()
    child = loaded["pid"]

    config = json.loads(path.read_text())
    config["profiles"]["c"] = {"model": "c.gguf"}
    path.write_text(json.dumps(config))
    os.kill(proc.pid, signal.SIGHUP)
    wait_for(lambda: "c" in {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]},
             "the reloaded profile list")
    assert httpx.get(url + "/swapd/status").json()["pid"] == child  # kept serving

    path.write_text("profiles: {}\n")  # invalid: rejected, the old config stays
    os.kill(proc.pid, signal.SIGHUP)
    wait_for(lambda: httpx.get(url + "/health").status_code == 200, "swapd after a bad HUP")
    assert {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]} == {"a", "b", "c"}

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert not alive(child)
    assert proc.stderr is not None
    log = proc.stderr.read().decode()
    assert "reload rejected" in log and "SIGTERM: shutting down" in log


def test_sigint_with_nothing_loaded_exits_zero(
        daemon: tuple[subprocess.Popen[bytes], str, Path]) -> None:
    proc, _url, _path = daemon
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0


def test_second_signal_stops_at_once_and_still_kills_the_child(tmp_path: Path) -> None:
    with running_daemon(tmp_path, timeouts={"drain": "60s"},
                        a_flags={"fake-tokens": 100000, "fake-token-delay-ms": 10}
                        ) as (proc, url, _path):
        child = httpx.post(url + "/swapd/load", json={"model": "a"}, timeout=30).json()["pid"]
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=30, json={
                "model": "a", "stream": True,
                "messages": [{"role": "user", "content": "hi"}]}) as response:
            chunks = response.iter_raw()  # kept: a dropped iterator closes the stream
            next(chunks)  # a ~1000 s answer is in flight
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert proc.poll() is None  # draining: the stream may finish (up to 60 s)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) != 0  # stopped without waiting
        wait_for(lambda: not alive(child), "the child to be gone", 5)


def test_systemd_notifications_across_a_lifecycle(tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(20)

    def until(text: str) -> list[str]:
        seen = []
        while True:
            message = sock.recv(4096).decode()
            seen.append(message)
            if text in message:
                return seen

    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    with sock, running_daemon(tmp_path, env=env) as (proc, url, _path):
        first = until("READY=1")
        assert "STATUS=idle" in first[-1]
        child = httpx.post(url + "/swapd/load", json={"model": "a"}, timeout=30).json()["pid"]
        assert any("STATUS=ready a" in m for m in until("STATUS=ready a"))
        environ = Path(f"/proc/{child}/environ").read_bytes()
        assert b"NOTIFY_SOCKET" not in environ  # the child cannot speak for swapd
        os.kill(proc.pid, signal.SIGHUP)
        assert any("RELOADING=1" in m for m in until("READY=1"))
        proc.send_signal(signal.SIGTERM)
        until("STOPPING=1")
        assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize("problem", ["port", "key"])
def test_startup_failures_are_one_clear_line(tmp_path: Path, problem: str) -> None:
    config = json.loads(config_text(tmp_path))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        config["listen"] = f"127.0.0.1:{holder.getsockname()[1]}"
        if problem == "key":
            config["listen"] = f"127.0.0.1:{free_port('127.0.0.1')}"
            config["security"] = {"api_key_env": "SWAPD_TEST_NO_SUCH_KEY"}
        path = tmp_path / "swapd.yaml"
        path.write_text(json.dumps(config))
        env = {k: v for k, v in os.environ.items() if k != "SWAPD_TEST_NO_SUCH_KEY"}
        done = subprocess.run([sys.executable, "-m", "swapd", "serve", "--config", str(path)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("swapd: ")
    if problem == "port":
        assert "address already in use" in done.stderr.lower()
    else:
        assert "$SWAPD_TEST_NO_SUCH_KEY is empty or not set @ security.api_key_env" \
            in done.stderr


def test_sigterm_mid_stream_drains_then_exits_zero(tmp_path: Path) -> None:
    with running_daemon(tmp_path, a_flags={"fake-tokens": 60, "fake-token-delay-ms": 20}
                        ) as (proc, url, _path):
        child = httpx.post(url + "/swapd/load", json={"model": "a"}, timeout=30).json()["pid"]
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=30, json={
                "model": "a", "stream": True,
                "messages": [{"role": "user", "content": "hi"}]}) as response:
            chunks = response.iter_raw()
            received = next(chunks)
            proc.send_signal(signal.SIGTERM)  # ~1.2 s of answer still to come
            received += b"".join(chunks)
        assert received.rstrip().endswith(b"data: [DONE]")  # the answer was not cut
        assert proc.wait(timeout=30) == 0
        wait_for(lambda: not alive(child), "the child to be gone", 5)


def test_a_second_swapd_on_the_same_state_dir_refuses_and_touches_nothing(
        tmp_path: Path) -> None:
    with running_daemon(tmp_path) as (first, url, path):
        child = httpx.post(url + "/swapd/load", json={"model": "a"}, timeout=30).json()["pid"]
        config = json.loads(path.read_text())
        config["listen"] = f"127.0.0.1:{free_port('127.0.0.1')}"  # its own port: only
        second_path = tmp_path / "second.yaml"                      # state_dir is shared
        second_path.write_text(json.dumps(config))
        done = subprocess.run(
            [sys.executable, "-m", "swapd", "serve", "--config", str(second_path)],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1
        assert "Traceback" not in done.stderr
        assert done.stderr.startswith("swapd: ")
        assert f"in use by swapd pid {first.pid}" in done.stderr
        assert url.removeprefix("http://") in done.stderr  # where the first one listens
        status = httpx.get(url + "/swapd/status").json()
        assert status["pid"] == child and alive(child)  # the first one's model untouched
        answer = httpx.post(url + "/v1/chat/completions", timeout=30, json={
            "model": "a", "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 200
        assert httpx.get(url + "/swapd/status").json()["pid"] == child


async def test_open_server_takes_the_state_dir_lock(tmp_path: Path) -> None:
    config = parse_config(config_text(tmp_path), base_dir=tmp_path)
    async with open_server(config) as running:
        with pytest.raises(StateDirBusy, match=rf"in use by swapd pid {os.getpid()} "
                                               rf"\(listening on {running.urls[0]}\)"):
            async with open_server(config):
                pass
        assert running.supervisor.state.value == "idle"
    async with open_server(config):  # released on exit
        pass


async def test_a_full_state_dir_keeps_serving_and_counts_the_failed_writes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The child's log, its pidfile and the load times all fail with ENOSPC (their files
    point at /dev/full): every request is still answered, each kind warns once, and the
    metric counts every failure."""
    config = parse_config(config_text(tmp_path), base_dir=tmp_path)
    config.state_dir.mkdir(parents=True)
    for name in ("llama-server.log", "llama-server.tmp", "load_times.tmp"):
        (config.state_dir / name).symlink_to("/dev/full")
    async with open_server(config) as running, httpx.AsyncClient(
            base_url=running.url, timeout=30) as client:
        for model in ("a", "b", "a"):  # loads and swaps: many log lines, three pidfiles
            answer = await client.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": "hi"}]})
            assert answer.status_code == 200, answer.text
        metrics = (await client.get("/metrics")).text
        status = (await client.get("/swapd/status")).json()
    counts = {line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith("swapd_state_write_errors_total{")}
    assert counts["log"] >= 6 and counts["pidfile"] == 3 and counts["load_times"] == 3
    assert counts["slot_cache"] == 0
    assert status["state_write_errors"] == {k: int(v) for k, v in counts.items()}
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
              and "cannot write" in r.getMessage()]
    assert len(warned) == 3, warned  # once per kind, not once per line
    assert all("No space left on device (ENOSPC)" in w for w in warned)


@pytest.mark.parametrize(("error", "words"), [
    (OSError(errno.ENOSPC, "No space left on device", "/s/swapd.lock"),
     "No space left on device: /s/swapd.lock; the file system of state_dir (/s) is full"),
    (OSError(errno.EACCES, "Permission denied", "/s/swapd.lock"),
     "Permission denied: /s/swapd.lock; swapd's user cannot write to state_dir (/s)"),
    (OSError(errno.EADDRINUSE, "Address already in use"),
     "Address already in use: 127.0.0.1:9001 is taken by another process"),
    (OSError(errno.EACCES, "Permission denied"),
     "Permission denied: not allowed to listen on 127.0.0.1:9001"),
])
def test_a_startup_failure_names_its_real_cause(tmp_path: Path, error: OSError,
                                                words: str) -> None:
    config = parse_config("listen: 127.0.0.1:9001\nstate_dir: /s\nprofiles: {a: {model: a}}",
                          base_dir=tmp_path)
    cause = _startup_cause(BaseExceptionGroup("", [error]), config)
    assert cause is not None and cause.startswith(words)
    assert "another swapd" not in cause or error.errno == errno.EADDRINUSE


def children_of(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def fake_servers() -> list[int]:
    """Live fake llama-servers that this test run started."""
    return [pid for pid, cmdline in leftover_processes(os.environ[MARKER_VAR])
            if "fake_llama_server.py" in cmdline]


def test_a_wrapper_scripts_llama_server_is_reaped_by_the_next_swapd(tmp_path: Path) -> None:
    """A `command` that starts llama-server without exec: the kernel's death signal
    reaches only the wrapper, so when swapd is SIGKILLed the model lives on as an orphan.
    The next swapd on that state_dir stops it before it listens, so it never runs a
    second model beside it."""
    wrapper = tmp_path / "llama-wrapper.sh"
    wrapper.write_text(f'#!/bin/sh\n"{sys.executable}" "{FAKE_LLAMA_SERVER}" "$@"\n'
                       'status=$?\nexit $status\n')  # no exec: the server is a grandchild
    wrapper.chmod(0o755)
    command = {"command": [str(wrapper)]}
    with running_daemon(tmp_path, llama_server=command) as (first, url, _path):
        loaded = httpx.post(url + "/swapd/load", json={"model": "a"}, timeout=30).json()
        (model,) = children_of(loaded["pid"])
        assert fake_servers() == [model]
        first.kill()
        first.wait()
        wait_for(lambda: not alive(loaded["pid"]), "the wrapper to die with swapd", 5)
        assert alive(model)  # the orphan: the old code left it running here
    with running_daemon(tmp_path, llama_server=command) as (second, url, _path):
        assert not alive(model)  # stopped before the new swapd even listened
        loaded = httpx.post(url + "/swapd/load", json={"model": "a"}, timeout=30).json()
        assert fake_servers() == children_of(loaded["pid"])  # one model, the new one
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
    assert fake_servers() == []
