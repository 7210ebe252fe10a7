"""``swapd check`` and the command line around it."""

from __future__ import annotations

import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest

from swapd.cli import main
from tests.support.llama_build import find_llama_server
from tests.support.tiny_gguf import write_tiny_llama
from tests.test_flags import HELP

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "swapd.example.yaml"


@pytest.fixture
def no_llama_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PATH without any llama-server, so results do not depend on the machine."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


@pytest.fixture
def fake_llama(tmp_path: Path) -> Path:
    """A llama-server stand-in whose --help prints the captured help excerpt."""
    script = tmp_path / "bin" / "llama-server"
    script.parent.mkdir()
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{HELP}EOF\n")
    script.chmod(0o755)
    return script


def write_config(tmp_path: Path, flags: str, *, command: str | None = None,
                 port: str = "auto") -> Path:
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    text = (f"llama_server:\n  port: {port}\n"
            + (f"  command: {command}\n" if command else "")
            + "profiles:\n"
            f"  a:\n    model: a.gguf\n    aliases: [alpha]\n    flags: {flags}\n")
    path = tmp_path / "swapd.yaml"
    path.write_text(text)
    return path


def test_check_example_prints_every_profile_argv(
        no_llama_on_path: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(EXAMPLE)]) == 1  # its /models/... files are not here
    out, err = capsys.readouterr()
    assert "profile qwen3.6-27b-balanced (aliases: qwen)" in out
    assert "profile qwen3.6-27b-long (aliases: qwen-long)" in out
    assert "profile qwen3-embed\n" in out
    assert ("  llama-server --model /models/Qwen3.6-27B-Q4_K_M.gguf --host 127.0.0.1 "
            "--port <auto> --alias qwen3.6-27b-balanced --ctx-size 65536 --n-gpu-layers 99 "
            "--flash-attn on --cache-type-k q8_0 --cache-type-v q8_0 --jinja --parallel 2\n"
            in out)
    assert "-ngl 99" in out
    assert "fallback openrouter: deepseek/deepseek-v4-flash at https://openrouter.ai/api/v1" \
        in out
    assert "llama-server not found; flag names not checked" in err
    assert ("model file not found: /models/Qwen3.6-27B-Q4_K_M.gguf "
            "@ profiles.qwen3.6-27b-balanced.model") in err
    assert "3 problem(s)" in err


def test_check_ok(tmp_path: Path, fake_llama: Path,
                  capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "{ctx-size: 8192, ngl: 99, fa: on, jinja: true}",
                          port="8081")
    assert main(["check", str(config), "--llama-server", str(fake_llama)]) == 0
    out, err = capsys.readouterr()
    assert f"flag names checked against {fake_llama} --help" in out
    argv_line = out.split("profile a (aliases: alpha)\n")[1].splitlines()[0]
    assert shlex.split(argv_line) == [
        "llama-server", "--model", str(tmp_path / "a.gguf"), "--host", "127.0.0.1",
        "--port", "8081", "--alias", "a", "--ctx-size", "8192", "-ngl", "99", "-fa", "on",
        "--jinja"]
    assert out.endswith("ok\n")
    assert err == ""


def test_check_uses_the_configured_command(tmp_path: Path, fake_llama: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "{ctx_sz: 1}", command=str(fake_llama))
    assert main(["check", str(config)]) == 1
    _, err = capsys.readouterr()
    assert ("profiles.a.flags: llama-server does not accept --ctx-sz (written 'ctx_sz'); "
            "did you mean --ctx-size?") in err


def test_check_reports_every_unknown_flag(tmp_path: Path, fake_llama: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "{ctx_sz: 1, no-mmap: true, no-webui: false}")
    assert main(["check", str(config), "--llama-server", str(fake_llama)]) == 1
    _, err = capsys.readouterr()
    assert "2 problem(s)" in err
    assert "does not accept --ctx-sz" in err
    assert "does not accept --no-mmap" in err
    assert "no-webui" not in err  # false: never passed


def test_check_without_binary_does_not_fail(tmp_path: Path, no_llama_on_path: None,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "{whatever: 1}")
    assert main(["check", str(config)]) == 0
    out, err = capsys.readouterr()
    assert "llama-server not found; flag names not checked" in err
    assert "--whatever 1" in out


def test_check_binary_that_cannot_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "llama-server"
    broken.write_text("#!/bin/sh\necho 'Illegal instruction' >&2\nexit 132\n")
    broken.chmod(0o755)
    config = write_config(tmp_path, "{c: 1}")
    assert main(["check", str(config), "--llama-server", str(broken)]) == 0
    _, err = capsys.readouterr()
    assert "exited with code 132 and listed no flags; flag names not checked" in err


