"""The process layer against real child processes (the fake llama-server).

Real time is used only as deadlines that turn a hang into a failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import trio

from swapd.core import process
from swapd.core.footprint import Footprint
from swapd.errors import StartFailed, StartTimeout
from tests.conftest import FAKE_LLAMA_SERVER

HOST = "127.0.0.1"


def fake_argv(port: int, *extra: str) -> list[str]:
    return [sys.executable, str(FAKE_LLAMA_SERVER), "--model", "m.gguf", "--host", HOST,
            "--port", str(port), "--alias", "m", *extra]


async def start(*extra: str, nursery: trio.Nursery, start_timeout: float = 10,
                log: process.ChildLog | None = None) -> process.LlamaProcess:
    port = process.free_port(HOST)
    proc = process.spawn("m", fake_argv(port, *extra), host=HOST, port=port, log_sink=log)
    nursery.start_soon(proc.watch)
    await proc.wait_ready(start_timeout, 0.02)
    return proc


def group_alive(pgid: int) -> bool:
    """Any non-zombie process in group ``pgid``? (Reparented zombies may never be reaped.)"""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            return True
    return False


async def test_ready_only_after_health_passes(tmp_path: Path) -> None:
    log = process.ChildLog(tmp_path / "child.log", max_bytes=1 << 20, tail_lines=100)
    async with trio.open_nursery() as nursery:
        proc = await start("--fake-load-ms", "300", nursery=nursery, log=log)
        assert proc.ready_at is not None
        assert proc.ready_at - proc.started_at >= 0.3  # not before the load finished
        response = await proc.client.get("/health")
        assert response.status_code == 200
        assert await proc.stop(5) == 0
    log.close()
    assert any("model loaded" in line for line in log.lines)
    assert "model loaded" in (tmp_path / "child.log").read_text()


async def test_exit_during_start_reports_code_and_stderr() -> None:
    async with trio.open_nursery() as nursery:
        with pytest.raises(StartFailed) as caught:
            await start("--fake-exit-at-start", "7", "--fake-stderr",
                        "error: invalid argument: --bogus", nursery=nursery)
    error = caught.value
    assert error.exit_code == 7
    assert "exited with code 7 during start" in str(error)
    assert any("invalid argument: --bogus" in line for line in error.stderr_tail)


async def test_never_healthy_hits_the_start_deadline() -> None:
    async with trio.open_nursery() as nursery:
        port = process.free_port(HOST)
        proc = process.spawn("m", fake_argv(port, "--fake-never-healthy"), host=HOST,
                             port=port)
        nursery.start_soon(proc.watch)
        with pytest.raises(StartTimeout, match=r"not healthy within 0.5s \(timeouts.start\)"):
            await proc.wait_ready(0.5, 0.02)
        await proc.stop(5)
    assert not proc.alive


async def test_sigterm_ignoring_child_is_killed_after_grace() -> None:
    async with trio.open_nursery() as nursery:
        proc = await start("--fake-ignore-sigterm", nursery=nursery)
        code = await proc.stop(grace=0.3)
    assert code == -signal.SIGKILL
    assert not group_alive(proc.pid)


async def test_a_stopped_child_is_continued_so_it_acts_on_sigterm() -> None:
    async with trio.open_nursery() as nursery:
        proc = await start(nursery=nursery)
        os.kill(proc.pid, signal.SIGSTOP)  # a stopped process only sees SIGTERM later
        code = await proc.stop(grace=20)
    assert code == 0  # SIGTERM acted on (the fake's clean exit), not SIGKILL after grace
    assert not group_alive(proc.pid)


async def test_the_liveness_probe_tells_a_stopped_child_from_a_live_one() -> None:
    async with trio.open_nursery() as nursery:
        proc = await start(nursery=nursery)
        assert await proc.answers_health(5)
        heard = proc.last_heard
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            assert not await proc.answers_health(0.3)
            assert proc.last_heard == heard  # nothing came back
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert await proc.answers_health(5)
        await proc.stop(grace=5)


async def test_stop_kills_grandchildren_in_the_group() -> None:
    async with trio.open_nursery() as nursery:
        proc = await start("--fake-grandchild", nursery=nursery)
        assert group_alive(proc.pid)
        await proc.stop(grace=5)
    with trio.fail_after(5):
        while group_alive(proc.pid):
            await trio.sleep(0.01)


async def test_missing_command_is_a_clear_start_failure() -> None:
    with pytest.raises(StartFailed, match=r"cannot run '/nonexistent/llama-server'.*"
                                          r"llama_server\.command"):
        process.spawn("m", ["/nonexistent/llama-server"], host=HOST, port=1)


async def _healthy(port: int) -> bool:
    try:
        async with httpx.AsyncClient() as client:
            return (await client.get(f"http://{HOST}:{port}/health")).status_code == 200
    except httpx.HTTPError:
        return False


def test_port_in_use_is_detected() -> None:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert process.port_in_use(HOST, port)
    assert not process.port_in_use(HOST, port)


def test_child_log_rotates_at_its_cap(tmp_path: Path) -> None:
    log = process.ChildLog(tmp_path / "child.log", max_bytes=1000, tail_lines=5)
    log.write([f"line {i:04d} " + "x" * 40 for i in range(100)])
    log.write(["after rotation"])
    log.close()
    assert (tmp_path / "child.log.1").stat().st_size > 1000
    assert (tmp_path / "child.log").read_text() == "after rotation\n"
    assert list(log.lines)[-1] == "after rotation"
    assert len(log.lines) == 5


def test_child_dies_with_swapd_even_on_sigkill(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: SIGKILL the parent, and the kernel kills the child."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import sys, trio
        from swapd.core import process
        async def main():
            port = process.free_port("127.0.0.1")
            argv = {fake_argv(0)!r}
            argv[argv.index("--port") + 1] = str(port)
            proc = process.spawn("m", argv, host="127.0.0.1", port=port)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(proc.watch)
                await proc.wait_ready(10, 0.02)
                # outlive trio's idle worker threads: the child must not die with them
                await trio.sleep(0.1)
                print(proc.pid, flush=True)
                await trio.sleep_forever()
        trio.run(main)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                              cwd=Path(__file__).resolve().parent.parent, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert group_alive(child)
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 5
        while group_alive(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not group_alive(child)
    finally:
        parent.kill()
        parent.wait()


async def test_a_restarted_swapd_reaps_the_llama_server_it_left(tmp_path: Path) -> None:
    pidfile = tmp_path / process.PIDFILE
    port = process.free_port(HOST)
    # A child of *this* process stands in for one whose swapd is gone.
    leftover = subprocess.Popen(fake_argv(port), start_new_session=True)
    try:
        with trio.fail_after(10):  # up, with its SIGTERM handler installed
            while not await _healthy(port):
                await trio.sleep(0.02)
        process.write_pidfile(pidfile, leftover.pid, fake_argv(port)[0])
        assert await process.reap_leftovers(tmp_path, grace=5) == [leftover.pid]
        assert leftover.wait(timeout=5) == 0  # SIGTERM was enough
        assert not pidfile.exists()
    finally:
        leftover.kill()
        leftover.wait()


async def test_a_recycled_pid_is_left_alone(tmp_path: Path) -> None:
    pidfile = tmp_path / process.PIDFILE
    bystander = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        process.write_pidfile(pidfile, bystander.pid, "/usr/bin/llama-server")
        assert await process.reap_leftovers(tmp_path, grace=5) == []  # other program
        record = {"pid": bystander.pid, "start_ticks": 1, "program": "sleep"}
        pidfile.write_text(json.dumps(record))
        assert await process.reap_leftovers(tmp_path, grace=5) == []  # other start time
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


async def test_the_pidfile_lives_as_long_as_the_child(tmp_path: Path) -> None:
    pidfile = tmp_path / process.PIDFILE
    port = process.free_port(HOST)
    async with trio.open_nursery() as nursery:
        proc = process.spawn("m", fake_argv(port), host=HOST, port=port, pidfile=pidfile)
        nursery.start_soon(proc.watch)
        await proc.wait_ready(10, 0.02)
        assert json.loads(pidfile.read_text())["pid"] == proc.pid
        await proc.stop(5)
    assert not pidfile.exists()


@pytest.mark.parametrize(("tail", "hint"), [
    (["gguf_init_from_file: failed to open GGUF file '/m.gguf'"], "model path is a readable"),
    (["ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9000 MiB on device 0: "
      "cudaMalloc failed: out of memory", "E srv load_model: failed to load model"],
     "lower ctx-size"),
    (["error: invalid argument: --bogus"], "run 'swapd check'"),
    (["couldn't bind HTTP server socket"], "port is taken"),
    (["ggml_cuda: CUDA error: out of memory"], "lower ctx-size"),
    (["something else"], ""),
])
def test_start_failures_come_with_a_hint(tail: list[str], hint: str) -> None:
    assert hint in process.diagnose(tail)
    assert bool(process.diagnose(tail)) == bool(hint)


def test_exit_descriptions() -> None:
    assert process.describe_exit(1) == "exited with code 1"
    assert process.describe_exit(-9) == "was killed by SIGKILL (the kernel's OOM killer?)"
    assert process.describe_exit(-11) == "was killed by SIGSEGV"


def test_a_full_disk_never_stops_the_child_log(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Writes that fail (ENOSPC from /dev/full) are counted and warned about once; the
    lines stay in memory; writing resumes, with one more line of log, once it works."""
    path = tmp_path / "child.log"
    path.symlink_to("/dev/full")
    log = process.ChildLog(path, max_bytes=1 << 20, tail_lines=100)
    for i in range(20):
        log.write([f"line {i}"])
    assert list(log.lines)[-1] == "line 19" and log.written == 20
    assert log.errors.counts["log"] == 20
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "cannot write the child's log" in warnings[0].getMessage()
    assert "No space left on device (ENOSPC)" in warnings[0].getMessage()
    path.unlink()  # room again
    log.write(["back"])
    log.close()
    assert path.read_text() == "back\n"
    assert log.errors.counts["log"] == 20
    assert any("works again" in r.getMessage() for r in caplog.records)


