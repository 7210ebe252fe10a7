"""The preflight: what is checked about a profile before the running model is stopped.

Model files are real files in ``tmp_path``; the binary is a tiny shell script that
prints a ``--help`` in llama-server's layout (and counts its runs), the fake
llama-server, or the real one (``real_llama``).
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from swapd.config import Config, parse_config
from swapd.core import preflight
from swapd.core.preflight import Preflight
from tests.conftest import FAKE_LLAMA_SERVER
from tests.support.tiny_gguf import write_header_only

HELP = """\
-c,    --ctx-size N                     size of the prompt context
-ngl,  --gpu-layers, --n-gpu-layers N   max. number of layers to store in VRAM
--jinja, --no-jinja                     whether to use jinja template engine
"""


def fake_binary(tmp_path: Path, help_text: str = HELP, *, hang: bool = False) -> Path:
    """A 'llama-server' that prints ``help_text`` for --help and appends to runs.log."""
    script = tmp_path / "llama-server"
    body = "sleep 1000" if hang else f"cat <<'EOF'\n{help_text}EOF"
    script.write_text(f"#!/bin/sh\necho run >> {tmp_path / 'runs.log'}\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def runs(tmp_path: Path) -> int:
    log = tmp_path / "runs.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def config(tmp_path: Path, command: str | list[str], profiles: str) -> Config:
    return parse_config(f"state_dir: {tmp_path / 'state'}\nllama_server: {{command: "
                        f"{command!r}}}\nprofiles:\n{profiles}", base_dir=tmp_path)


async def test_a_model_file_that_cannot_be_a_model_is_refused(tmp_path: Path) -> None:
    write_header_only(tmp_path / "ok.gguf")
    (tmp_path / "notes.gguf").write_text("these are notes, not weights\n")
    (tmp_path / "dir.gguf").mkdir()
    (tmp_path / "short.gguf").write_bytes(b"GGUF")
    (tmp_path / "secret.gguf").write_bytes(b"GGUF" + bytes(20))
    (tmp_path / "secret.gguf").chmod(0)
    cfg = config(tmp_path, "no-such-llama-server", """\
  ok: {model: ok.gguf}
  gone: {model: gone.gguf}
  notes: {model: notes.gguf}
  dir: {model: dir.gguf}
  short: {model: short.gguf}
  secret: {model: secret.gguf}
  hf: {model: later.gguf, flags: {hf-repo: org/model-GGUF}}
""")
    check = Preflight()
    verdicts = {name: await check(cfg, profile) for name, profile in cfg.profiles.items()}
    assert verdicts["ok"] is None
    assert verdicts["hf"] is None  # llama-server downloads it: not there yet is fine
    assert verdicts["gone"] == (
        f"not started: cannot read {tmp_path / 'gone.gguf'}: No such file or directory "
        "(check that the profile's model path is a readable GGUF file)")
    assert "notes.gguf is not a GGUF file" in (verdicts["notes"] or "")
    assert "dir.gguf: Is a directory" in (verdicts["dir"] or "")
    assert "short.gguf is not a GGUF file (too short)" in (verdicts["short"] or "")
    if os.geteuid() != 0:  # root reads anything
        assert "secret.gguf: Permission denied" in (verdicts["secret"] or "")


async def test_a_header_swapd_cannot_read_is_left_to_llama_server(tmp_path: Path) -> None:
    # A GGUF version swapd does not parse: readable, a GGUF, so no verdict.
    (tmp_path / "new.gguf").write_bytes(b"GGUF" + (4).to_bytes(4, "little") + bytes(16))
    cfg = config(tmp_path, "no-such-llama-server", "  new: {model: new.gguf}\n")
    assert await Preflight()(cfg, cfg.profiles["new"]) is None


async def test_flag_names_are_checked_against_the_binarys_help_once(tmp_path: Path) -> None:
    write_header_only(tmp_path / "m.gguf")
    binary = fake_binary(tmp_path)
    cfg = config(tmp_path, str(binary), """\
  good: {model: m.gguf, flags: {c: 4096, n-gpu-layers: 99, jinja: true, no-jinja: false}}
  typo: {model: m.gguf, flags: {ctx-sise: 4096}}
  two: {model: m.gguf, flags: {bogus: 1, --also-bogus: true}}
""")
    check = Preflight()
    assert await check(cfg, cfg.profiles["good"]) is None
    assert await check(cfg, cfg.profiles["typo"]) == (
        "not started: llama-server does not accept --ctx-sise; did you mean --ctx-size? "
        "(run 'swapd check')")
    two = await check(cfg, cfg.profiles["two"]) or ""
    assert "--bogus" in two and "--also-bogus" in two
    assert runs(tmp_path) == 1  # the help is read once per binary
    binary.write_text(binary.read_text().replace("--jinja, --no-jinja", "--other"))
    os.utime(binary, ns=(0, binary.stat().st_mtime_ns + 10**9))  # a rebuilt binary
    assert "--jinja" in (await check(cfg, cfg.profiles["good"]) or "")
    assert runs(tmp_path) == 2


async def test_unreadable_help_leaves_the_flags_unchecked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_header_only(tmp_path / "m.gguf")
    profiles = "  a: {model: m.gguf, flags: {anything-goes: true}}\n"
    silent = config(tmp_path, str(fake_binary(tmp_path, "usage: nothing useful\n")), profiles)
    assert await Preflight()(silent, silent.profiles["a"]) is None
    missing = config(tmp_path, str(tmp_path / "not-built-yet"), profiles)
    assert await Preflight()(missing, missing.profiles["a"]) is None
    monkeypatch.setattr(preflight, "HELP_TIMEOUT", 0.2)
    hangs = config(tmp_path, str(fake_binary(tmp_path, hang=True)), profiles)
    check = Preflight()
    assert await check(hangs, hangs.profiles["a"]) is None  # killed at its deadline
    assert await check(hangs, hangs.profiles["a"]) is None  # and not asked again
    assert runs(tmp_path) == 2  # the silent one, and the hung one once


async def test_the_fake_llama_servers_help_passes_its_own_flags(tmp_path: Path) -> None:
    write_header_only(tmp_path / "m.gguf")
    cfg = config(tmp_path, [sys.executable, str(FAKE_LLAMA_SERVER)], """\
  a: {model: m.gguf, flags: {ctx-size: 512, fake-load-ms: 10, jinja: true}}
  b: {model: m.gguf, flags: {no-such-flag: true}}
""")
    check = Preflight()
    assert await check(cfg, cfg.profiles["a"]) is None
    assert "does not accept --no-such-flag" in (await check(cfg, cfg.profiles["b"]) or "")


@pytest.mark.real_llama
async def test_the_real_binarys_help_is_what_flags_are_checked_against(
        tmp_path: Path, tiny_models: Path, llama_server_bin: Path) -> None:
    model = tiny_models / "a.gguf"
    cfg = config(tmp_path, str(llama_server_bin), f"""\
  good: {{model: {model}, flags: {{c: 2048, ngl: 0, flash-attn: "off", jinja: true}}}}
  typo: {{model: {model}, flags: {{n-gpu-layer: 0}}}}
""")
    check = Preflight()
    assert await check(cfg, cfg.profiles["good"]) is None
    verdict = await check(cfg, cfg.profiles["typo"]) or ""
    assert "llama-server does not accept --n-gpu-layer; did you mean --n-gpu-layers?" in (
        verdict)
