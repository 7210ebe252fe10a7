"""The one-time llama-server build (``tests/support/llama_build.py``) on machines that lack
part of the toolchain: it names what is missing before it downloads anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import llama_build


def tools_dir(tmp_path: Path, *names: str) -> Path:
    """A directory of stand-in executables, to be the whole PATH."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in names:
        tool = folder / name
        tool.write_text("#!/bin/sh\nexit 0\n")
        tool.chmod(0o755)
    return folder


@pytest.fixture
def no_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No cached build and no $SWAPD_LLAMA_SERVER, and no step of a build may run."""
    monkeypatch.setenv("SWAPD_LLAMA_CACHE", str(tmp_path / "cache"))
    for var in ("SWAPD_LLAMA_SERVER", "CC", "CXX"):
        monkeypatch.delenv(var, raising=False)

    def refuse(argv: list[str]) -> None:
        pytest.fail(f"a build step ran: {argv}", pytrace=False)

    monkeypatch.setattr(llama_build, "_run", refuse)


@pytest.mark.parametrize(("present", "missing"), [
    ((), ["cmake", "ninja or make", "a C compiler (cc, gcc or clang)",
          "a C++ compiler (c++, g++ or clang++)"]),
    (("cmake", "cc", "c++"), ["ninja or make"]),
    (("cmake", "make", "gcc"), ["a C++ compiler (c++, g++ or clang++)"]),
    (("ninja", "make", "cc", "c++"), ["cmake"]),
])
def test_a_missing_toolchain_is_named_before_anything_is_downloaded(
        no_binary: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        present: tuple[str, ...], missing: list[str]) -> None:
    monkeypatch.setenv("PATH", str(tools_dir(tmp_path, *present)))
    with pytest.raises(llama_build.BuildToolsMissing) as raised:
        llama_build.ensure_llama_server()
    message = str(raised.value)
    assert f"missing: {', '.join(missing)}" in message
    assert "apt-get install cmake g++ ninja-build" in message
    assert "SWAPD_LLAMA_SERVER" in message


@pytest.mark.parametrize(("present", "generator"), [
    (("cmake", "ninja", "make", "cc", "c++"), ["-G", "Ninja"]),
    (("cmake", "make", "gcc", "g++"), ["-G", "Unix Makefiles"]),  # no ninja: make will do
    (("cmake", "ninja", "clang", "clang++"), ["-G", "Ninja"]),
])
def test_make_stands_in_for_ninja(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  present: tuple[str, ...], generator: list[str]) -> None:
    monkeypatch.setenv("PATH", str(tools_dir(tmp_path, *present)))
    for var in ("CC", "CXX"):
        monkeypatch.delenv(var, raising=False)
    assert llama_build.build_generator() == generator


def test_compilers_named_by_cc_and_cxx_count(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tools_dir(tmp_path, "cmake", "make", "gcc-14", "g++-14")
    monkeypatch.setenv("PATH", str(folder))
    monkeypatch.setenv("CC", "gcc-14")
    monkeypatch.setenv("CXX", f"{folder}/g++-14 -O2")
    assert llama_build.build_generator() == ["-G", "Unix Makefiles"]
    monkeypatch.setenv("CXX", "g++-13")  # named, but not there
    with pytest.raises(llama_build.BuildToolsMissing, match=r"missing: \$CXX \(g\+\+-13\)"):
        llama_build.build_generator()


def test_the_build_script_says_what_is_missing_without_a_traceback(
        no_binary: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", str(tools_dir(tmp_path, "make", "cc", "c++")))
    assert llama_build.main() == 1
    err = capsys.readouterr().err
    assert err.startswith("cannot build llama-server: missing: cmake")
    assert "Traceback" not in err