async def test_stop_kills_a_descendant_that_left_the_session(tmp_path: Path) -> None:
    """A wrapper that starts a helper in a session of its own (setsid): the group kill
    misses it, the child's marker in its environment does not."""
    helper_pid = tmp_path / "helper.pid"
    wrapper = tmp_path / "wrapper.sh"
    wrapper.write_text(
        f"#!/bin/sh\n\"{sys.executable}\" -c 'import os, sys, time; os.setsid(); "
        f"open(sys.argv[1], \"w\").write(str(os.getpid())); time.sleep(1000)' "
        f"\"{helper_pid}\" &\nexec \"{sys.executable}\" \"{FAKE_LLAMA_SERVER}\" \"$@\"\n")
    wrapper.chmod(0o755)
    port = process.free_port(HOST)
    async with trio.open_nursery() as nursery:
        proc = process.spawn("m", [str(wrapper), *fake_argv(port)[2:]], host=HOST, port=port,
                             pidfile=tmp_path / process.PIDFILE)
        nursery.start_soon(proc.watch)
        await proc.wait_ready(10, 0.02)
        with trio.fail_after(10):
            while not helper_pid.exists() or not helper_pid.read_text():
                await trio.sleep(0.02)
        helper = int(helper_pid.read_text())
        assert _session_of(helper) == helper != proc.pid  # out of the child's session
        await proc.stop(5)
    assert _session_of(helper) is None  # gone (a zombie at most) when stop() returned