def test_check_invalid_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "swapd.yaml"
    path.write_text("timeouts: {start: soon}\nprofiles:\n  a: {model: a, flags: {port: 1}}\n")
    assert main(["check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{path}: 2 problem(s):" in err
    assert "  - expected a duration like 30s, 500ms or 2m, got 'soon' @ timeouts.start" in err
    assert "  - profiles.a.flags: 'port' is set by swapd" in err


def test_check_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "nope.yaml")]) == 1
    assert "cannot read the config file" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["check"], ["bogus"], ["serve"], ["check", "a", "b"]])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage: swapd" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "check" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["-c", "--config"])
def test_serve_runs_swapd_serve(flag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []

    def run(config_path: object) -> int:
        calls.append(config_path)
        return 7

    fake = types.ModuleType("swapd.serve")
    fake.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "swapd.serve", fake)
    assert main(["serve", flag, "/etc/swapd.yaml"]) == 7
    assert calls == ["/etc/swapd.yaml"]


def test_python_dash_m_swapd(tmp_path: Path) -> None:
    config = write_config(tmp_path, "{c: 1}", command=str(tmp_path / "missing-binary"))
    result = subprocess.run([sys.executable, "-m", "swapd", "check", str(config)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "--alias a -c 1" in result.stdout


@pytest.mark.real_llama
def test_check_against_the_real_llama_server(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    binary = find_llama_server()
    if binary is None:
        pytest.skip("no llama-server binary (set SWAPD_LLAMA_SERVER or build it with "
                    "tests/support/llama_build.py)")
    good = write_config(tmp_path, "{ctx-size: 4096, ngl: 0, flash-attn: on, jinja: true, "
                                  "n_parallel: 1, cache-type-k: q8_0, no-webui: false}")
    assert main(["check", str(good), "--llama-server", str(binary)]) == 0, \
        capsys.readouterr().err
    capsys.readouterr()
    bad = write_config(tmp_path, "{ctx_sz: 4096}")
    assert main(["check", str(bad), "--llama-server", str(binary)]) == 1
    assert "does not accept --ctx-sz (written 'ctx_sz'); did you mean --ctx-size?" in \
        capsys.readouterr().err


def test_check_judges_vram_estimates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_tiny_llama(tmp_path / "m.gguf", n_layers=4, n_embd=256, n_head=8, n_head_kv=2,
                     context_length=32768)
    path = tmp_path / "swapd.yaml"
    path.write_text("llama_server: {command: /nonexistent/llama-server}\nprofiles:\n"
                    "  small: {model: m.gguf, flags: {ctx-size: 4096}}\n"
                    "  long: {model: m.gguf, flags: {ctx-size: 32768}}\n")
    assert main(["check", str(path), "--gpu-memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "VRAM estimates for 1.00 GiB of GPU memory" in out
    assert out.count("fits in 1.00 GiB") == 2
    assert main(["check", str(path), "--gpu-memory", "560MiB"]) == 1
    captured = capsys.readouterr()
    assert "long: 4/4 layers on GPU, ctx 32768" in captured.out
    assert "does NOT fit in 560.0 MiB" in captured.out and "fix: ctx-size:" in captured.out
    assert "profiles.long: estimated" in captured.err
    assert main(["check", str(path), "--gpu-memory", "lots"]) == 1
    assert "--gpu-memory:" in capsys.readouterr().err


def test_check_says_which_profiles_fit_together(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    write_tiny_llama(tmp_path / "m.gguf", n_layers=4, n_embd=256, n_head=8, n_head_kv=2,
                     context_length=32768)
    path = tmp_path / "swapd.yaml"
    profiles = ("profiles:\n"
                "  chat: {model: m.gguf, memory: 700MiB}\n"
                "  embed: {model: m.gguf, memory: 200MiB}\n"
                "  coder: {model: m.gguf, memory: 500MiB}\n")
    path.write_text("llama_server: {command: /nonexistent/llama-server}\n"
                    "residency: {mode: budget, reserve: 100MiB}\n" + profiles)
    assert main(["check", str(path), "--gpu-memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    # 1 GiB less the 100 MiB reserve leaves 924 MiB for models.
    assert "Together (residency.mode: budget; for models: GPU 0: 924.0 MiB):" in out
    assert "  chat (700.0 MiB): fits beside embed\n" in out
    assert "  embed (200.0 MiB): fits beside chat, coder\n" in out
    assert "  coder (500.0 MiB): fits beside embed\n" in out
    path.write_text("llama_server: {command: /nonexistent/llama-server}\n" + profiles)
    assert main(["check", str(path), "--gpu-memory", "1GiB"]) == 0
    assert "Together: one model at a time" in capsys.readouterr().out