def _session_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in "ZX" else int(fields[3])


async def test_the_reap_finds_leftovers_by_marker_and_by_session(tmp_path: Path) -> None:
    """What an earlier swapd on this state_dir left: a process with its marker (even in
    a session of its own), and a process of the recorded session without any marker
    (its environment scrubbed), whose leader is gone. A process marked by another
    state_dir's swapd, and one that merely shares this test's session, are left alone."""
    marked = subprocess.Popen(["sleep", "1000"], start_new_session=True, env={
        **os.environ, process.CHILD_MARKER: f"{process.owner_mark(tmp_path)}:1"})
    other = subprocess.Popen(["sleep", "1000"], start_new_session=True, env={
        **os.environ, process.CHILD_MARKER: f"{process.owner_mark(tmp_path / 'x')}:1"})
    leader = subprocess.Popen(["sh", "-c", "sleep 1000 & echo $!; wait"],
                              start_new_session=True, stdout=subprocess.PIPE, text=True)
    try:
        assert leader.stdout is not None
        in_session = int(leader.stdout.readline())
        process.write_pidfile(tmp_path / process.PIDFILE, leader.pid, "sh")
        leader.kill()  # like a wrapper killed by the death signal
        leader.wait()
        reaped = await process.reap_leftovers(tmp_path, grace=5)
        assert reaped == sorted([marked.pid, in_session])
        assert marked.wait(timeout=5) == -signal.SIGTERM
        assert _session_of(in_session) is None
        assert other.poll() is None
        assert await process.reap_leftovers(tmp_path, grace=5) == []  # consumed
    finally:
        for proc in (marked, other, leader):
            proc.kill()
            proc.wait()


async def test_buffer_lines_are_kept_whole_however_long_the_load_log(tmp_path: Path) -> None:
    """At ``-lv 4`` llama-server prints ~170 lines while loading: the model buffer line is
    long gone from the 40-line tail by readiness, and a footprint without it would
    under-count the weights."""
    wrapper = tmp_path / "verbose-llama-server"
    wrapper.write_text(textwrap.dedent("""\
        #!/bin/sh
        echo "load_tensors:        CUDA1 model buffer size =   100.00 MiB"
        i=0; while [ $i -lt 100 ]; do echo "llama_model_loader: line $i"; i=$((i+1)); done
        exec "$@"
        """))
    wrapper.chmod(0o755)
    port = process.free_port(HOST)
    async with trio.open_nursery() as nursery:
        proc = process.spawn("m", [str(wrapper), *fake_argv(port, "--fake-vram-mib", "50")],
                             host=HOST, port=port)
        nursery.start_soon(proc.watch)
        await proc.wait_ready(10, 0.02)
        with trio.fail_after(5):
            while len(proc.buffer_lines) < 4:  # the wrapper's line and the fake's three
                await trio.sleep(0.01)
        footprint = Footprint.parse(proc.buffer_lines)
        assert footprint is not None
        assert footprint.on_gpus() == {"CUDA1": 100 * 2**20, "CUDA0": 50 * 2**20}
        assert not any("CUDA1" in line for line in proc.tail)  # the tail lost it
        await proc.stop(5)
